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
