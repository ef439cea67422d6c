"""attention, scaled_dot_product_attention, decode_attention: validation, dispatch, autograd, torch.library.

The kernel backends run through three custom ops:
    fastlm::attention_fwd(q, k, v, causal, scale, window_left, window_right, deterministic, backend) -> (out, lse)
    fastlm::attention_bwd(dout, dlse, q, k, v, out, lse, causal, scale, window_left, window_right,
                          deterministic, backend) -> (dq, dk, dv)
    fastlm::decode_attention(q, k_cache, v_cache, cache_seqlens, scale, window_left, window_right, backend) -> (out, lse)
whose launchers come from fastlm/triton/attention.py or fastlm/cuda/attention.py. The forward
always returns the log-sum-exp (the backward recomputes P from it); a window side of -1 means
unbounded. The backward is a kernel (never autograd through the reference) and is deterministic
on every backend: no atomics, each gradient element is written by one program in a fixed order,
so ``deterministic=True`` costs nothing and ``deterministic=False`` gives the same bits. The
"torch" backend is the reference (fastlm/reference/attention.py), differentiated by autograd.
decode_attention is inference-only (no autograd formula is registered). Under the Triton
interpreter (CPU) bf16 arithmetic and bf16 tl.dot are wrong, so there the kernels run on fp32
copies and the result is rounded to bf16.
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
    check_int64,
    check_kernel_dtype,
    check_same_device,
    check_tensor,
    emulate_bf16,
    launcher,
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
    deterministic: bool, backend: str,
) -> tuple[Tensor, Tensor]:
    out = q.new_empty(q.shape)
    lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
    launcher(backend, "attention").attention_fwd(q, k, v, causal, scale, window_left, window_right, out, lse)
    return out, lse


@_attention_fwd.register_fake
def _(q, k, v, causal, scale, window_left, window_right, deterministic, backend):
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("fastlm::attention_bwd", mutates_args=())
def _attention_bwd(
    dout: Tensor, dlse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    causal: bool, scale: float, window_left: int, window_right: int, deterministic: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    dq, dk, dv = q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
    launcher(backend, "attention").attention_bwd(
        dout, dlse, q, k, v, out, lse, causal, scale, window_left, window_right, dq, dk, dv, deterministic
    )
    return dq, dk, dv


@_attention_bwd.register_fake
def _(dout, dlse, q, k, v, out, lse, causal, scale, window_left, window_right, deterministic, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale, window_left, window_right, deterministic, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.args = (causal, scale, window_left, window_right, deterministic, backend)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dout = torch.zeros_like(out) if dout is None else _unit_d(dout)
    if dlse is not None:
        dlse = dlse.float().contiguous()
    dq, dk, dv = _attention_bwd(dout, dlse, q, k, v, out, lse, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("fastlm::decode_attention", mutates_args=())
def _decode_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, scale: float, window_left: int,
    window_right: int, backend: str,
) -> tuple[Tensor, Tensor]:
    out = q.new_empty(q.shape)
    lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
    launcher(backend, "attention").decode_attention_fwd(
        q, k_cache, v_cache, cache_seqlens, scale, window_left, window_right, out, lse
    )
    return out, lse


@_decode_attention.register_fake
def _(q, k_cache, v_cache, cache_seqlens, scale, window_left, window_right, backend):
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)


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


def _check_qkv(op: str, q, k, v, kname="k", vname="v") -> None:
    for name, t in ((("q", q), (kname, k), (vname, v))):
        check_tensor(name, t, op=op, dtypes=FLOAT_DTYPES)
        if t.dim() != 4:
            raise ValueError(f"fastlm.ops.{op}: {name} must be 4-D (batch, heads, seq, head_dim), got shape {list(t.shape)}")
    for name, t in ((kname, k), (vname, v)):
        if t.dtype != q.dtype:
            raise TypeError(f"fastlm.ops.{op}: {name} dtype {_dtype_name(t.dtype)} != q dtype {_dtype_name(q.dtype)}")
    check_same_device(op, "q", q, **{kname: k, vname: v})
    if k.shape != v.shape:
        raise ValueError(f"fastlm.ops.{op}: {kname} shape {list(k.shape)} != {vname} shape {list(v.shape)}")
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"fastlm.ops.{op}: batch size of {kname} ({k.shape[0]}) != batch size of q ({q.shape[0]})")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"fastlm.ops.{op}: head dim of {kname} ({k.shape[-1]}) != head dim of q ({q.shape[-1]})")
    _check_head_dim(op, q.shape[-1])
    hq, hkv = q.shape[1], k.shape[1]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"fastlm.ops.{op}: query heads ({hq}) must be a multiple of key/value heads ({hkv}) (GQA/MQA)")


# ---- public ops ----------------------------------------------------------------------------------


def attention(q, k, v, *, causal=False, scale=None, window=None, return_lse=False, deterministic=False, backend=None):
    """Fused attention: softmax(scale q k^T + mask) v, layout (B, H, S, D).

    q (B, Hq, Sq, D), k and v (B, Hkv, Sk, D) with Hq a multiple of Hkv (GQA; Hkv = 1 is MQA);
    D a multiple of 8 up to 256; fp32/fp16/bf16 (fp64 on backend "torch"). ``causal`` aligns the
    mask bottom-right: query i sees keys j <= i + Sk - Sq (chunked prefill). ``window=(left,
    right)``: query i sees keys i + Sk - Sq - left <= j <= i + Sk - Sq + right (-1 = unbounded;
    with causal, right is capped at 0). A row that sees no key returns zeros (LSE -inf), never NaN.
    ``scale`` defaults to 1/sqrt(D). ``return_lse=True`` returns (out, lse) with lse (B, Hq, Sq)
    fp32 (fp64 for fp64 inputs); lse is differentiable. The backward is deterministic on every
    backend, so ``deterministic=True`` is always honoured at no cost.
    """
    op = "attention"
    _check_qkv(op, q, k, v)
    if not isinstance(causal, bool):
        raise TypeError(f"fastlm.ops.{op}: causal must be a bool, got {type(causal).__name__}")
    scale = _check_scale(op, scale, q.shape[-1])
    left, right = _check_window(op, window, q.shape[2] + k.shape[2])
    name = _backend.resolve(backend, q.device, op)
    if name == "torch":
        return ref.attention(q, k, v, causal=causal, scale=scale, window=(left, right), return_lse=return_lse)
    check_kernel_dtype(op, name, q=q)
    if emulate_bf16(name, q):
        out, lse = _attention_fwd(q.float(), k.float(), v.float(), causal, scale, left, right, bool(deterministic), name)
        out = out.to(q.dtype)
    else:
        out, lse = _attention_fwd(_unit_d(q), _unit_d(k), _unit_d(v), causal, scale, left, right, bool(deterministic), name)
    return (out, lse) if return_lse else out


def _sdpa_kernel_ok(query, key, value, attn_mask, dropout_p, enable_gqa) -> bool:
    if attn_mask is not None or not (isinstance(dropout_p, numbers.Real) and dropout_p == 0):
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

    The kernels serve attn_mask=None, dropout_p=0 and 4-D (B, H, S, D) inputs of one float dtype
    (fp32/fp16/bf16) with a head dim that is a multiple of 8 up to 256, Sk >= 1, and Hq == Hkv or
    enable_gqa=True with Hq % Hkv == 0. Every other call (a mask, dropout, other ranks, fp64, a
    value head dim differing from the query's, ...) and backend "torch" call torch's own function,
    so the result is never silently different. is_causal follows torch: the mask is aligned
    TOP-LEFT (query i sees keys j <= i) even when Sq != Sk, unlike fastlm.ops.attention's
    bottom-right; for Sq < Sk that is causal attention over the first Sq keys, for Sq > Sk a
    right window of Sq - Sk keys past the bottom-right diagonal.
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
    if emulate_bf16(name, query):
        out, _ = _attention_fwd(query.float(), key.float(), value.float(), causal, scale, left, right, False, name)
        return out.to(query.dtype)
    out, _ = _attention_fwd(_unit_d(query), _unit_d(key), _unit_d(value), causal, scale, left, right, False, name)
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


def decode_attention(q, k_cache, v_cache, cache_seqlens, *, scale=None, window=None, backend=None):
    """Attention of a few new tokens over a KV cache (flash-decoding: the cache is split across
    programs, so batch 1 with a long cache fills the GPU).

    q (B, Hq, Sq, D) with 1 <= Sq <= 16; k_cache, v_cache (B, Hkv, S_max, D), Hq a multiple of Hkv;
    cache_seqlens (B,) int32 with 0 <= L_b <= S_max: sequence b's keys are cache[b, :, :L_b] and its
    Sq new tokens (already written to the cache) are the last Sq of them, so token t sees keys
    j <= L_b - Sq + t (causal), and with ``window=(left, right)`` also j >= L_b - Sq + t - left.
    Equals attention(q[b], k_cache[b, :, :L_b], v_cache[b, :, :L_b], causal=True, window=window)
    per sequence. Inference only (no gradient).
    """
    op = "decode_attention"
    _check_qkv(op, q, k_cache, v_cache, "k_cache", "v_cache")
    sq = q.shape[2]
    if not 1 <= sq <= MAX_DECODE_QUERIES:
        raise ValueError(
            f"fastlm.ops.{op}: q must have 1 to {MAX_DECODE_QUERIES} new tokens (dim 2), got {sq}; use fastlm.ops.attention for prefill"
        )
    _check_seqlens(op, cache_seqlens, q.shape[0], k_cache.shape[2], q.device)
    scale = _check_scale(op, scale, q.shape[-1])
    left, right = _check_window(op, window, sq + k_cache.shape[2])
    name = _backend.resolve(backend, q.device, op)
    if name == "torch":
        return ref.decode_attention(q, k_cache, v_cache, cache_seqlens, scale=scale, window=(left, right))
    check_kernel_dtype(op, name, q=q)
    if emulate_bf16(name, q):
        out, _ = _decode_attention(q.float(), k_cache.float(), v_cache.float(), cache_seqlens, scale, left, right, name)
        return out.to(q.dtype)
    out, _ = _decode_attention(_unit_d(q), _unit_d(k_cache), _unit_d(v_cache), cache_seqlens, scale, left, right, name)
    return out
