"""Test setup: without a GPU, the Triton kernels run through the interpreter on CPU tensors.

TRITON_INTERPRET must be set before any @triton.jit runs, so it is set here, before fastlm is
imported. Tests marked ``gpu`` are skipped, with that reason, when torch sees no CUDA device.
"""

import os

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
