"""attention, attention_varlen, scaled_dot_product_attention, decode_attention: validation, dispatch, autograd, torch.library.

The kernel backends run through three custom ops:
    fastlm::attention_fwd(q, k, v, causal, scale, window_left, window_right, deterministic, backend,
                          softcap=0.0, alibi_slopes=None, dropout_p=0.0, seed=None) -> (out, lse)
    fastlm::attention_bwd(dout, dlse, q, k, v, out, lse, causal, scale, window_left, window_right,
                          deterministic, backend, softcap=0.0, alibi_slopes=None, dropout_p=0.0, seed=None) -> (dq, dk, dv)
    fastlm::decode_attention(q, k_cache, v_cache, cache_seqlens, scale, window_left, window_right, backend,
                             block_table=None, softcap=0.0, alibi_slopes=None) -> (out, lse)
    fastlm::paged_kv_append(k_cache!, v_cache!, block_table, cache_seqlens, k_new, v_new, backend) -> ()  (in place)
    fastlm::attention_varlen_fwd / attention_varlen_bwd: the same on packed (total_rows, H, D) tensors with
        cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k after v (and after lse in the backward)
whose launchers come from fastlm/triton/attention.py or fastlm/cuda/attention.py. The forward
always returns the log-sum-exp (the backward recomputes P from it); a window side of -1 means
unbounded. The backward is a kernel (never autograd through the reference) and is deterministic
on every backend: no atomics, each gradient element is written by one program in a fixed order,
so ``deterministic=True`` costs nothing and ``deterministic=False`` gives the same bits. The
"torch" backend is the reference (fastlm/reference/attention.py), differentiated by autograd.
decode_attention is inference-only (no autograd formula is registered). Under the Triton
interpreter (CPU) bf16 arithmetic and bf16 tl.dot are wrong, so there the kernels run on fp32
copies and the result is rounded to bf16.

Options (the contract: fastlm/reference/attention.py): ``softcap`` c (S <- c tanh(S / c)),
``alibi_slopes`` (S <- S - slope_h |i + off - j|; fp32 (Hq,) or (B, Hq); no gradient reaches them)
and ``dropout_p`` (training) in attention and attention_varlen, softcap and ALiBi in
decode_attention. The ops validate them and hand a launcher only the options that are set, so an
unset option is the old call, bit for bit. Dropout's seed is an int64 tensor [seed, offset] drawn
once per forward (torch.randint on q's device, from ``generator`` or torch's default generator, so
torch.manual_seed reproduces it), or given as ``seed=``; the forward saves it and the backward
recomputes the same Philox mask from it. The mask is a function of the seed and the packed
(query row, key row, head) alone, so every backend (torch, triton, cuda) drops the same entries.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastlm import backend as _backend
from fastlm.ops._common import (
    KERNEL_DTYPES,
    attention_options,
    check_int64,
    check_kernel_dtype,
    check_same_device,
    check_tensor,
    emulate_bf16,
    launcher,
    overlap,
)
from fastlm.reference import attention as ref

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MAX_HEAD_DIM = 256
MAX_DECODE_QUERIES = 16


def _unit_d(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 or t.numel() == 0 else t.contiguous()


# ---- custom ops ----------------------------------------------------------------------------------


@torch.library.custom_op("fastlm::attention_fwd", mutates_args=())
def _attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, window_left: int, window_right: int,
    deterministic: bool, backend: str, softcap: float = 0.0, alibi_slopes: Optional[Tensor] = None,
    dropout_p: float = 0.0, seed: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    out = q.new_empty(q.shape)
    lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
    launcher(backend, "attention").attention_fwd(q, k, v, causal, scale, window_left, window_right, out, lse,
                                                 **attention_options(softcap, alibi_slopes, dropout_p, seed))
    return out, lse


@_attention_fwd.register_fake
def _(q, k, v, causal, scale, window_left, window_right, deterministic, backend, softcap=0.0, alibi_slopes=None,
      dropout_p=0.0, seed=None):
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("fastlm::attention_bwd", mutates_args=())
def _attention_bwd(
    dout: Tensor, dlse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    causal: bool, scale: float, window_left: int, window_right: int, deterministic: bool, backend: str,
    softcap: float = 0.0, alibi_slopes: Optional[Tensor] = None, dropout_p: float = 0.0, seed: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    dq, dk, dv = q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
    launcher(backend, "attention").attention_bwd(
        dout, dlse, q, k, v, out, lse, causal, scale, window_left, window_right, dq, dk, dv, deterministic,
        **attention_options(softcap, alibi_slopes, dropout_p, seed),
    )
    return dq, dk, dv


@_attention_bwd.register_fake
def _(dout, dlse, q, k, v, out, lse, causal, scale, window_left, window_right, deterministic, backend, softcap=0.0,
      alibi_slopes=None, dropout_p=0.0, seed=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale, window_left, window_right, deterministic, backend, softcap, alibi_slopes, dropout_p, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, alibi_slopes, seed)
    ctx.args = (causal, scale, window_left, window_right, deterministic, backend)
    ctx.options = (softcap, dropout_p)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, alibi_slopes, seed = ctx.saved_tensors
    dout = torch.zeros_like(out) if dout is None else _unit_d(dout)
    if dlse is not None:
        dlse = dlse.float().contiguous()
    softcap, dropout_p = ctx.options
    dq, dk, dv = _attention_bwd(dout, dlse, q, k, v, out, lse, *ctx.args, softcap, alibi_slopes, dropout_p, seed)
    return (dq, dk, dv) + (None,) * 10


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("fastlm::decode_attention", mutates_args=())
def _decode_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, scale: float, window_left: int,
    window_right: int, backend: str, block_table: Optional[Tensor] = None, softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    out = q.new_empty(q.shape)
    lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
    launcher(backend, "attention").decode_attention_fwd(
        q, k_cache, v_cache, cache_seqlens, scale, window_left, window_right, out, lse, block_table=block_table,
        **attention_options(softcap, alibi_slopes),
    )
    return out, lse


@_decode_attention.register_fake
def _(q, k_cache, v_cache, cache_seqlens, scale, window_left, window_right, backend, block_table=None, softcap=0.0,
      alibi_slopes=None):
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("fastlm::attention_varlen_fwd", mutates_args=())
def _attention_varlen_fwd(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
    causal: bool, scale: float, window_left: int, window_right: int, deterministic: bool, backend: str,
    softcap: float = 0.0, alibi_slopes: Optional[Tensor] = None, dropout_p: float = 0.0, seed: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    out = q.new_empty(q.shape)
    lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    launcher(backend, "attention").attention_varlen_fwd(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, window_left, window_right, out, lse,
        **attention_options(softcap, alibi_slopes, dropout_p, seed),
    )
    return out, lse


@_attention_varlen_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, window_left, window_right, deterministic, backend,
      softcap=0.0, alibi_slopes=None, dropout_p=0.0, seed=None):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("fastlm::attention_varlen_bwd", mutates_args=())
def _attention_varlen_bwd(
    dout: Tensor, dlse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int, causal: bool, scale: float, window_left: int,
    window_right: int, deterministic: bool, backend: str, softcap: float = 0.0, alibi_slopes: Optional[Tensor] = None,
    dropout_p: float = 0.0, seed: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    dq, dk, dv = q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
    launcher(backend, "attention").attention_varlen_bwd(
        dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
        window_left, window_right, dq, dk, dv, deterministic, **attention_options(softcap, alibi_slopes, dropout_p, seed),
    )
    return dq, dk, dv


@_attention_varlen_bwd.register_fake
def _(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, window_left,
      window_right, deterministic, backend, softcap=0.0, alibi_slopes=None, dropout_p=0.0, seed=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _varlen_setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, *args, softcap, alibi_slopes, dropout_p, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, alibi_slopes, seed)
    ctx.args = tuple(args)
    ctx.options = (softcap, dropout_p)


def _varlen_backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k, alibi_slopes, seed = ctx.saved_tensors
    dout = torch.zeros_like(out) if dout is None else _unit_d(dout)
    if dlse is not None:
        dlse = dlse.float().contiguous()
    softcap, dropout_p = ctx.options
    dq, dk, dv = _attention_varlen_bwd(dout, dlse, q, k, v, out, lse, cu_q, cu_k, *ctx.args, softcap, alibi_slopes, dropout_p, seed)
    return (dq, dk, dv) + (None,) * 14


_attention_varlen_fwd.register_autograd(_varlen_backward, setup_context=_varlen_setup_context)


# ---- validation ----------------------------------------------------------------------------------


def _dtype_name(dt) -> str:
    return str(dt).replace("torch.", "")


def _check_head_dim(op: str, d: int) -> None:
    if d % 8 != 0 or not 8 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"fastlm.ops.{op}: head dim must be a multiple of 8 between 8 and {MAX_HEAD_DIM}, got {d}")


def _check_scale(op: str, scale, d: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(d)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"fastlm.ops.{op}: scale must be a finite number or None, got {scale!r}")
    return float(scale)


def _check_window(op: str, window, limit: int) -> tuple[int, int]:
    """(left, right) with -1 for unbounded; a side beyond ``limit`` (Sq + Sk: it hides no key) is
    clamped to it, so no index arithmetic can overflow."""
    if window is None:
        return -1, -1
    try:
        left, right = window
    except (TypeError, ValueError):
        raise ValueError(f"fastlm.ops.{op}: window must be None or a pair (left, right) of ints >= -1, got {window!r}") from None
    for side in (left, right):
        if isinstance(side, bool) or not isinstance(side, numbers.Integral) or side < -1:
            raise ValueError(f"fastlm.ops.{op}: window must be None or a pair (left, right) of ints >= -1 (-1: unbounded), got {window!r}")
        check_int64(op, "a window side", int(side))
    return min(int(left), limit), min(int(right), limit)


def _check_qkv(op: str, q, k, v, kname="k", vname="v", packed=False) -> None:
    """Dtypes, devices and shapes of q, k, v: (batch, heads, seq, head_dim), or with packed
    (total_rows, heads, head_dim); GQA head counts and a supported head dim."""
    for name, t in ((("q", q), (kname, k), (vname, v))):
        check_tensor(name, t, op=op, dtypes=FLOAT_DTYPES)
        if t.dim() != (3 if packed else 4):
            layout = "3-D (total_rows, heads, head_dim)" if packed else "4-D (batch, heads, seq, head_dim)"
            raise ValueError(f"fastlm.ops.{op}: {name} must be {layout}, got shape {list(t.shape)}")
    for name, t in ((kname, k), (vname, v)):
        if t.dtype != q.dtype:
            raise TypeError(f"fastlm.ops.{op}: {name} dtype {_dtype_name(t.dtype)} != q dtype {_dtype_name(q.dtype)}")
    check_same_device(op, "q", q, **{kname: k, vname: v})
    if k.shape != v.shape:
        raise ValueError(f"fastlm.ops.{op}: {kname} shape {list(k.shape)} != {vname} shape {list(v.shape)}")
    if not packed and k.shape[0] != q.shape[0]:
        raise ValueError(f"fastlm.ops.{op}: batch size of {kname} ({k.shape[0]}) != batch size of q ({q.shape[0]})")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"fastlm.ops.{op}: head dim of {kname} ({k.shape[-1]}) != head dim of q ({q.shape[-1]})")
    _check_head_dim(op, q.shape[-1])
    hq, hkv = q.shape[1], k.shape[1]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"fastlm.ops.{op}: query heads ({hq}) must be a multiple of key/value heads ({hkv}) (GQA/MQA)")


def _check_softcap(op: str, softcap) -> float:
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real) or not math.isfinite(softcap) or softcap < 0:
        raise ValueError(f"fastlm.ops.{op}: softcap must be a finite number >= 0 (0: off), got {softcap!r}")
    return float(softcap)


def _check_alibi(op: str, alibi_slopes, q, batch: int, heads: int):
    """None, or the slopes fp32 (heads,) or (batch, heads) on q's device, detached (no gradient reaches
    them) and with unit stride in the head dim."""
    if alibi_slopes is None:
        return None
    check_tensor("alibi_slopes", alibi_slopes, op=op, dtypes=(torch.float32,))
    if tuple(alibi_slopes.shape) not in ((heads,), (batch, heads)):
        raise ValueError(f"fastlm.ops.{op}: alibi_slopes must have shape [{heads}] (query heads) or [{batch}, {heads}] "
                         f"(batch, query heads), got {list(alibi_slopes.shape)}")
    check_same_device(op, "q", q, alibi_slopes=alibi_slopes)
    slopes = alibi_slopes.detach()
    return slopes if slopes.numel() == 0 or slopes.stride(-1) == 1 else slopes.contiguous()


def _check_dropout(op: str, dropout_p, q, generator, seed):
    """(dropout_p, seed): p in [0, 1); for p > 0 the int64 [seed, offset] tensor on q's device, from ``seed``
    (an int: [seed, 0]) or drawn from ``generator`` (default: torch's default generator of q's device)."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"fastlm.ops.{op}: dropout_p must be a number in [0, 1), got {dropout_p!r}")
    if seed is not None and generator is not None:
        raise ValueError(f"fastlm.ops.{op}: pass generator or seed, not both")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"fastlm.ops.{op}: generator must be a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != q.device.type:
            raise ValueError(f"fastlm.ops.{op}: generator is on {generator.device} but q is on {q.device}")
    if seed is not None:
        if isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
            if not -(2**63) <= seed < 2**63:
                raise ValueError(f"fastlm.ops.{op}: seed must fit in int64, got {seed}")
        elif isinstance(seed, torch.Tensor):
            check_tensor("seed", seed, op=op, dtypes=(torch.int64,))
            if tuple(seed.shape) != (2,):
                raise ValueError(f"fastlm.ops.{op}: seed must be an int64 tensor [seed, offset] of shape (2,), got shape {list(seed.shape)}")
            check_same_device(op, "q", q, seed=seed)
        else:
            raise TypeError(f"fastlm.ops.{op}: seed must be an int or an int64 tensor [seed, offset], got {type(seed).__name__}")
    dropout_p = float(dropout_p)
    if not dropout_p:
        return 0.0, None
    if isinstance(seed, torch.Tensor):
        return dropout_p, seed.contiguous()
    if seed is not None:
        return dropout_p, torch.tensor([int(seed), 0], dtype=torch.int64, device=q.device)
    return dropout_p, torch.randint(-(2**63), 2**63 - 1, (2,), dtype=torch.int64, generator=generator, device=q.device)


# ---- public ops ----------------------------------------------------------------------------------


def attention(q, k, v, *, causal=False, scale=None, window=None, softcap=0.0, alibi_slopes=None, dropout_p=0.0, generator=None,
              seed=None, return_lse=False, deterministic=False, backend=None):
    """Fused attention: softmax(scale q k^T + mask) v, layout (B, H, S, D).

    q (B, Hq, Sq, D), k and v (B, Hkv, Sk, D) with Hq a multiple of Hkv (GQA; Hkv = 1 is MQA);
    D a multiple of 8 up to 256; fp32/fp16/bf16 (fp64 on backend "torch"). ``causal`` aligns the
    mask bottom-right: query i sees keys j <= i + Sk - Sq (chunked prefill). ``window=(left,
    right)``: query i sees keys i + Sk - Sq - left <= j <= i + Sk - Sq + right (-1 = unbounded;
    with causal, right is capped at 0). A row that sees no key returns zeros (LSE -inf), never NaN.
    ``scale`` defaults to 1/sqrt(D). ``return_lse=True`` returns (out, lse) with lse (B, Hq, Sq)
    fp32 (fp64 for fp64 inputs); lse is differentiable. The backward is deterministic on every
    backend, so ``deterministic=True`` is always honoured at no cost.

    Options (module docstring; order: softcap, ALiBi, mask, softmax, dropout): ``softcap`` c >= 0
    (0: off) maps the scaled score S to c tanh(S / c); ``alibi_slopes`` fp32 (Hq,) or (B, Hq) adds
    -slope_h |i + Sk - Sq - j| (no gradient to the slopes); ``dropout_p`` in [0, 1) drops P entries
    by a Philox mask and scales the kept ones by 1 / (1 - p) (the LSE is that of the undropped P).
    Its seed: ``seed`` (an int, or an int64 tensor [seed, offset] on q's device) or one draw from
    ``generator`` (default: torch's default generator, so torch.manual_seed reproduces the mask);
    the backward recomputes the same mask. dropout_p = 0 is exactly the call without dropout.
    """
    op = "attention"
    _check_qkv(op, q, k, v)
    if not isinstance(causal, bool):
        raise TypeError(f"fastlm.ops.{op}: causal must be a bool, got {type(causal).__name__}")
    scale = _check_scale(op, scale, q.shape[-1])
    left, right = _check_window(op, window, q.shape[2] + k.shape[2])
    softcap = _check_softcap(op, softcap)
    alibi_slopes = _check_alibi(op, alibi_slopes, q, q.shape[0], q.shape[1])
    dropout_p, seed = _check_dropout(op, dropout_p, q, generator, seed)
    name = _backend.resolve(backend, q.device, op)
    if name == "torch":
        return ref.attention(q, k, v, causal=causal, scale=scale, window=(left, right), return_lse=return_lse, softcap=softcap,
                             alibi_slopes=alibi_slopes, dropout_p=dropout_p, seed=seed)
    check_kernel_dtype(op, name, q=q)
    opts = (softcap, alibi_slopes, dropout_p, seed)
    if emulate_bf16(name, q):
        out, lse = _attention_fwd(q.float(), k.float(), v.float(), causal, scale, left, right, bool(deterministic), name, *opts)
        out = out.to(q.dtype)
    else:
        out, lse = _attention_fwd(_unit_d(q), _unit_d(k), _unit_d(v), causal, scale, left, right, bool(deterministic), name, *opts)
    return (out, lse) if return_lse else out


def _sdpa_kernel_ok(query, key, value, attn_mask, dropout_p, enable_gqa) -> bool:
    if attn_mask is not None or isinstance(dropout_p, bool) or not (isinstance(dropout_p, numbers.Real) and 0 <= dropout_p < 1):
        return False
    ts = (query, key, value)
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in ts):
        return False
    if any(t.dtype != query.dtype or t.device != query.device for t in ts) or query.dtype not in KERNEL_DTYPES:
        return False
    if key.shape != value.shape or key.shape[0] != query.shape[0] or key.shape[-1] != query.shape[-1]:
        return False
    d = query.shape[-1]
    if d % 8 or not 8 <= d <= MAX_HEAD_DIM or key.shape[2] == 0:
        return False
    hq, hkv = query.shape[1], key.shape[1]
    return hq == hkv or (bool(enable_gqa) and hkv > 0 and hq % hkv == 0)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False, *, backend=None):
    """torch.nn.functional.scaled_dot_product_attention, same signature and results.

    The kernels serve attn_mask=None, 0 <= dropout_p < 1 and 4-D (B, H, S, D) inputs of one float dtype
    (fp32/fp16/bf16) with a head dim that is a multiple of 8 up to 256, Sk >= 1, and Hq == Hkv or
    enable_gqa=True with Hq % Hkv == 0. Every other call (a mask, dropout, other ranks, fp64, a
    value head dim differing from the query's, ...) and backend "torch" call torch's own function,
    so the result is never silently different. is_causal follows torch: the mask is aligned
    TOP-LEFT (query i sees keys j <= i) even when Sq != Sk, unlike fastlm.ops.attention's
    bottom-right; for Sq < Sk that is causal attention over the first Sq keys, for Sq > Sk a
    right window of Sq - Sk keys past the bottom-right diagonal. dropout_p > 0 runs the kernels'
    dropout (fastlm.ops.attention's, seeded by one draw from torch's default generator of the
    device): the same distribution as torch's, but its own Philox stream, not torch's RNG stream,
    so the dropped entries differ from torch's for the same torch.manual_seed (and are the same
    on every fastlm backend).
    """
    op = "scaled_dot_product_attention"
    device = query.device if isinstance(query, torch.Tensor) else torch.device("cpu")
    name = _backend.resolve(backend, device, op)
    if name == "torch" or not _sdpa_kernel_ok(query, key, value, attn_mask, dropout_p, enable_gqa):
        kwargs = {"enable_gqa": True} if enable_gqa else {}
        return F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, **kwargs)
    sq, sk = query.shape[2], key.shape[2]
    scale = _check_scale(op, scale, query.shape[-1])
    causal, left, right = False, -1, -1
    if is_causal:
        if sq <= sk:
            key, value, causal = key[:, :, :sq], value[:, :, :sq], True
        else:
            right = sq - sk
    dropout_p, seed = _check_dropout(op, dropout_p, query, None, None)
    if emulate_bf16(name, query):
        out, _ = _attention_fwd(query.float(), key.float(), value.float(), causal, scale, left, right, False, name, 0.0, None,
                                dropout_p, seed)
        return out.to(query.dtype)
    out, _ = _attention_fwd(_unit_d(query), _unit_d(key), _unit_d(value), causal, scale, left, right, False, name, 0.0, None,
                            dropout_p, seed)
    return out


def _check_seqlens(op: str, cache_seqlens, batch: int, s_max: int, device) -> None:
    check_tensor("cache_seqlens", cache_seqlens, op=op)
    if cache_seqlens.dtype != torch.int32:
        raise TypeError(f"fastlm.ops.{op}: cache_seqlens must be int32, got {_dtype_name(cache_seqlens.dtype)} (use .int())")
    if tuple(cache_seqlens.shape) != (batch,):
        raise ValueError(f"fastlm.ops.{op}: cache_seqlens must have shape [{batch}] (the batch), got {list(cache_seqlens.shape)}")
    if cache_seqlens.device != device:
        raise ValueError(f"fastlm.ops.{op}: cache_seqlens is on {cache_seqlens.device} but q is on {device}")
    # The value check needs a host sync: skipped while compiling or capturing a CUDA graph (the
    # kernels clamp lengths to [0, S_max], so a bad length there can never read out of bounds).
    if torch.compiler.is_compiling() or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return
    if batch:
        lo, hi = int(cache_seqlens.min()), int(cache_seqlens.max())
        if lo < 0 or hi > s_max:
            raise ValueError(f"fastlm.ops.{op}: cache_seqlens must lie in [0, S_max={s_max}], got values in [{lo}, {hi}]")


def _check_paged_caches(op: str, k_cache, v_cache, block_table, batch: int, device, dtype, head_dim: int, kv_heads=None) -> int:
    """Paged caches (num_pages, Hkv, page_size, D) of one dtype and device, page_size a power of two
    in [16, 256], and block_table (batch, max_pages) int32 on the same device; returns S_max =
    max_pages * page_size."""
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(name, t, op=op, dtypes=FLOAT_DTYPES)
        if t.dim() != 4:
            raise ValueError(f"fastlm.ops.{op}: with block_table, {name} must be 4-D (num_pages, kv_heads, page_size, head_dim), "
                             f"got shape {list(t.shape)}")
        if t.dtype != dtype:
            raise TypeError(f"fastlm.ops.{op}: {name} dtype {_dtype_name(t.dtype)} != {_dtype_name(dtype)} (the dtype of q / k_new)")
        if t.device != device:
            raise ValueError(f"fastlm.ops.{op}: {name} is on {t.device} but q / k_new is on {device}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"fastlm.ops.{op}: k_cache shape {list(k_cache.shape)} != v_cache shape {list(v_cache.shape)}")
    num_pages, hkv, page_size, d = k_cache.shape
    if d != head_dim:
        raise ValueError(f"fastlm.ops.{op}: head dim of k_cache ({d}) != head dim of q / k_new ({head_dim})")
    if kv_heads is not None and hkv != kv_heads:
        raise ValueError(f"fastlm.ops.{op}: k_cache has {hkv} key/value heads but k_new has {kv_heads}")
    if page_size < 16 or page_size > 256 or page_size & (page_size - 1):
        raise ValueError(f"fastlm.ops.{op}: page_size (k_cache dim 2) must be a power of two in [16, 256], got {page_size}")
    if num_pages == 0:
        raise ValueError(f"fastlm.ops.{op}: the paged caches have no pages (k_cache shape {list(k_cache.shape)})")
    check_tensor("block_table", block_table, op=op)
    if block_table.dtype != torch.int32:
        raise TypeError(f"fastlm.ops.{op}: block_table must be int32, got {_dtype_name(block_table.dtype)} (use .int())")
    if block_table.dim() != 2 or block_table.shape[0] != batch:
        raise ValueError(f"fastlm.ops.{op}: block_table must have shape [{batch}, max_pages] (batch, pages per sequence), "
                         f"got {list(block_table.shape)}")
    if block_table.device != device:
        raise ValueError(f"fastlm.ops.{op}: block_table is on {block_table.device} but q / k_new is on {device}")
    return block_table.shape[1] * page_size


def _check_pages_used(op: str, block_table, cache_seqlens, num_pages: int, page_size: int, extra: int = 0) -> None:
    """The page ids a sequence uses (its first ceil((L_b + extra) / page_size) entries) lie in
    [0, num_pages); unused entries may hold anything. A host sync, skipped where _check_seqlens skips."""
    device = block_table.device
    if torch.compiler.is_compiling() or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return
    if block_table.numel() == 0:
        return
    need = (cache_seqlens.long() + extra + page_size - 1) // page_size
    used = torch.arange(block_table.shape[1], device=device)[None, :] < need[:, None]
    bad = used & ((block_table < 0) | (block_table >= num_pages))
    if bool(bad.any()):
        b, j = (int(x) for x in bad.nonzero()[0])
        raise ValueError(f"fastlm.ops.{op}: block_table[{b}, {j}] = {int(block_table[b, j])} is not a page id in "
                         f"[0, num_pages={num_pages}) (sequence {b} uses its first {int(need[b])} pages)")


def decode_attention(q, k_cache, v_cache, cache_seqlens, *, block_table=None, scale=None, window=None, softcap=0.0,
                     alibi_slopes=None, backend=None):
    """Attention of a few new tokens over a KV cache (flash-decoding: the cache is split across
    programs, so batch 1 with a long cache fills the GPU).

    q (B, Hq, Sq, D) with 1 <= Sq <= 16; k_cache, v_cache (B, Hkv, S_max, D), Hq a multiple of Hkv;
    cache_seqlens (B,) int32 with 0 <= L_b <= S_max: sequence b's keys are cache[b, :, :L_b] and its
    Sq new tokens (already written to the cache) are the last Sq of them, so token t sees keys
    j <= L_b - Sq + t (causal), and with ``window=(left, right)`` also j >= L_b - Sq + t - left.
    Equals attention(q[b], k_cache[b, :, :L_b], v_cache[b, :, :L_b], causal=True, window=window)
    per sequence. Inference only (no gradient).

    Paged cache: with ``block_table`` (B, max_pages) int32 the caches are (num_pages, Hkv,
    page_size, D), page_size a power of two in [16, 256], and key j of sequence b is
    cache[block_table[b, j // page_size], :, j % page_size]; S_max = max_pages * page_size, and
    the result equals the contiguous cache with those rows. Checked on the host (a device sync,
    skipped while compiling or capturing a CUDA graph): 0 <= L_b <= S_max and the page ids of the
    first ceil(L_b / page_size) entries of each row lie in [0, num_pages); other entries are never
    read. Unchecked (compile, capture), the kernels clamp L_b to [0, S_max] and page ids to
    [0, num_pages), so a bad value gives wrong rows but never reads outside the caches.

    ``softcap`` and ``alibi_slopes`` ((Hq,) or (B, Hq) fp32) as in fastlm.ops.attention, the ALiBi
    distance of token t to key j being |L_b - Sq + t - j|. No dropout (inference).
    """
    op = "decode_attention"
    if block_table is None:
        _check_qkv(op, q, k_cache, v_cache, "k_cache", "v_cache")
        s_max = k_cache.shape[2]
    else:
        check_tensor("q", q, op=op, dtypes=FLOAT_DTYPES)
        if q.dim() != 4:
            raise ValueError(f"fastlm.ops.{op}: q must be 4-D (batch, heads, seq, head_dim), got shape {list(q.shape)}")
        _check_head_dim(op, q.shape[-1])
        s_max = _check_paged_caches(op, k_cache, v_cache, block_table, q.shape[0], q.device, q.dtype, q.shape[-1])
        hq, hkv = q.shape[1], k_cache.shape[1]
        if hkv == 0 or hq % hkv != 0:
            raise ValueError(f"fastlm.ops.{op}: query heads ({hq}) must be a multiple of key/value heads ({hkv}) (GQA/MQA)")
    sq = q.shape[2]
    if not 1 <= sq <= MAX_DECODE_QUERIES:
        raise ValueError(
            f"fastlm.ops.{op}: q must have 1 to {MAX_DECODE_QUERIES} new tokens (dim 2), got {sq}; use fastlm.ops.attention for prefill"
        )
    _check_seqlens(op, cache_seqlens, q.shape[0], s_max, q.device)
    if block_table is not None:
        _check_pages_used(op, block_table, cache_seqlens, k_cache.shape[0], k_cache.shape[2])
        block_table = block_table.contiguous()
    scale = _check_scale(op, scale, q.shape[-1])
    left, right = _check_window(op, window, sq + s_max)
    softcap = _check_softcap(op, softcap)
    alibi_slopes = _check_alibi(op, alibi_slopes, q, q.shape[0], q.shape[1])
    name = _backend.resolve(backend, q.device, op)
    if name == "torch":
        return ref.decode_attention(q, k_cache, v_cache, cache_seqlens, scale=scale, window=(left, right), block_table=block_table,
                                    softcap=softcap, alibi_slopes=alibi_slopes)
    check_kernel_dtype(op, name, q=q)
    if emulate_bf16(name, q):
        out, _ = _decode_attention(q.float(), k_cache.float(), v_cache.float(), cache_seqlens, scale, left, right, name, block_table,
                                   softcap, alibi_slopes)
        return out.to(q.dtype)
    out, _ = _decode_attention(_unit_d(q), _unit_d(k_cache), _unit_d(v_cache), cache_seqlens, scale, left, right, name, block_table,
                               softcap, alibi_slopes)
    return out


def _check_cu_seqlens(op: str, q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> None:
    """Shapes, dtypes and devices always; the values (start at 0, non-decreasing, end at the row
    count, no sequence longer than max_seqlen) only on CPU tensors, where reading them costs no
    device sync, and never while compiling."""
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        check_tensor(name, cu, op=op)
        if cu.dtype != torch.int32:
            raise TypeError(f"fastlm.ops.{op}: {name} must be int32, got {_dtype_name(cu.dtype)} (use .int())")
        if cu.dim() != 1 or cu.shape[0] < 1:
            raise ValueError(f"fastlm.ops.{op}: {name} must be 1-D of length batch + 1 >= 1, got shape {list(cu.shape)}")
        if cu.device != q.device:
            raise ValueError(f"fastlm.ops.{op}: {name} is on {cu.device} but q is on {q.device}")
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(
            f"fastlm.ops.{op}: cu_seqlens_q has length {cu_seqlens_q.shape[0]} but cu_seqlens_k has length "
            f"{cu_seqlens_k.shape[0]}; both must be batch + 1"
        )
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(m, bool) or not isinstance(m, numbers.Integral):
            raise TypeError(f"fastlm.ops.{op}: {name} must be an int, got {type(m).__name__}")
        if m < 0 or m >= 2**31:
            raise ValueError(f"fastlm.ops.{op}: {name} must lie in [0, 2**31 - 1], got {m}")
    if torch.compiler.is_compiling() or q.device.type != "cpu":
        return
    for name, cu, rows, kind, m in (("cu_seqlens_q", cu_seqlens_q, q.shape[0], "q", max_seqlen_q),
                                    ("cu_seqlens_k", cu_seqlens_k, k.shape[0], "k and v", max_seqlen_k)):
        vals = cu.tolist()
        if vals[0] != 0:
            raise ValueError(f"fastlm.ops.{op}: {name} must start at 0, got {vals[0]}")
        lens = [b - a for a, b in zip(vals[:-1], vals[1:], strict=True)]
        if any(n < 0 for n in lens):
            i = next(i for i, n in enumerate(lens) if n < 0)
            raise ValueError(f"fastlm.ops.{op}: {name} must be non-decreasing, got {vals[i]} then {vals[i + 1]} at index {i}")
        if vals[-1] != rows:
            raise ValueError(f"fastlm.ops.{op}: {name}[-1] must equal the rows of {kind} ({rows}), got {vals[-1]}")
        if lens and max(lens) > m:
            raise ValueError(f"fastlm.ops.{op}: {name} has a sequence of length {max(lens)} > max_seqlen_{name[-1]}={m}")


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal=False, scale=None,
                     window=None, softcap=0.0, alibi_slopes=None, dropout_p=0.0, generator=None, seed=None, return_lse=False,
                     deterministic=False, backend=None):
    """Attention over a packed batch of variable-length sequences (no padding).

    q (Tq, Hq, D), k and v (Tk, Hkv, D): the rows of all sequences one after another;
    cu_seqlens_q, cu_seqlens_k (B + 1,) int32 prefix sums starting at 0 and ending at Tq, Tk:
    sequence b is q[cu_seqlens_q[b]:cu_seqlens_q[b + 1]] with keys k[cu_seqlens_k[b]:cu_seqlens_k[b + 1]].
    max_seqlen_q / max_seqlen_k: ints at least the longest query / key length (they size the grid).
    Per sequence the result is exactly fastlm.ops.attention on that sequence alone (in (1, H, S, D)
    layout): bottom-right causal alignment per sequence, ``window``, GQA, ``scale`` as there; an
    empty sequence (no queries or no keys) gives zero output rows and LSE -inf. ``return_lse=True``
    returns (out, lse) with lse (Hq, Tq) fp32 (fp64 on backend "torch" for fp64 inputs),
    differentiable. Gradients dq, dk, dv are kernels (deterministic).

    The cu_seqlens values and max_seqlen bounds are checked on CPU tensors; on CUDA tensors they are
    not (that would cost a device sync per call): there a bad cu_seqlens or a max_seqlen below a
    sequence's length gives unspecified rows, as in FlashAttention's varlen functions.
    Backends: "triton", "cuda" (its own varlen forward and backward kernels where the dense ones
    would run, the Triton kernels otherwise: fastlm.cuda.attention.CUDA_COVERAGE) and "torch" (a
    loop over sequences).

    Options as in fastlm.ops.attention: ``alibi_slopes`` (Hq,) or (B, Hq) (one row per sequence),
    the ALiBi offset Sk - Sq per sequence; dropout's mask is indexed by the packed rows, so the
    same sequences packed or batched (B, H, S, D) with the same seed drop the same entries.
    """
    op = "attention_varlen"
    _check_qkv(op, q, k, v, packed=True)
    if not isinstance(causal, bool):
        raise TypeError(f"fastlm.ops.{op}: causal must be a bool, got {type(causal).__name__}")
    _check_cu_seqlens(op, q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    scale = _check_scale(op, scale, q.shape[-1])
    left, right = _check_window(op, window, q.shape[0] + k.shape[0])
    softcap = _check_softcap(op, softcap)
    alibi_slopes = _check_alibi(op, alibi_slopes, q, cu_seqlens_q.shape[0] - 1, q.shape[1])
    dropout_p, seed = _check_dropout(op, dropout_p, q, generator, seed)
    name = _backend.resolve(backend, q.device, op)
    if name == "torch":
        return ref.attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal, scale=scale, window=(left, right),
                                    return_lse=return_lse, softcap=softcap, alibi_slopes=alibi_slopes, dropout_p=dropout_p, seed=seed)
    check_kernel_dtype(op, name, q=q)
    mq, mk = int(max_seqlen_q), int(max_seqlen_k)
    opts = (softcap, alibi_slopes, dropout_p, seed)
    if emulate_bf16(name, q):
        out, lse = _attention_varlen_fwd(q.float(), k.float(), v.float(), cu_seqlens_q, cu_seqlens_k, mq, mk, causal, scale,
                                         left, right, bool(deterministic), name, *opts)
        out = out.to(q.dtype)
    else:
        out, lse = _attention_varlen_fwd(_unit_d(q), _unit_d(k), _unit_d(v), cu_seqlens_q, cu_seqlens_k, mq, mk, causal, scale,
                                         left, right, bool(deterministic), name, *opts)
    return (out, lse) if return_lse else out


# ---- paged_kv_append -----------------------------------------------------------------------------


@torch.library.custom_op("fastlm::paged_kv_append", mutates_args=("k_cache", "v_cache"))
def _paged_kv_append(
    k_cache: Tensor, v_cache: Tensor, block_table: Tensor, cache_seqlens: Tensor, k_new: Tensor, v_new: Tensor, backend: str
) -> None:
    launcher(backend, "attention").paged_kv_append(k_cache, v_cache, block_table, cache_seqlens, k_new, v_new)


@_paged_kv_append.register_fake
def _(k_cache, v_cache, block_table, cache_seqlens, k_new, v_new, backend):
    return None


def paged_kv_append(k_cache, v_cache, block_table, cache_seqlens, k_new, v_new, *, backend=None):
    """Write new keys and values into a paged KV cache, in place (the layout of decode_attention).

    k_cache, v_cache (num_pages, Hkv, page_size, D), page_size a power of two in [16, 256];
    block_table (B, max_pages) int32; cache_seqlens (B,) int32; k_new, v_new (B, Hkv, S_new, D)
    in the caches' dtype (the layout of decode_attention's q). For every b and s < S_new, position
    p = cache_seqlens[b] + s of sequence b gets k_new[b, :, s] at k_cache[block_table[b, p // page_size],
    :, p % page_size] (and v likewise). cache_seqlens is NOT updated: add S_new to it (in place or
    not) before the decode_attention call that should see the new keys. The kernels read nothing on
    the host and allocate nothing that depends on values (CUDA-graph capturable).
    Checked on the host (a device sync, skipped while compiling or capturing a CUDA graph):
    0 <= L_b and L_b + S_new <= max_pages * page_size, and the page ids of the first
    ceil((L_b + S_new) / page_size) entries of each row lie in [0, num_pages). Unchecked, the
    kernels skip every position outside [0, max_pages * page_size) and every page id outside
    [0, num_pages): nothing is written outside the caches. The caches need unit stride in D.
    """
    op = "paged_kv_append"
    for name, t in (("k_new", k_new), ("v_new", v_new)):
        check_tensor(name, t, op=op, dtypes=FLOAT_DTYPES)
        if t.dim() != 4:
            raise ValueError(f"fastlm.ops.{op}: {name} must be 4-D (batch, kv_heads, new_tokens, head_dim), got shape {list(t.shape)}")
    if k_new.shape != v_new.shape:
        raise ValueError(f"fastlm.ops.{op}: k_new shape {list(k_new.shape)} != v_new shape {list(v_new.shape)}")
    if v_new.dtype != k_new.dtype:
        raise TypeError(f"fastlm.ops.{op}: v_new dtype {_dtype_name(v_new.dtype)} != k_new dtype {_dtype_name(k_new.dtype)}")
    check_same_device(op, "k_new", k_new, v_new=v_new)
    B, hkv, s_new, d = k_new.shape
    s_max = _check_paged_caches(op, k_cache, v_cache, block_table, B, k_new.device, k_new.dtype, d, kv_heads=hkv)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.numel() and t.stride(-1) != 1:
            raise ValueError(f"fastlm.ops.{op}: {name} must have unit stride in the head dim (it is written in place), "
                             f"got strides {t.stride()}")
    if not torch.compiler.is_compiling() and k_cache.numel() and overlap(k_cache, v_cache):
        raise ValueError(f"fastlm.ops.{op}: k_cache and v_cache must not share memory")
    check_tensor("cache_seqlens", cache_seqlens, op=op)
    if cache_seqlens.dtype != torch.int32:
        raise TypeError(f"fastlm.ops.{op}: cache_seqlens must be int32, got {_dtype_name(cache_seqlens.dtype)} (use .int())")
    if tuple(cache_seqlens.shape) != (B,):
        raise ValueError(f"fastlm.ops.{op}: cache_seqlens must have shape [{B}] (the batch), got {list(cache_seqlens.shape)}")
    if cache_seqlens.device != k_new.device:
        raise ValueError(f"fastlm.ops.{op}: cache_seqlens is on {cache_seqlens.device} but k_new is on {k_new.device}")
    device = k_new.device
    if B and not (torch.compiler.is_compiling() or (device.type == "cuda" and torch.cuda.is_current_stream_capturing())):
        lo, hi = int(cache_seqlens.min()), int(cache_seqlens.max())
        if lo < 0 or hi + s_new > s_max:
            raise ValueError(f"fastlm.ops.{op}: cache_seqlens + S_new must lie in [0, max_pages * page_size = {s_max}] "
                             f"(S_new = {s_new}), got cache_seqlens in [{lo}, {hi}]")
        _check_pages_used(op, block_table, cache_seqlens, k_cache.shape[0], k_cache.shape[2], extra=s_new)
    block_table = block_table.contiguous()
    name = _backend.resolve(backend, device, op)
    if name == "torch":
        ref.paged_kv_append(k_cache, v_cache, block_table, cache_seqlens, k_new, v_new)
        return
    check_kernel_dtype(op, name, k_new=k_new)
    _paged_kv_append(k_cache, v_cache, block_table, cache_seqlens, _unit_d(k_new), _unit_d(v_new), name)
