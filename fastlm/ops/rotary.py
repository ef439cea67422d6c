"""rotary and apply_rotary_pos_emb: validation, dispatch, autograd, torch.library.

The kernel backends run through custom ops whose launchers come from fastlm/triton/rotary.py or
fastlm/cuda/rotary.py:
    fastlm::rotary_fwd, fastlm::rotary_bwd          angles from integer positions, out of place
    fastlm::rotary_inplace                          the same rotation written into q and k
                                                    (mutates_args=("q", "k"))
    fastlm::rotary_inplace_one                      the rotation written into one tensor
                                                    (mutates_args=("x",)), for autograd
    fastlm::rotary_table_fwd, fastlm::rotary_table_bwd   cos/sin tables (Hugging Face's form)
    fastlm::rotary_table_inplace, fastlm::rotary_table_inplace_one   the table form in place
rotary_fwd and rotary_table_fwd carry their backward through register_autograd; the in-place ops,
which torch.library cannot give a formula, go through one autograd.Function per tensor (q, then
k) that marks it dirty and calls rotary_bwd (rotary_table_bwd): autograd lets a Function that
writes into a view (q.transpose(1, 2) of (B, S, H, D) storage) return only that one tensor. The
in-place table form gives no cos/sin gradient (ValueError when they require one): that needs the
q and k it overwrites. The in-place ops check first, on the real tensors (so also under
torch.compile), that q and k do not overlap themselves or each other. The packed (cu_seqlens)
form of rotary is the angle form on the (1, H, T, D) view with per-token positions formed by
torch ops on the device (a searchsorted, no sync). The torch backend is the reference,
differentiated by autograd.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor

from fastlm import backend as _backend
from fastlm.ops._common import (
    check_inplace_targets,
    check_int64,
    check_kernel_dtype,
    check_same_device,
    check_tensor,
    launcher,
)
from fastlm.reference import rotary as ref

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ---- angle form -----------------------------------------------------------------------------------


@torch.library.custom_op("fastlm::rotary_fwd", mutates_args=())
def _rotary_fwd(
    q: Tensor, k: Tensor, positions: Optional[Tensor], offset: int, theta: float, rotary_dim: int,
    interleaved: bool, backend: str,
) -> tuple[Tensor, Tensor]:
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    launcher(backend, "rotary").rotary_fwd(q, k, positions, offset, theta, rotary_dim, interleaved, q_out, k_out)
    return q_out, k_out


@_rotary_fwd.register_fake
def _(q, k, positions, offset, theta, rotary_dim, interleaved, backend):
    return torch.empty_like(q), torch.empty_like(k)


@torch.library.custom_op("fastlm::rotary_bwd", mutates_args=())
def _rotary_bwd(
    dq_out: Tensor, dk_out: Tensor, positions: Optional[Tensor], offset: int, theta: float, rotary_dim: int,
    interleaved: bool, backend: str,
) -> tuple[Tensor, Tensor]:
    dq, dk = torch.empty_like(dq_out), torch.empty_like(dk_out)
    launcher(backend, "rotary").rotary_bwd(dq_out, dk_out, positions, offset, theta, rotary_dim, interleaved, dq, dk)
    return dq, dk


@_rotary_bwd.register_fake
def _(dq_out, dk_out, positions, offset, theta, rotary_dim, interleaved, backend):
    return torch.empty_like(dq_out), torch.empty_like(dk_out)


@torch.library.custom_op("fastlm::rotary_inplace", mutates_args=("q", "k"))
def _rotary_inplace(
    q: Tensor, k: Tensor, positions: Optional[Tensor], offset: int, theta: float, rotary_dim: int,
    interleaved: bool, backend: str,
) -> None:
    check_inplace_targets("rotary", q=q, k=k)
    launcher(backend, "rotary").rotary_fwd(q, k, positions, offset, theta, rotary_dim, interleaved, q, k)


@_rotary_inplace.register_fake
def _(q, k, positions, offset, theta, rotary_dim, interleaved, backend):
    return None


def _no_heads(x: Tensor) -> Tensor:
    return x.new_empty((x.shape[0], 0, x.shape[2], x.shape[3]))


@torch.library.custom_op("fastlm::rotary_inplace_one", mutates_args=("x",))
def _rotary_inplace_one(
    x: Tensor, other: Tensor, name: str, other_name: str, positions: Optional[Tensor], offset: int, theta: float,
    rotary_dim: int, interleaved: bool, backend: str,
) -> None:
    """Rotate x (q or k) in place; other (the partner) is only checked not to overlap x."""
    check_inplace_targets("rotary", **{name: x, other_name: other})
    launcher(backend, "rotary").rotary_fwd(x, _no_heads(x), positions, offset, theta, rotary_dim, interleaved, x, _no_heads(x))


@_rotary_inplace_one.register_fake
def _(x, other, name, other_name, positions, offset, theta, rotary_dim, interleaved, backend):
    return None


def _rotary_setup(ctx, inputs, output):
    q, k, positions, offset, theta, rotary_dim, interleaved, backend = inputs
    ctx.save_for_backward(positions)
    ctx.args = (offset, theta, rotary_dim, interleaved, backend)


def _rotary_backward(ctx, dq_out, dk_out):
    (positions,) = ctx.saved_tensors
    dq, dk = _rotary_bwd(dq_out, dk_out, positions, *ctx.args)
    return dq, dk, None, None, None, None, None, None


_rotary_fwd.register_autograd(_rotary_backward, setup_context=_rotary_setup)


class _RotaryInplace(torch.autograd.Function):
    """In-place rotation of one tensor x with a gradient: fastlm::rotary_inplace_one forward,
    fastlm::rotary_bwd backward."""

    @staticmethod
    def forward(ctx, x, other, name, other_name, positions, offset, theta, rotary_dim, interleaved, backend):
        _rotary_inplace_one(x, other, name, other_name, positions, offset, theta, rotary_dim, interleaved, backend)
        ctx.mark_dirty(x)
        ctx.save_for_backward(positions)
        ctx.args = (offset, theta, rotary_dim, interleaved, backend)
        return x

    @staticmethod
    def backward(ctx, dx_out):
        (positions,) = ctx.saved_tensors
        dx, _ = _rotary_bwd(dx_out, _no_heads(dx_out), positions, *ctx.args)
        return dx, None, None, None, None, None, None, None, None, None


def _check_qk(op: str, q, k) -> None:
    check_tensor("q", q, op=op, dtypes=FLOAT_DTYPES)
    check_tensor("k", k, op=op, dtypes=FLOAT_DTYPES)
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(
            f"fastlm.ops.{op}: q and k must be 4-D (batch, heads, seq, head_dim); got q {list(q.shape)}, "
            f"k {list(k.shape)}"
        )
    if k.dtype != q.dtype:
        raise TypeError(f"fastlm.ops.{op}: k dtype {k.dtype} != q dtype {q.dtype}")
    check_same_device(op, "q", q, k=k)
    if (q.shape[0], q.shape[2], q.shape[3]) != (k.shape[0], k.shape[2], k.shape[3]):
        raise ValueError(
            f"fastlm.ops.{op}: q {list(q.shape)} and k {list(k.shape)} must agree in batch, seq and head_dim "
            "(dims 0, 2, 3; head counts may differ)"
        )


def _check_rotary_dim(op: str, rotary_dim, head_dim: int) -> int:
    if rotary_dim is None:
        if head_dim % 2:
            raise ValueError(f"fastlm.ops.{op}: rotary_dim must be even; it defaults to head_dim, which is {head_dim}")
        return head_dim
    if isinstance(rotary_dim, bool) or not isinstance(rotary_dim, numbers.Integral):
        raise TypeError(f"fastlm.ops.{op}: rotary_dim must be an int or None, got {type(rotary_dim).__name__}")
    rotary_dim = int(rotary_dim)
    if rotary_dim <= 0 or rotary_dim % 2:
        raise ValueError(f"fastlm.ops.{op}: rotary_dim must be even and positive, got {rotary_dim}")
    if rotary_dim > head_dim:
        raise ValueError(f"fastlm.ops.{op}: rotary_dim {rotary_dim} must be <= head_dim {head_dim}")
    return rotary_dim


def _check_positions(op: str, positions, q: Tensor) -> tuple[Optional[Tensor], int]:
    """(positions tensor (S,) or (B|1, S), or None; integer offset)."""
    B, S = q.shape[0], q.shape[2]
    if isinstance(positions, numbers.Integral) and not isinstance(positions, bool):
        return None, check_int64(op, "the positions offset", int(positions), span=S - 1)
    if not isinstance(positions, torch.Tensor):
        raise TypeError(
            f"fastlm.ops.{op}: positions must be an integer tensor of shape (S,) or (B, S), or an int offset; "
            f"got {type(positions).__name__}"
        )
    if positions.is_floating_point() or positions.is_complex() or positions.dtype == torch.bool:
        raise TypeError(f"fastlm.ops.{op}: positions must be an integer tensor (int32 or int64), got {positions.dtype}")
    check_same_device(op, "q", q, positions=positions)
    if positions.dim() == 0:
        return positions + torch.arange(S, device=positions.device, dtype=positions.dtype), 0
    ok = (positions.dim() == 1 and positions.shape[0] == S) or (
        positions.dim() == 2 and positions.shape[1] == S and positions.shape[0] in (1, B)
    )
    if not ok:
        raise ValueError(
            f"fastlm.ops.{op}: positions must have shape (S,) = ({S},) or (B, S) = ({B}, {S}); got {list(positions.shape)}"
        )
    return positions, 0


def _check_theta(op: str, theta) -> float:
    if isinstance(theta, bool) or not isinstance(theta, numbers.Real) or not math.isfinite(theta) or theta <= 0:
        raise ValueError(f"fastlm.ops.{op}: theta must be a finite number > 0, got {theta!r}")
    return float(theta)


def _check_packed(op: str, q, k, cu_seqlens, positions) -> Tensor:
    """The per-token positions (T,) int64 of the packed form: offsets[b] + t - cu_seqlens[b] for row
    t of sequence b. Shapes, dtypes and devices always; the cu_seqlens values (start at 0,
    non-decreasing, end at T) only on CPU tensors outside compilation (no device sync)."""
    check_tensor("q", q, op=op, dtypes=FLOAT_DTYPES)
    check_tensor("k", k, op=op, dtypes=FLOAT_DTYPES)
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(
            f"fastlm.ops.{op}: with cu_seqlens, q and k must be 3-D (total, heads, head_dim); got q {list(q.shape)}, "
            f"k {list(k.shape)}"
        )
    if (q.shape[0], q.shape[2]) != (k.shape[0], k.shape[2]):
        raise ValueError(
            f"fastlm.ops.{op}: q {list(q.shape)} and k {list(k.shape)} must agree in total and head_dim (dims 0, 2)"
        )
    check_tensor("cu_seqlens", cu_seqlens, op=op)
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"fastlm.ops.{op}: cu_seqlens must be int32, got {cu_seqlens.dtype} (use .int())")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:
        raise ValueError(f"fastlm.ops.{op}: cu_seqlens must be 1-D of length batch + 1 >= 1, got shape {list(cu_seqlens.shape)}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"fastlm.ops.{op}: cu_seqlens is on {cu_seqlens.device} but q is on {q.device}")
    T, B = q.shape[0], cu_seqlens.shape[0] - 1
    if B == 0 and T > 0:
        raise ValueError(f"fastlm.ops.{op}: cu_seqlens of length 1 holds no sequence but q has {T} rows")
    if q.device.type == "cpu" and not torch.compiler.is_compiling():
        vals = cu_seqlens.tolist()
        if vals[0] != 0:
            raise ValueError(f"fastlm.ops.{op}: cu_seqlens must start at 0, got {vals[0]}")
        for i in range(B):
            if vals[i + 1] < vals[i]:
                raise ValueError(f"fastlm.ops.{op}: cu_seqlens must be non-decreasing, got {vals[i]} then {vals[i + 1]} at index {i}")
        if vals[-1] != T:
            raise ValueError(f"fastlm.ops.{op}: cu_seqlens[-1] must equal the rows of q and k ({T}), got {vals[-1]}")
    if isinstance(positions, numbers.Integral) and not isinstance(positions, bool):
        offsets = check_int64(op, "the positions offset", int(positions), span=max(T - 1, 0))
    elif isinstance(positions, torch.Tensor) and not (
        positions.is_floating_point() or positions.is_complex() or positions.dtype == torch.bool
    ):
        check_same_device(op, "q", q, positions=positions)
        if positions.dim() == 0:
            offsets = positions.to(torch.int64)
        elif positions.dim() == 1 and positions.shape[0] == B:
            offsets = positions.to(torch.int64)
        else:
            raise ValueError(
                f"fastlm.ops.{op}: with cu_seqlens, positions must be an int or 0-d tensor offset or a (B,) = ({B},) "
                f"tensor of per-sequence offsets; got shape {list(positions.shape)}"
            )
    else:
        raise TypeError(
            f"fastlm.ops.{op}: with cu_seqlens, positions must be an int offset or an integer tensor of per-sequence "
            f"offsets (B,); got {type(positions).__name__ if not isinstance(positions, torch.Tensor) else positions.dtype}"
        )
    t = torch.arange(T, device=q.device, dtype=torch.int32)
    seq = torch.searchsorted(cu_seqlens[1:], t, right=True).clamp_max(max(B - 1, 0))
    pos = (t - cu_seqlens[seq]).to(torch.int64)
    if isinstance(offsets, torch.Tensor):
        return pos + (offsets[seq] if offsets.dim() else offsets)
    return pos + offsets


def rotary(q, k, positions, *, theta=10000.0, rotary_dim=None, interleaved=False, inplace=False, cu_seqlens=None,
           backend=None):
    """Rotary position embedding of q (B, Hq, S, D) and k (B, Hk, S, D) in one launch; returns (q, k).

    Pair p of the first ``rotary_dim`` dims (default D) turns by pos * theta^(-2p/rotary_dim);
    ``interleaved=False`` pairs (p, p + R/2) (GPT-NeoX / Llama), True pairs (2p, 2p + 1) (GPT-J).
    ``positions``: an integer tensor (S,) or (B, S) (any order), or an int (or 0-d tensor) offset
    meaning offset + 0 .. S - 1. Storage (B, S, H, D) is passed as the view q.transpose(1, 2): strides
    are followed, no copy. ``inplace=True`` writes into q and k and returns them (also under autograd,
    for that transposed layout too); q and k must then not overlap themselves (expanded views) or
    each other (ValueError); otherwise q and k are left untouched and new tensors come back with
    their layout. Angles are fp32-exact at any position, on every backend.

    Packed form (``cu_seqlens`` int32 (B + 1,), prefix sums from 0 to T, as attention_varlen): q
    (T, Hq, D), k (T, Hk, D); row t of sequence b (cu_seqlens[b] <= t < cu_seqlens[b + 1]) is at
    position offset + t - cu_seqlens[b], ``positions`` giving the offset: an int (or 0-d tensor)
    for every sequence or an integer tensor (B,), one per sequence (e.g. cached lengths). The
    cu_seqlens values are checked on CPU tensors only (a check on CUDA would cost a device sync).
    """
    op = "rotary"
    if cu_seqlens is not None:
        pos = _check_packed(op, q, k, cu_seqlens, positions)
        q4, k4 = q.transpose(0, 1)[None], k.transpose(0, 1)[None]
        qo, ko = rotary(q4, k4, pos, theta=theta, rotary_dim=rotary_dim, interleaved=interleaved, inplace=inplace,
                        backend=backend)
        if inplace:
            return q, k
        return qo[0].transpose(0, 1), ko[0].transpose(0, 1)
    _check_qk(op, q, k)
    D = q.shape[3]
    rotary_dim = _check_rotary_dim(op, rotary_dim, D)
    pos, offset = _check_positions(op, positions, q)
    theta = _check_theta(op, theta)
    if not isinstance(interleaved, bool) or not isinstance(inplace, bool):
        raise TypeError(f"fastlm.ops.{op}: interleaved and inplace must be bools")
    name = _backend.resolve(backend, q.device, op)
    if inplace and name == "torch" and not torch.compiler.is_compiling():
        check_inplace_targets(op, q=q, k=k)
    if name == "torch":
        qo, ko = ref.rotary(q, k, pos if pos is not None else offset, theta, rotary_dim, interleaved)
        if inplace:
            return q.copy_(qo), k.copy_(ko)
        return qo, ko
    check_kernel_dtype(op, name, q=q, k=k)
    if pos is not None and pos.dtype not in (torch.int32, torch.int64):
        pos = pos.to(torch.int64)
    args = (pos, offset, theta, rotary_dim, interleaved, name)
    if not inplace:
        return _rotary_fwd(q, k, *args)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        return _RotaryInplace.apply(q, k, "q", "k", *args), _RotaryInplace.apply(k, q, "k", "q", *args)
    _rotary_inplace(q, k, *args)
    return q, k


# ---- table form (Hugging Face) --------------------------------------------------------------------


@torch.library.custom_op("fastlm::rotary_table_fwd", mutates_args=())
def _rotary_table_fwd(
    q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, backend: str, interleaved: bool = False
) -> tuple[Tensor, Tensor]:
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    launcher(backend, "rotary").rotary_table_fwd(q, k, cos, sin, q_out, k_out, interleaved)
    return q_out, k_out


@_rotary_table_fwd.register_fake
def _(q, k, cos, sin, backend, interleaved=False):
    return torch.empty_like(q), torch.empty_like(k)


@torch.library.custom_op("fastlm::rotary_table_bwd", mutates_args=())
def _rotary_table_bwd(
    dq_out: Tensor, dk_out: Tensor, cos: Tensor, sin: Tensor, backend: str, interleaved: bool = False
) -> tuple[Tensor, Tensor]:
    dq, dk = torch.empty_like(dq_out), torch.empty_like(dk_out)
    launcher(backend, "rotary").rotary_table_bwd(dq_out, dk_out, cos, sin, dq, dk, interleaved)
    return dq, dk


@_rotary_table_bwd.register_fake
def _(dq_out, dk_out, cos, sin, backend, interleaved=False):
    return torch.empty_like(dq_out), torch.empty_like(dk_out)


@torch.library.custom_op("fastlm::rotary_table_inplace", mutates_args=("q", "k"))
def _rotary_table_inplace(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, backend: str, interleaved: bool) -> None:
    check_inplace_targets("apply_rotary_pos_emb", q=q, k=k)
    launcher(backend, "rotary").rotary_table_fwd(q, k, cos, sin, q, k, interleaved)


@_rotary_table_inplace.register_fake
def _(q, k, cos, sin, backend, interleaved):
    return None


@torch.library.custom_op("fastlm::rotary_table_inplace_one", mutates_args=("x",))
def _rotary_table_inplace_one(
    x: Tensor, other: Tensor, name: str, other_name: str, cos: Tensor, sin: Tensor, backend: str, interleaved: bool
) -> None:
    """The table form on x (q or k) in place; other (the partner) is only checked not to overlap x."""
    check_inplace_targets("apply_rotary_pos_emb", **{name: x, other_name: other})
    launcher(backend, "rotary").rotary_table_fwd(x, _no_heads(x), cos, sin, x, _no_heads(x), interleaved)


@_rotary_table_inplace_one.register_fake
def _(x, other, name, other_name, cos, sin, backend, interleaved):
    return None


def _table_setup(ctx, inputs, output):
    q, k, cos, sin, backend, interleaved = inputs
    ctx.table_grad = bool(ctx.needs_input_grad[2] or ctx.needs_input_grad[3])
    ctx.save_for_backward(cos, sin, q if ctx.table_grad else None, k if ctx.table_grad else None)
    ctx.backend = backend
    ctx.interleaved = interleaved


def _table_grads(q, k, dq_out, dk_out, cos, interleaved):
    """d cos = sum over heads (and a broadcast batch) of dout * x; d sin = of dout * rotate_half(x)
    (rotate_pairs(x) when interleaved), over the first R dims (plain torch reductions: cos/sin
    rarely need a gradient)."""
    R = cos.shape[-1]
    ct = ref.compute_dtype(q)
    rot = ref.rotate_pairs if interleaved else ref.rotate_half
    dc = ds = 0
    for x, g in ((q, dq_out), (k, dk_out)):
        xr, gr = x[..., :R].to(ct), g[..., :R].to(ct)
        dc = dc + (gr * xr).sum(1)
        ds = ds + (gr * rot(xr)).sum(1)
    if cos.shape[0] == 1 and dc.shape[0] != 1:
        dc, ds = dc.sum(0, keepdim=True), ds.sum(0, keepdim=True)
    return dc.to(cos.dtype), ds.to(cos.dtype)


def _table_backward(ctx, dq_out, dk_out):
    cos, sin, q, k = ctx.saved_tensors
    dq, dk = _rotary_table_bwd(dq_out, dk_out, cos, sin, ctx.backend, ctx.interleaved)
    dcos = dsin = None
    if ctx.table_grad:
        dcos, dsin = _table_grads(q, k, dq_out, dk_out, cos, ctx.interleaved)
    return dq, dk, dcos, dsin, None, None


_rotary_table_fwd.register_autograd(_table_backward, setup_context=_table_setup)


class _RotaryTableInplace(torch.autograd.Function):
    """The table form on one tensor x in place with a gradient for x (none for cos/sin):
    fastlm::rotary_table_inplace_one forward, fastlm::rotary_table_bwd backward."""

    @staticmethod
    def forward(ctx, x, other, name, other_name, cos, sin, backend, interleaved):
        _rotary_table_inplace_one(x, other, name, other_name, cos, sin, backend, interleaved)
        ctx.mark_dirty(x)
        ctx.save_for_backward(cos, sin)
        ctx.args = (backend, interleaved)
        return x

    @staticmethod
    def backward(ctx, dx_out):
        cos, sin = ctx.saved_tensors
        dx, _ = _rotary_table_bwd(dx_out, _no_heads(dx_out), cos, sin, *ctx.args)
        return dx, None, None, None, None, None, None, None


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1, *, interleaved=False, inplace=False, backend=None):
    """Hugging Face Llama's ``apply_rotary_pos_emb``: q * cos + rotate_half(q) * sin (and for k), with
    cos/sin unsqueezed at ``unsqueeze_dim`` to broadcast over heads: 1 for q, k of shape
    (B, H, S, D), 2 for (B, S, H, D). cos, sin: (B, S, R) or (S, R) (read as (1, S, R)), R even and
    <= D; dims R..D-1 pass through, as in HF's partial-rotary models. Output dtype q's; gradients
    flow to q, k and (by plain torch reductions) to cos and sin.

    ``interleaved=True``: pairs (2p, 2p + 1) (GPT-J's rotate_every_two): q * cos + rotate_pairs(q) * sin
    with rotate_pairs(x)[2p] = -x[2p + 1], rotate_pairs(x)[2p + 1] = x[2p] (tables then hold each
    pair's factor twice in a row, cos[..., 2p] = cos[..., 2p + 1] for a rotation). ``inplace=True``
    writes into q and k and returns them (q and k must not overlap themselves or each other,
    ValueError); gradients then flow to q and k but not to cos and sin (ValueError if they require
    one under grad mode: their gradient needs the overwritten inputs)."""
    op = "apply_rotary_pos_emb"
    check_tensor("q", q, op=op, dtypes=FLOAT_DTYPES)
    check_tensor("k", k, op=op, dtypes=FLOAT_DTYPES)
    check_tensor("cos", cos, op=op, dtypes=FLOAT_DTYPES)
    check_tensor("sin", sin, op=op, dtypes=FLOAT_DTYPES)
    if isinstance(unsqueeze_dim, bool) or not isinstance(unsqueeze_dim, numbers.Integral):
        raise TypeError(f"fastlm.ops.{op}: unsqueeze_dim must be an int, got {type(unsqueeze_dim).__name__}")
    u = int(unsqueeze_dim) + (4 if unsqueeze_dim < 0 else 0)
    if u not in (1, 2):
        raise ValueError(
            f"fastlm.ops.{op}: unsqueeze_dim must be 1 (q, k as (B, H, S, D)) or 2 ((B, S, H, D)), got {unsqueeze_dim}"
        )
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"fastlm.ops.{op}: q and k must be 4-D; got q {list(q.shape)}, k {list(k.shape)}")
    qv, kv = (q, k) if u == 1 else (q.transpose(1, 2), k.transpose(1, 2))
    _check_qk(op, qv, kv)
    B, _, S, D = qv.shape
    if cos.shape != sin.shape:
        raise ValueError(f"fastlm.ops.{op}: cos {list(cos.shape)} and sin {list(sin.shape)} must have the same shape")
    if cos.dtype != sin.dtype:
        raise TypeError(f"fastlm.ops.{op}: cos dtype {cos.dtype} != sin dtype {sin.dtype}")
    check_same_device(op, "q", q, cos=cos, sin=sin)
    c3, s3 = (cos[None], sin[None]) if cos.dim() == 2 else (cos, sin)
    if c3.dim() != 3 or c3.shape[1] != S or c3.shape[0] not in (1, B):
        raise ValueError(
            f"fastlm.ops.{op}: cos and sin must have shape (B, S, R) = ({B}, {S}, R) or (S, R); got {list(cos.shape)}"
        )
    R = c3.shape[2]
    if R == 0 or R % 2 or R > D:
        raise ValueError(f"fastlm.ops.{op}: the rotary size cos.shape[-1] = {R} must be even, positive and <= head_dim {D}")
    if not isinstance(interleaved, bool) or not isinstance(inplace, bool):
        raise TypeError(f"fastlm.ops.{op}: interleaved and inplace must be bools")
    grad = torch.is_grad_enabled()
    if inplace and grad and (cos.requires_grad or sin.requires_grad):
        raise ValueError(
            f"fastlm.ops.{op}: inplace=True gives no gradient for cos and sin (it needs the q and k it overwrites); "
            "detach cos and sin or use inplace=False"
        )
    name = _backend.resolve(backend, q.device, op)
    if inplace and name == "torch" and not torch.compiler.is_compiling():
        check_inplace_targets(op, q=q, k=k)
    if name == "torch":
        qo, ko = ref.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim, interleaved)
        if inplace:
            return q.copy_(qo), k.copy_(ko)
        return qo, ko
    check_kernel_dtype(op, name, q=q, k=k, cos=cos, sin=sin)
    if not inplace:
        qo, ko = _rotary_table_fwd(qv, kv, c3, s3, name, interleaved)
        return (qo, ko) if u == 1 else (qo.transpose(1, 2), ko.transpose(1, 2))
    if grad and (q.requires_grad or k.requires_grad):
        _RotaryTableInplace.apply(qv, kv, "q", "k", c3, s3, name, interleaved)
        _RotaryTableInplace.apply(kv, qv, "k", "q", c3, s3, name, interleaved)
    else:
        _rotary_table_inplace(qv, kv, c3, s3, name, interleaved)
    return q, k
