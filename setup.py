"""Builds the optional CUDA extension fastlm._C by driving CMakeLists.txt (metadata: pyproject.toml).

The build runs only where nvcc is found (on PATH, else ${CUDA_HOME:-/usr/local/cuda}/bin/nvcc,
as the Makefile looks) and FASTLM_SKIP_CUDA_BUILD is not 1; otherwise it is skipped with a message
and the package installs without _C. FASTLM_CUDA_ARCHS picks the architectures (default
"80;90a"); MAX_JOBS caps the parallel compile jobs. CMake works in build/cmake-<python tag>, kept
between builds, so rebuilds (editable installs included) only recompile what changed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    nvcc = os.path.join(os.environ.get("CUDA_HOME") or "/usr/local/cuda", "bin", "nvcc")
    return nvcc if os.access(nvcc, os.X_OK) else None


def skip_reason() -> str | None:
    if os.environ.get("FASTLM_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        return "FASTLM_SKIP_CUDA_BUILD is set"
    if find_nvcc() is None:
        return "nvcc not found (not on PATH, nor at ${CUDA_HOME:-/usr/local/cuda}/bin/nvcc)"
    if shutil.which("cmake") is None:
        return "cmake not found on PATH"
    return None


def find_ninja() -> str | None:
    try:
        import ninja

        path = os.path.join(ninja.BIN_DIR, "ninja")
        if os.access(path, os.X_OK):
            return path
    except ImportError:
        pass
    return shutil.which("ninja")


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11

        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = ROOT / "build" / f"cmake-{sys.implementation.cache_tag}"
        archs = os.environ.get("FASTLM_CUDA_ARCHS") or "80;90a"
        args = [
            "cmake",
            "-S",
            str(ROOT),
            "-B",
            str(build_dir),
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_CUDA_COMPILER={find_nvcc()}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DFASTLM_CUDA_ARCHS={archs}",
            f"-DFASTLM_OUTPUT_DIR={out.parent}",
            f"-DFASTLM_EXT_SUFFIX={sysconfig.get_config_var('EXT_SUFFIX')}",
        ]
        ninja = find_ninja()
        generator = "Ninja" if ninja else "Unix Makefiles"
        cache = build_dir / "CMakeCache.txt"
        if cache.exists():
            text = cache.read_text()
            if f"CMAKE_GENERATOR:INTERNAL={generator}\n" not in text or f"CMAKE_HOME_DIRECTORY:INTERNAL={ROOT}\n" not in text:
                shutil.rmtree(build_dir)
        build_dir.mkdir(parents=True, exist_ok=True)
        args += ["-G", generator] + ([f"-DCMAKE_MAKE_PROGRAM={ninja}"] if ninja else [])
        build = ["cmake", "--build", str(build_dir)]
        if os.environ.get("MAX_JOBS"):
            build += ["--parallel", os.environ["MAX_JOBS"]]
        elif not ninja:
            build += ["--parallel", str(os.cpu_count() or 1)]
        print(f"fastlm: building the CUDA extension for archs {archs} into {out}", flush=True)
        subprocess.run(args, check=True)
        subprocess.run(build, check=True)
        if not out.exists():
            raise RuntimeError(f"the CMake build finished but {out} is missing")


reason = skip_reason()
if reason:
    print(f"fastlm: skipping the CUDA extension fastlm._C: {reason}", file=sys.stderr)

setup(
    ext_modules=[] if reason else [CMakeExtension("fastlm._C")],
    cmdclass={"build_ext": CMakeBuild},
)
