"""Test setup: without a GPU, the Triton kernels run through the interpreter on CPU tensors.

TRITON_INTERPRET must be set before any @triton.jit runs, so it is set here, before fastlm is
imported. Tests marked ``gpu`` are skipped, with that reason, when torch sees no CUDA device.
"""

import os
import shutil

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
    """The kernel backends that can run in this session (triton always; cuda on a GPU with _C)."""
    return [b for b in ("triton", "cuda") if fastlm.backend.why_unavailable(b, DEVICE) is None]


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False); runs in `make gpu-check`")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


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


@pytest.fixture(scope="module")
def C():
    """fastlm._C; skipped (with the reason) only where it cannot be built here."""
    import fastlm.cuda as fcuda

    err = fcuda.load_error()
    if err is not None:
        if not nvcc_available():
            pytest.skip(f"nvcc is absent and fastlm._C is not built: {err}")
        if os.environ.get("FASTLM_SKIP_CUDA_BUILD", "0") not in ("", "0"):
            pytest.skip(f"FASTLM_SKIP_CUDA_BUILD is set and fastlm._C is not built: {err}")
        pytest.fail(f"nvcc is present but fastlm._C does not import (run `make cuda-check`): {err}")
    return fcuda.lib()
