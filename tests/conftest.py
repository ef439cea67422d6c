"""Test setup: without a GPU, the Triton kernels run through the interpreter on CPU tensors, and the
cuda backend's kernels through fastlm._C_host (the host-emulation build of csrc/) where it is built.

TRITON_INTERPRET must be set before any @triton.jit runs, so it is set here, before fastlm is
imported. Tests marked ``gpu`` are skipped, with that reason, when torch sees no CUDA device.

The cuda backend on CPU tensors is thinned where the emulation (every thread of every block a
fiber) makes it slow; the dropped items are deselected (counted as "deselected" in the summary,
never skipped), the same ones on every run and every xdist worker, and ``FASTLM_HOST_FULL=1``
keeps them all. On a GPU nothing is dropped.
- Case grids (tests parametrized by ``case`` and ``backend``): in each file of ``HOST_GRID_KEEP``
  a cuda item is kept when a stable hash (CRC-32) of its node id is 0 modulo the file's K.
- Chi-square sampling tests drawing ``HOST_MAX_DRAWS`` tokens or more: each draw is one
  512-thread block (20 s to 2 min an item). The cuda backend's tokens equal the reference's bit for
  bit (test_matches_reference, test_backends_agree_bitwise), whose distribution the triton items
  test; the small-draw items still run it through the kernel.
"""

import os
import shutil
import zlib

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # The suite runs as 2 xdist workers on 2 cores: one intra-op thread each, or tiny ops thrash.
    torch.set_num_threads(1)

import fastlm  # noqa: E402,F401

DEVICE = "cuda" if HAS_GPU else "cpu"


def kernel_backends():
    """The kernel backends that can run in this session: triton always; cuda on a GPU with _C, and
    on CPU tensors with _C_host."""
    return [b for b in ("triton", "cuda") if fastlm.backend.why_unavailable(b, DEVICE) is None]


# Per test file: keep 1 in K of the cuda-backend case-grid items on CPU (see the module docstring).
# Files not listed keep every item: their full cuda grids take seconds on the emulation (attention's
# 44 items about 70 s, and most of them are the Triton fallback: subsampling it would drop the few
# that run the CUDA kernel).
HOST_GRID_KEEP = {"test_layer_norm.py": 2}
HOST_MAX_DRAWS = 1000


def host_full() -> bool:
    return os.environ.get("FASTLM_HOST_FULL", "0") not in ("", "0")


def _host_kept(item) -> bool:
    params = getattr(getattr(item, "callspec", None), "params", {})
    if params.get("backend") != "cuda":
        return True
    if item.originalname.startswith("test_chi_square_"):
        draws = params.get("n") or getattr(item.module, "DRAWS", {}).get(params.get("V"), 0)
        return draws < HOST_MAX_DRAWS
    if "case" not in params:
        return True
    return zlib.crc32(item.nodeid.encode()) % HOST_GRID_KEEP.get(item.path.name, 1) == 0


def pytest_report_header(config):
    if HAS_GPU:
        return None
    import fastlm.cuda as fcuda

    err = fcuda.load_error("cpu")
    if err is not None:
        return f"cuda backend on CPU tensors: unavailable ({err})"
    H = fcuda.lib("cpu")
    grid = "every cuda item (FASTLM_HOST_FULL=1)" if host_full() else (
        "cuda grid cases kept 1 in K: " + ", ".join(f"{f} K={k}" for f, k in HOST_GRID_KEEP.items())
        + f"; chi-square items of {HOST_MAX_DRAWS}+ draws deselected (FASTLM_HOST_FULL=1 runs all)")
    return f"cuda backend on CPU tensors: fastlm._C_host, fiber-schedule seed {H.emulation_seed()} (FASTLM_HOST_SEED); {grid}"


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False); runs in `make gpu-check`")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
    if host_full():
        return
    import fastlm.cuda as fcuda

    if fcuda.load_error("cpu") is not None:
        return
    dropped = [item for item in items if not _host_kept(item)]
    _host_dropped[:] = [len(dropped)]
    if hasattr(config, "workeroutput"):  # an xdist worker: the controller prints the count
        config.workeroutput["fastlm_host_dropped"] = len(dropped)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        gone = set(dropped)
        items[:] = [item for item in items if item not in gone]


_host_dropped: list[int] = []


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    count = getattr(node, "workeroutput", {}).get("fastlm_host_dropped")
    if count is not None:
        _host_dropped[:] = [count]


def pytest_terminal_summary(terminalreporter):
    if _host_dropped and _host_dropped[0]:
        terminalreporter.write_line(
            f"fastlm: {_host_dropped[0]} cuda-backend items deselected on CPU tensors (host-emulation thinning, "
            "tests/conftest.py; FASTLM_HOST_FULL=1 runs them)"
        )


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def nvcc_available() -> bool:
    """nvcc where setup.py and the Makefile look: PATH, else ${CUDA_HOME:-/usr/local/cuda}/bin."""
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    return shutil.which("nvcc") is not None or os.access(os.path.join(home, "bin", "nvcc"), os.X_OK)


def host_compiler_available() -> bool:
    """CMake and a C++ compiler on PATH: what building fastlm._C_host needs."""
    return shutil.which("cmake") is not None and any(shutil.which(c) for c in (os.environ.get("CXX", "c++"), "g++", "clang++"))


def _require_built(err: str | None, module: str, tools: tuple[str, str], can_build: bool, skip_var: str, how: str) -> None:
    """Skip (with the reason) where ``module`` cannot be built here; fail where it could but does
    not import. tools: the reason it cannot be built, and the words for when it can."""
    if err is None:
        return
    if not can_build:
        pytest.skip(f"{tools[0]} and fastlm.{module} is not built: {err}")
    if os.environ.get(skip_var, "0") not in ("", "0"):
        pytest.skip(f"{skip_var} is set and fastlm.{module} is not built: {err}")
    pytest.fail(f"{tools[1]} but fastlm.{module} does not import (run `{how}`): {err}")


@pytest.fixture(scope="module")
def C():
    """fastlm._C; skipped (with the reason) only where it cannot be built here."""
    import fastlm.cuda as fcuda

    _require_built(fcuda.load_error(), "_C", ("nvcc is absent", "nvcc is present"), nvcc_available(), "FASTLM_SKIP_CUDA_BUILD", "make cuda-check")
    return fcuda.lib()


@pytest.fixture(scope="module")
def C_host():
    """fastlm._C_host as the launchers see it (``fastlm.cuda.lib("cpu")``: each call registers the
    extents of the CPU tensors passed through ``fastlm.cuda.ptr``); skipped (with the reason) only
    where it cannot be built here."""
    import fastlm.cuda as fcuda

    _require_built(fcuda.load_error("cpu"), "_C_host",
                   ("CMake or a C++ compiler is absent", "CMake and a C++ compiler are present"), host_compiler_available(),
                   "FASTLM_SKIP_HOST_BUILD", ".venv/bin/python setup.py -q build_ext --inplace")
    return fcuda.lib("cpu")
