"""Which tile configs the Triton launchers pick under the interpreter.

On a GPU a launcher picks its production config (a table's default, or the autotuner's choice).
Under TRITON_INTERPRET=1 it picks a small config by default, since the interpreter's cost grows
with the tile; ``gpu_configs()`` makes it pick the production default instead, so the correctness
grid can run the exact tiles, masks and loop bounds a GPU will run.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import torch

from fastlm.backend import interpreter_on

_GPU_CONFIGS: contextvars.ContextVar[bool] = contextvars.ContextVar("fastlm_gpu_configs", default=False)


@contextlib.contextmanager
def gpu_configs():
    """Within the block, launchers under the interpreter use the configs they default to on a GPU."""
    token = _GPU_CONFIGS.set(True)
    try:
        yield
    finally:
        _GPU_CONFIGS.reset(token)


def small_configs() -> bool:
    """True when a launcher should pick its small interpreter config."""
    return interpreter_on() and not _GPU_CONFIGS.get()


@functools.cache
def _capability(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def capability(t: torch.Tensor) -> int:
    """The compute capability (e.g. 90) of a CUDA tensor's device; 90 for CPU tensors (the tables
    the interpreter runs under gpu_configs())."""
    if not t.is_cuda:
        return 90
    return _capability(t.device.index if t.device.index is not None else torch.cuda.current_device())


FP32_PREC = "tf32x3"


def dot_precision(dtype: torch.dtype, bd: int) -> str:
    """tl.dot precision of the attention and decode kernels for inputs of ``dtype`` and BLOCK_D = bd.
    16-bit inputs multiply exactly on tensor cores anyway. fp32 inputs up to BLOCK_D 128 get 3xTF32:
    three tensor-core products per fp32 product, fp32-level accuracy. Above that no 3xTF32 tile fits
    the register file without spilling (hi and lo halves of fp32 operands are four times a 16-bit
    tile), so fp32 at head dims over 128 runs IEEE FMA dots on small tiles: exact like torch's fp32
    matmul, and slow."""
    if dtype != torch.float32:
        return "tf32"
    return FP32_PREC if bd <= 128 else "ieee"


def is_fp32_prec(prec: str) -> bool:
    return prec in (FP32_PREC, "ieee")


def grid_1d(*dims: int) -> tuple[int]:
    """One grid dimension for prod(dims) programs (x allows 2^31 - 1; y and z only 65535)."""
    n = 1
    for d in dims:
        n *= d
    if n >= 2**31:
        raise ValueError(f"fastlm.triton: {n} programs exceed the grid limit 2^31 - 1")
    return (n,)
