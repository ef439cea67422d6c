"""Input checks shared by the ops: each raises TypeError/ValueError saying what was expected."""

from __future__ import annotations

import torch

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(name: str, t, *, op: str, dtypes=None, ndim_min: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"fastlm.ops.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"fastlm.ops.{op}: {name} must have dtype {names}; got {str(t.dtype).replace('torch.', '')}")
    if ndim_min is not None and t.dim() < ndim_min:
        raise ValueError(f"fastlm.ops.{op}: {name} must have at least {ndim_min} dims, got shape {tuple(t.shape)}")


def check_same_device(op: str, ref_name: str, ref: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"fastlm.ops.{op}: {name} is on {t.device} but {ref_name} is on {ref.device}")


def check_kernel_dtype(op: str, backend: str, **tensors) -> None:
    """Kernels run fp32/fp16/bf16; float64 is served by the torch backend only."""
    for name, t in tensors.items():
        if t is not None and t.dtype not in KERNEL_DTYPES:
            raise TypeError(
                f"fastlm.ops.{op}: the {backend} backend supports float32, float16 and bfloat16; "
                f"{name} is {str(t.dtype).replace('torch.', '')} (use backend='torch' for it)"
            )


def launcher(backend: str, module: str):
    """The module holding an op's launchers for a kernel backend ("triton" or "cuda")."""
    import importlib

    return importlib.import_module(f"fastlm.{backend}.{module}")
