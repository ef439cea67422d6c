"""Builds the optional native extensions by driving CMakeLists.txt (metadata: pyproject.toml).

- fastlm._C, the CUDA kernels through nvcc: only where nvcc is found (on PATH, else
  ${CUDA_HOME:-/usr/local/cuda}/bin/nvcc, as the Makefile looks) and FASTLM_SKIP_CUDA_BUILD is not 1.
- fastlm._C_host, the same kernels compiled for the CPU by the host C++ compiler (no nvcc): unless
  FASTLM_SKIP_HOST_BUILD is 1.

Both need cmake on PATH and a C++ compiler ($CXX, else c++, g++ or clang++ on PATH); one that is not
built is skipped with a message saying why, and the package installs without it (without both: pure
Python + Triton). Both come from one CMake build in build/cmake-<python tag>, kept between builds,
so rebuilds (editable installs included) only recompile what changed. FASTLM_CUDA_ARCHS picks the
architectures of _C (default "80;90a"); MAX_JOBS caps the parallel compile jobs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CUDA_EXT, HOST_EXT = "fastlm._C", "fastlm._C_host"


def find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    nvcc = os.path.join(os.environ.get("CUDA_HOME") or "/usr/local/cuda", "bin", "nvcc")
    return nvcc if os.access(nvcc, os.X_OK) else None


def find_cxx() -> str | None:
    cxx = os.environ.get("CXX", "").split()
    for name in cxx[:1] or ["c++", "g++", "clang++"]:
        found = shutil.which(name)
        if found:
            return found
    return None


def env_flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


def skip_reasons() -> dict[str, str | None]:
    """For each extension, None if it is built here, else why not."""
    common = None
    if shutil.which("cmake") is None:
        common = "cmake not found on PATH"
    elif find_cxx() is None:
        common = "no C++ compiler found ($CXX, c++, g++ or clang++ on PATH)"
    if env_flag("FASTLM_SKIP_CUDA_BUILD"):
        cuda = "FASTLM_SKIP_CUDA_BUILD is set"
    elif find_nvcc() is None:
        cuda = "nvcc not found (not on PATH, nor at ${CUDA_HOME:-/usr/local/cuda}/bin/nvcc)"
    else:
        cuda = common
    host = "FASTLM_SKIP_HOST_BUILD is set" if env_flag("FASTLM_SKIP_HOST_BUILD") else common
    return {CUDA_EXT: cuda, HOST_EXT: host}


def nvcc_version(nvcc: str) -> str | None:
    try:
        return subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def cached(text: str, var: str) -> str | None:
    """The value of ``var`` in a CMakeCache.txt, or None."""
    match = re.search(rf"^{var}:[A-Z]+=(.*)$", text, re.MULTILINE)
    return match.group(1) if match else None


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
    """One CMake configure + build for all the extensions asked for (each is a CMake target)."""

    def build_extensions(self) -> None:
        import pybind11

        self.check_extensions_list(self.extensions)
        outs = [Path(self.get_ext_fullpath(ext.name)).resolve() for ext in self.extensions]
        names = {ext.name for ext in self.extensions}
        build_dir = ROOT / "build" / f"cmake-{sys.implementation.cache_tag}"
        archs = os.environ.get("FASTLM_CUDA_ARCHS") or "80;90a"
        args = [
            "cmake",
            "-S",
            str(ROOT),
            "-B",
            str(build_dir),
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DFASTLM_SKIP_CUDA_BUILD={'OFF' if CUDA_EXT in names else 'ON'}",
            f"-DFASTLM_SKIP_HOST_BUILD={'OFF' if HOST_EXT in names else 'ON'}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DFASTLM_OUTPUT_DIR={outs[0].parent}",
            f"-DFASTLM_EXT_SUFFIX={sysconfig.get_config_var('EXT_SUFFIX')}",
        ]
        ninja = find_ninja()
        generator = "Ninja" if ninja else "Unix Makefiles"
        nvcc = find_nvcc() if CUDA_EXT in names else None
        cache = build_dir / "CMakeCache.txt"
        if cache.exists():
            text = cache.read_text()
            stale = cached(text, "CMAKE_GENERATOR") != generator or cached(text, "CMAKE_HOME_DIRECTORY") != str(ROOT)
            # CMake wipes its cache, -D arguments included, when CMAKE_CUDA_COMPILER changes: another
            # path to the same nvcc (a wrapper on PATH, CUDA_HOME/bin) keeps the cached one, another
            # nvcc starts afresh.
            old = cached(text, "CMAKE_CUDA_COMPILER")
            if nvcc and old and old != nvcc:
                version = nvcc_version(nvcc)
                if version is not None and nvcc_version(old) == version:
                    nvcc = old
                else:
                    stale = True
            if stale:
                shutil.rmtree(build_dir)
        if nvcc:
            args += [f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DFASTLM_CUDA_ARCHS={archs}"]
        build_dir.mkdir(parents=True, exist_ok=True)
        args += ["-G", generator] + ([f"-DCMAKE_MAKE_PROGRAM={ninja}"] if ninja else [])
        build = ["cmake", "--build", str(build_dir)]
        if os.environ.get("MAX_JOBS"):
            build += ["--parallel", os.environ["MAX_JOBS"]]
        elif not ninja:
            build += ["--parallel", str(os.cpu_count() or 1)]
        what = " and ".join(sorted(names)) + (f" (CUDA archs {archs})" if CUDA_EXT in names else "")
        print(f"fastlm: building {what} into {outs[0].parent}", flush=True)
        subprocess.run(args, check=True)
        subprocess.run(build, check=True)
        missing = [str(out) for out in outs if not out.exists()]
        if missing:
            raise RuntimeError(f"the CMake build finished without {', '.join(missing)}")


reasons = skip_reasons()
for name, reason in reasons.items():
    if reason:
        print(f"fastlm: skipping the extension {name}: {reason}", file=sys.stderr)

setup(
    ext_modules=[CMakeExtension(name) for name, reason in reasons.items() if reason is None],
    cmdclass={"build_ext": CMakeBuild},
)
