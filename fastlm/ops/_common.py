"""Input checks shared by the ops (each raises TypeError/ValueError saying what was expected) and
``launcher``, the kernel modules behind the device guard."""

from __future__ import annotations

import functools
import importlib
import types

import torch

from fastlm.backend import interpreted_bf16

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


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


def cuda_device_of(args, kwargs) -> torch.device | None:
    """The device of the first CUDA tensor among the positional, then keyword, arguments; None if none."""
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_cuda:
            return a.device
    for a in kwargs.values():
        if isinstance(a, torch.Tensor) and a.is_cuda:
            return a.device
    return None


def _guarded(fn):
    """fn run with the device of its first CUDA tensor argument current (the launchers launch on the
    current device); called directly when no argument is a CUDA tensor."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        device = cuda_device_of(args, kwargs)
        if device is None:
            return fn(*args, **kwargs)
        with torch.cuda.device(device):
            return fn(*args, **kwargs)

    call._fastlm_unguarded = fn
    return call


class _LauncherModule:
    """A launcher module seen through the device guard: its Python functions come back wrapped by
    ``_guarded``, every other attribute (constants, kernels, classes) as it is. Attributes are read
    from the module at each access and writes go to the module, so patching a launcher through this
    view patches the module (and restoring a value read through it restores the unwrapped function)."""

    __slots__ = ("_fastlm_module",)

    def __init__(self, module):
        object.__setattr__(self, "_fastlm_module", module)

    def __getattr__(self, name):
        value = getattr(self._fastlm_module, name)
        return _guarded(value) if isinstance(value, types.FunctionType) else value

    def __setattr__(self, name, value):
        setattr(self._fastlm_module, name, getattr(value, "_fastlm_unguarded", value))

    def __delattr__(self, name):
        delattr(self._fastlm_module, name)

    def __dir__(self):
        return dir(self._fastlm_module)

    def __repr__(self):
        return f"<device-guarded {self._fastlm_module.__name__}>"


def check_int64(op: str, name: str, v: int, *, span: int = 0) -> int:
    """v (and v + span, the largest value it is used with) must fit in int64, the kernels' type."""
    if not (INT64_MIN <= v and v + max(span, 0) <= INT64_MAX):
        also = f" (and so must {name} + {span}, the largest value used)" if span > 0 else ""
        raise ValueError(f"fastlm.ops.{op}: {name} must fit in int64, [-2**63, 2**63 - 1]{also}; got {v}")
    return int(v)


def emulate_bf16(backend: str, x: torch.Tensor) -> bool:
    """True when a Triton kernel would run through the interpreter on bf16 CPU tensors: its bf16
    tl.dot and bf16 arithmetic are wrong there, so the matrix and norm ops run the kernel on fp32
    copies and round the result to bf16 (rotary, sinusoidal and sampling compute in fp32 already)."""
    return backend == "triton" and interpreted_bf16(x)


def _nonoverlapping_by_strides(shape, strides) -> bool:
    """A sufficient test: sorted by stride, each stride exceeds the span of the smaller dims."""
    dims = sorted((st, n) for n, st in zip(shape, strides, strict=True) if n > 1)
    span = 0
    for st, n in dims:
        if st <= span:
            return False
        span += (n - 1) * st
    return True


def _element_offsets(t: torch.Tensor) -> torch.Tensor:
    offs = torch.full((), t.storage_offset(), dtype=torch.int64, device=t.device)
    for n, st in zip(t.shape, t.stride(), strict=True):
        offs = offs[..., None] + torch.arange(n, device=t.device, dtype=torch.int64) * st
    return offs.reshape(-1)


def has_internal_overlap(t: torch.Tensor) -> bool:
    """True when two elements of t share memory (an expanded or self-overlapping view)."""
    if t.numel() <= 1 or _nonoverlapping_by_strides(t.shape, t.stride()):
        return False
    if any(st == 0 and n > 1 for n, st in zip(t.shape, t.stride(), strict=True)):
        return True
    return bool(torch.unique(_element_offsets(t)).numel() != t.numel())


def _span_bytes(t: torch.Tensor) -> tuple[int, int]:
    lo = t.data_ptr()
    return lo, lo + (sum((n - 1) * st for n, st in zip(t.shape, t.stride(), strict=True)) + 1) * t.element_size()


def overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when a and b (same dtype) share an element of memory."""
    if a.numel() == 0 or b.numel() == 0 or a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    (a0, a1), (b0, b1) = _span_bytes(a), _span_bytes(b)
    if a1 <= b0 or b1 <= a0:
        return False
    if a.stride() == b.stride() and a.dim():
        # Slices of one tensor along one dim (q, k of a fused qkv): disjoint when the shift is at least
        # the first one's extent and the joined view does not overlap itself.
        delta = b.storage_offset() - a.storage_offset()
        lo, hi = (a, b) if delta >= 0 else (b, a)
        for d, st in enumerate(a.stride()):
            same_elsewhere = all(a.shape[e] == b.shape[e] for e in range(a.dim()) if e != d)
            if st > 0 and same_elsewhere and abs(delta) % st == 0 and abs(delta) // st >= lo.shape[d]:
                joined = list(lo.shape)
                joined[d] = abs(delta) // st + hi.shape[d]
                if _nonoverlapping_by_strides(joined, a.stride()):
                    return False
    return bool(torch.isin(_element_offsets(b), _element_offsets(a)).any())


def check_inplace_targets(op: str, **tensors) -> None:
    """In-place outputs must not alias: no tensor overlaps itself (expanded views) or another."""
    items = [(n, t) for n, t in tensors.items() if t is not None]
    for name, t in items:
        if has_internal_overlap(t):
            raise ValueError(
                f"fastlm.ops.{op}: inplace=True needs {name} to have no overlapping elements (an expanded or "
                f"self-overlapping view, strides {t.stride()} for shape {list(t.shape)}); pass a copy or use inplace=False"
            )
    for i, (na, a) in enumerate(items):
        for nb, b in items[i + 1:]:
            if a is b or overlap(a, b):
                raise ValueError(f"fastlm.ops.{op}: inplace=True needs {na} and {nb} in separate memory; they overlap")


_LAUNCHERS: dict[tuple[str, str], _LauncherModule] = {}


def launcher(backend: str, module: str):
    """The module holding an op's launchers for a kernel backend ("triton" or "cuda"), behind the
    device guard: each launcher runs under ``torch.cuda.device(d)``, d the device of the first CUDA
    tensor among its arguments, so a model spread over several GPUs launches every kernel on its
    tensors' device. This is the one place the ops make a device current."""
    key = (backend, module)
    view = _LAUNCHERS.get(key)
    if view is None:
        view = _LAUNCHERS[key] = _LauncherModule(importlib.import_module(f"fastlm.{backend}.{module}"))
    return view


def attention_options(softcap=0.0, alibi_slopes=None, dropout_p=0.0, seed=None) -> dict:
    """The attention options that are set (softcap, ALiBi, dropout) as launcher keywords; an unset
    one is not passed, so a launcher called without options sees the plain call."""
    opts = {}
    if softcap:
        opts["softcap"] = softcap
    if alibi_slopes is not None:
        opts["alibi_slopes"] = alibi_slopes
    if dropout_p:
        opts.update(dropout_p=dropout_p, seed=seed)
    return opts
