"""sinusoidal_position_encoding and embed_sinusoidal: validation, dispatch, autograd, torch.library.

The kernel backends run through custom ops whose launchers come from fastlm/triton/sinusoidal.py or
fastlm/cuda/sinusoidal.py:
    fastlm::sinusoidal_fwd                 the table PE(positions)
    fastlm::embed_sinusoidal_fwd / _bwd    weight[ids] * scale + PE(positions), and the weight
                                           gradient (atomic, or deterministic by sorted runs)
The torch backend is the reference, differentiated by autograd.

Token ids are checked against [0, V) by default (``check=True``): one min/max reduction and one
host sync, done inside the custom op so it also runs under torch.compile. With ``check=False``
(CUDA-graph capture, or ids known good) nothing syncs; an out-of-range id (negative ones too) is
still never read, on every backend: its output row is NaN and it adds nothing to the weight
gradient. Ids and positions may have any integer dtype.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor

from fastlm import backend as _backend
from fastlm.ops._common import check_int64, check_kernel_dtype, check_same_device, check_tensor, launcher
from fastlm.reference import sinusoidal as ref

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _is_int_tensor(t) -> bool:
    return isinstance(t, torch.Tensor) and not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool


def _as_index(t: Tensor) -> Tensor:
    return t if t.dtype in (torch.int32, torch.int64) else t.to(torch.int64)


def check_ids_in_range(op: str, input_ids: Tensor, num_embeddings: int) -> None:
    """Raise ValueError if an id lies outside [0, num_embeddings) (one reduction, one host sync)."""
    if input_ids.numel() == 0:
        return
    lo, hi = torch.stack(torch.aminmax(input_ids.reshape(-1))).tolist()
    if lo < 0 or hi >= num_embeddings:
        raise ValueError(
            f"fastlm.ops.{op}: input_ids out of range: found ids in [{lo}, {hi}] but weight has "
            f"{num_embeddings} rows (valid ids 0 .. {num_embeddings - 1})"
        )


# ---- the table ------------------------------------------------------------------------------------


@torch.library.custom_op("fastlm::sinusoidal_fwd", mutates_args=())
def _sinusoidal_fwd(positions: Tensor, dim: int, base: float, dtype: torch.dtype, backend: str) -> Tensor:
    out = positions.new_empty((*positions.shape, dim), dtype=dtype)
    launcher(backend, "sinusoidal").sinusoidal_fwd(positions, base, out)
    return out


@_sinusoidal_fwd.register_fake
def _(positions, dim, base, dtype, backend):
    return positions.new_empty((*positions.shape, dim), dtype=dtype)


def _check_base(op: str, base) -> float:
    if isinstance(base, bool) or not isinstance(base, numbers.Real) or not math.isfinite(base) or base <= 0:
        raise ValueError(f"fastlm.ops.{op}: base must be a finite number > 0, got {base!r}")
    return float(base)


def sinusoidal_position_encoding(positions, dim, *, base=10000.0, dtype=torch.float32, backend=None):
    """The sinusoidal table of "Attention Is All You Need", computed by a kernel:
    out[..., 2i] = sin(pos * base^(-2i/dim)), out[..., 2i + 1] = cos(pos * base^(-2i/dim)), shape
    positions.shape + (dim,). ``positions``: an integer tensor (any shape, any order), or an int n
    meaning 0 .. n - 1. fp32-exact at any position."""
    op = "sinusoidal_position_encoding"
    if isinstance(positions, numbers.Integral) and not isinstance(positions, bool):
        if positions < 0:
            raise ValueError(f"fastlm.ops.{op}: an int positions means 0 .. n - 1 and must be >= 0, got {positions}")
        positions = torch.arange(check_int64(op, "positions", int(positions)))
    if not _is_int_tensor(positions):
        what = positions.dtype if isinstance(positions, torch.Tensor) else type(positions).__name__
        raise TypeError(f"fastlm.ops.{op}: positions must be an integer tensor or an int, got {what}")
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim <= 0:
        raise ValueError(f"fastlm.ops.{op}: dim must be a positive int, got {dim!r}")
    check_int64(op, "dim", int(dim))
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"fastlm.ops.{op}: dtype must be float32, float16, bfloat16 or float64, got {dtype}")
    base = _check_base(op, base)
    name = _backend.resolve(backend, positions.device, op)
    if name == "torch":
        return ref.sinusoidal_position_encoding(positions, int(dim), base, dtype)
    if dtype == torch.float64:
        raise TypeError(f"fastlm.ops.{op}: the {name} backend supports float32, float16 and bfloat16; dtype is float64 (use backend='torch' for it)")
    p2 = _as_index(positions).reshape(math.prod(positions.shape[:-1]), positions.shape[-1]) if positions.dim() else positions.reshape(1, 1)
    return _sinusoidal_fwd(p2, int(dim), base, dtype, name).view(*positions.shape, int(dim))


# ---- embedding + table ----------------------------------------------------------------------------


@torch.library.custom_op("fastlm::embed_sinusoidal_fwd", mutates_args=())
def _embed_sinusoidal_fwd(
    input_ids: Tensor, weight: Tensor, positions: Optional[Tensor], offset: int, scale: Optional[float],
    base: float, check: bool, deterministic: bool, backend: str,
) -> Tensor:
    if check:
        check_ids_in_range("embed_sinusoidal", input_ids, weight.shape[0])
    out = weight.new_empty((*input_ids.shape, weight.shape[1]))
    launcher(backend, "sinusoidal").embed_sinusoidal_fwd(input_ids, weight, positions, offset, scale, base, out)
    return out


@_embed_sinusoidal_fwd.register_fake
def _(input_ids, weight, positions, offset, scale, base, check, deterministic, backend):
    return weight.new_empty((*input_ids.shape, weight.shape[1]))


@torch.library.custom_op("fastlm::embed_sinusoidal_bwd", mutates_args=())
def _embed_sinusoidal_bwd(
    dout: Tensor, input_ids: Tensor, num_embeddings: int, scale: Optional[float], deterministic: bool, backend: str,
) -> Tensor:
    dweight = dout.new_empty((num_embeddings, dout.shape[-1]))
    launcher(backend, "sinusoidal").embed_sinusoidal_bwd(dout, input_ids, scale, deterministic, dweight)
    return dweight


@_embed_sinusoidal_bwd.register_fake
def _(dout, input_ids, num_embeddings, scale, deterministic, backend):
    return dout.new_empty((num_embeddings, dout.shape[-1]))


def _embed_setup(ctx, inputs, output):
    input_ids, weight, positions, offset, scale, base, check, deterministic, backend = inputs
    ctx.save_for_backward(input_ids)
    ctx.num_embeddings, ctx.scale, ctx.deterministic, ctx.backend = weight.shape[0], scale, deterministic, backend


def _embed_backward(ctx, dout):
    (input_ids,) = ctx.saved_tensors
    dweight = None
    if ctx.needs_input_grad[1]:
        dweight = _embed_sinusoidal_bwd(dout, input_ids, ctx.num_embeddings, ctx.scale, ctx.deterministic, ctx.backend)
    return None, dweight, None, None, None, None, None, None, None


_embed_sinusoidal_fwd.register_autograd(_embed_backward, setup_context=_embed_setup)


def embed_sinusoidal(input_ids, weight, *, positions=None, scale=None, base=10000.0, check=True,
                     deterministic=None, backend=None):
    """One fused kernel: weight[input_ids] * scale + PE(positions), shape input_ids.shape + (D,), in
    weight's dtype (weight: (V, D), like nn.Embedding's). ``positions``: None (0 .. S - 1 along the
    last dim of input_ids), an int offset to that, or an integer tensor of shape (S,) or
    input_ids.shape. ``scale``: None or a number (e.g. sqrt(D)). The backward accumulates the weight
    gradient; ``deterministic`` (default: torch.are_deterministic_algorithms_enabled()) sums each
    token's rows in a fixed order without atomics. ``check=True`` raises ValueError for ids outside
    [0, V) at the cost of one host sync; with check=False (no sync: CUDA graphs) an out-of-range id
    (negative ones too: they never wrap) gives a NaN row and no gradient, and is never read, on every
    backend. input_ids and positions may have any integer dtype."""
    op = "embed_sinusoidal"
    if not _is_int_tensor(input_ids):
        what = input_ids.dtype if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise TypeError(f"fastlm.ops.{op}: input_ids must be an integer tensor, got {what}")
    check_tensor("weight", weight, op=op, dtypes=FLOAT_DTYPES)
    if weight.dim() != 2:
        raise ValueError(f"fastlm.ops.{op}: weight must be 2-D (num_embeddings, embedding_dim), got {list(weight.shape)}")
    check_same_device(op, "weight", weight, input_ids=input_ids)
    ids = input_ids.reshape(1) if input_ids.dim() == 0 else input_ids
    S = ids.shape[-1]
    offset, pos = 0, None
    if isinstance(positions, numbers.Integral) and not isinstance(positions, bool):
        offset = check_int64(op, "the positions offset", int(positions), span=S - 1)
    elif positions is not None:
        if not _is_int_tensor(positions):
            what = positions.dtype if isinstance(positions, torch.Tensor) else type(positions).__name__
            raise TypeError(f"fastlm.ops.{op}: positions must be None, an int offset or an integer tensor, got {what}")
        check_same_device(op, "weight", weight, positions=positions)
        if tuple(positions.shape) not in ((S,), tuple(ids.shape)):
            raise ValueError(
                f"fastlm.ops.{op}: positions must have shape (S,) = ({S},) or input_ids' shape {list(input_ids.shape)}; "
                f"got {list(positions.shape)}"
            )
        pos = positions
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
            raise ValueError(f"fastlm.ops.{op}: scale must be None or a finite number, got {scale!r}")
        scale = float(scale)
    base = _check_base(op, base)
    if deterministic is not None and not isinstance(deterministic, bool):
        raise TypeError(f"fastlm.ops.{op}: deterministic must be None or a bool")
    name = _backend.resolve(backend, weight.device, op)
    if name == "torch":
        if check:
            check_ids_in_range(op, input_ids, weight.shape[0])
        out = ref.embed_sinusoidal(ids, weight, pos if pos is not None else offset, scale, base)
        return out.view(*input_ids.shape, weight.shape[1])
    check_kernel_dtype(op, name, weight=weight)
    T = math.prod(ids.shape[:-1])
    ids2 = _as_index(ids).reshape(T, S)
    if pos is not None:
        pos = _as_index(pos).reshape(-1 if pos.dim() > 1 else 1, S) if S else pos.reshape(pos.shape[:-1].numel(), 0)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    out = _embed_sinusoidal_fwd(ids2, weight, pos, offset, scale, base, bool(check), deterministic, name)
    return out.view(*input_ids.shape, weight.shape[1])
