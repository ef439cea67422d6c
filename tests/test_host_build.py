"""fastlm._C_host, the host build of csrc: it is built (CMakeLists.txt, through setup.py) wherever CMake
and a C++ compiler exist, reports itself as the emulation, keeps what its runtime needs (its symbol
table, no libasan), and FASTLM_SKIP_HOST_BUILD=1 leaves it out; `import fastlm` needs neither module.
"""

from __future__ import annotations

import importlib
import os
import struct
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import host_compiler_available

import fastlm

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def H(C_host):
    """The fastlm._C_host module itself (C_host, the launchers' view of it, skips where it cannot be built)."""
    return importlib.import_module("fastlm._C_host")


def test_host_module_reports_itself(H):
    assert H.EMULATION is True
    assert H.built_archs() == ["host"]
    assert H.cuda_runtime_version() == 0
    assert H.device_count() == 0
    assert H.error_string(0) == "no error"


def test_host_module_lies_next_to_the_package_with_the_interpreter_suffix(H):
    path = Path(H.__file__)
    assert path.parent == Path(fastlm.__file__).parent
    assert path.name == "_C_host" + sysconfig.get_config_var("EXT_SUFFIX")


def test_host_module_has_every_function_of_C(C, H):
    """fastlm._C_host binds every function of fastlm._C (the same launchers)."""
    missing = sorted(n for n in dir(C) if not n.startswith("_") and n not in dir(H))
    assert not missing, f"fastlm._C_host lacks {missing}"


def _elf_sections(data: bytes) -> list[tuple[str, int, int, int]]:
    """(name, sh_offset, sh_size, sh_link) of each section of a little-endian ELF64 file, in order."""
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, "not a little-endian ELF64 file"
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    heads = [struct.unpack_from("<IIQQQQII", data, shoff + i * shentsize) for i in range(shnum)]
    names_at = heads[shstrndx][4]
    return [(_cstr(data, names_at + h[0]), h[4], h[5], h[6]) for h in heads]


def _cstr(data: bytes, at: int) -> str:
    return data[at : data.index(b"\0", at)].decode()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the module as an ELF file (Linux)")
def test_host_module_keeps_its_symbol_table_and_needs_no_libasan(H):
    """The runtime finds kernel names and __shared__ variables in its own .symtab (never strip it);
    the module defines the __asan_*_noabort hooks itself (linking libasan would replace them)."""
    data = Path(H.__file__).read_bytes()
    sections = _elf_sections(data)
    by_name = {name: (off, size, link) for name, off, size, link in sections}
    assert by_name.get(".symtab", (0, 0, 0))[1] > 0, f"no .symtab in {H.__file__}: {sorted(by_name)}"
    off, size, link = by_name[".dynamic"]
    dynstr = sections[link][1]
    needed = []
    for i in range(0, size, 16):
        tag, val = struct.unpack_from("<qQ", data, off + i)
        if tag == 1:  # DT_NEEDED
            needed.append(_cstr(data, dynstr + val))
    assert needed and not [n for n in needed if "asan" in n], needed


def _cmake_configure(build: Path, env: dict, *defs: str) -> subprocess.CompletedProcess:
    import pybind11

    args = ["cmake", "-S", str(ROOT), "-B", str(build), f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", f"-DFASTLM_OUTPUT_DIR={build / 'out'}", *defs]
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)


def _has_target(build: Path, target: str) -> bool:
    files = [build / "build.ninja", build / "Makefile"]
    return any(f"{target}.dir" in f.read_text() for f in files if f.exists())


@pytest.mark.skipif(not host_compiler_available(), reason="cmake or a C++ compiler is not on PATH")
def test_skip_host_build_leaves_the_target_out(tmp_path):
    """Configure only (no compile): FASTLM_SKIP_HOST_BUILD=1 in the environment drops _C_host; the
    same build directory with the option off gets it, with one wrapper per kernel source."""
    env = {**os.environ, "FASTLM_SKIP_HOST_BUILD": "1", "FASTLM_SKIP_CUDA_BUILD": "1"}
    build = tmp_path / "build"
    r = _cmake_configure(build, env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "skipping fastlm._C_host: FASTLM_SKIP_HOST_BUILD is on" in r.stdout
    assert not _has_target(build, "_C_host") and not (build / "host").exists()
    assert not _has_target(build, "_C"), "FASTLM_SKIP_CUDA_BUILD=1 must leave _C out too"

    r = _cmake_configure(build, env, "-DFASTLM_SKIP_HOST_BUILD=OFF")
    assert r.returncode == 0, r.stdout + r.stderr
    assert _has_target(build, "_C_host")
    kernels = sorted(ROOT.glob("csrc/*.cu")) + [ROOT / "csrc/host/selftest.cu"]
    for src in kernels:
        assert (build / "host" / f"{src.stem}.cpp").read_text() == f'#include "{src}"\n'


def _setup_skips(**env: str) -> str:
    r = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, **env}, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "fastlm", r.stdout + r.stderr
    return r.stderr


def test_setup_py_builds_host_unless_skipped():
    assert "fastlm._C_host" not in _setup_skips(FASTLM_SKIP_HOST_BUILD="0", FASTLM_SKIP_CUDA_BUILD="1")
    both = _setup_skips(FASTLM_SKIP_HOST_BUILD="1", FASTLM_SKIP_CUDA_BUILD="1")
    assert "skipping the extension fastlm._C_host: FASTLM_SKIP_HOST_BUILD is set" in both
    assert "skipping the extension fastlm._C: FASTLM_SKIP_CUDA_BUILD is set" in both


def test_import_fastlm_needs_neither_module():
    """With fastlm._C and fastlm._C_host unimportable, fastlm imports, says why the cuda backend is
    missing on both devices, and runs the other backends."""
    code = (
        "import sys; sys.modules['fastlm._C'] = sys.modules['fastlm._C_host'] = None\n"
        "import torch, fastlm, fastlm.cuda\n"
        "for dev in ('cuda', 'cpu'):\n"
        "    err = fastlm.backend.why_unavailable('cuda', dev)\n"
        "    assert err and 'is not built' in err, (dev, err)\n"
        "x = torch.randn(2, 4)\n"
        "torch.testing.assert_close(fastlm.ops.layer_norm(x, (4,), backend='torch'), torch.nn.functional.layer_norm(x, (4,)))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
