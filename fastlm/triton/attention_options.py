"""The attention options in Triton (softcap, ALiBi, dropout; the contract is fastlm/reference/attention.py),
shared by the prefill kernels (fastlm/triton/attention.py) and decode (fastlm/triton/decode_attention.py).

Every kernel takes them as constexpr flags HAS_SOFTCAP / HAS_ALIBI / HAS_DROPOUT (off by default: a call
without options compiles exactly the kernels it did before) and the runtime arguments of _option_args.
In log2 units (the kernels' online softmax is base 2), with t = tanh(scale q.k / c):
    s = c t log2(e) (softcap c; else scale q.k log2(e)),  s -= slope log2(e) |i + off - j| (ALiBi)
and the backward's d(c tanh(x / c))/dx = 1 - t^2. Dropout: _dropout_keep, one Philox4x32-10 call per
score element taking its word jg & 3 (the forward, dQ and the key-major dK/dV evaluate the same
function on their own index tensors, so no layout shuffle brings four words into a tile).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastlm.reference.attention import dropout_threshold
from fastlm.triton.sampling import _philox

LOG2E = 1.4426950408889634


@triton.jit
def _tanh(x):
    """tanh(x) = sign(x) (1 - e) / (1 + e), e = exp(-2 |x|): exact limits, no overflow, absolute
    error about one fp32 ulp of 1 (no libdevice call, so the interpreter runs it)."""
    e = tl.math.exp2(-2.8853900817779268 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0.0, -t, t)


@triton.jit
def _scores(qk, rows, keys, diag, qk_scale, cap_in, cap_out, slope2, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr):
    """The scores in log2 units from the raw dot qk = q.k (broadcast index tensors rows i, keys j):
    s = qk_scale qk; with softcap c, t = tanh(scale qk / c) and s = c t log2(e) (cap_in = scale / c,
    cap_out = c log2 e); with ALiBi s -= slope log2(e) |i + diag - j| (slope2 = slope log2 e).
    Returns (s, t) (t = s without softcap; the backward's d tanh = 1 - t^2)."""
    if HAS_SOFTCAP:
        t = _tanh(qk * cap_in)
        s = t * cap_out
    else:
        s = qk * qk_scale
        t = s
    if HAS_ALIBI:
        s = s - slope2 * tl.abs(rows + diag - keys).to(tl.float32)
    return s, t


@triton.jit
def _dropout_keep(ig0, rows, jg0, keys, h, seed_lo, seed_hi, off_lo, thresh):
    """The dropout keep mask of the contract (fastlm/reference/attention.py): query rows ig = ig0 + rows,
    key rows jg = jg0 + keys (uint32 bases, broadcast index tensors), query head h: word jg & 3 of
    Philox4x32-10(counter (jg >> 2, ig, h, off_lo), key (seed_lo, seed_hi)) >= thresh (uint32).
    One Philox call per element (its word jg & 3): the same code in the row-major forward and dQ
    and the key-major dK/dV, with no layout shuffle of the words into the score tile."""
    ig = ig0 + rows.to(tl.uint32)
    jg = jg0 + keys.to(tl.uint32)
    ig, jg = tl.broadcast(ig, jg)
    zero = ig * 0
    r0, r1, r2, r3 = _philox(jg >> 2, ig, zero + h.to(tl.uint32), zero + off_lo, seed_lo, seed_hi)
    sel = jg & 3
    word = tl.where(sel == 0, r0, tl.where(sel == 1, r1, tl.where(sel == 2, r2, r3)))
    return word >= thresh


@triton.jit
def _dropout_seed(Seed, thresh_in):
    """(seed_lo, seed_hi, offset_lo, threshold) as uint32 from the int64 pair Seed = [seed, offset]."""
    seed = tl.load(Seed)
    off = tl.load(Seed + 1)
    return ((seed & 0xFFFFFFFF).to(tl.uint32), ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32), (off & 0xFFFFFFFF).to(tl.uint32),
            thresh_in.to(tl.uint32))


@triton.jit
def _option_state(Slopes, stride_sb, Seed, drop_thresh, b, h, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr):
    """slope2 = Slopes[b * stride_sb + h] log2(e) (HAS_ALIBI, else 0) and the dropout words of _dropout_seed
    (HAS_DROPOUT, else zeros)."""
    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = tl.load(Slopes + b.to(tl.int64) * stride_sb + h) * 1.4426950408889634
    seed_lo = 0
    seed_hi = 0
    off_lo = 0
    thresh = 0
    if HAS_DROPOUT:
        seed_lo, seed_hi, off_lo, thresh = _dropout_seed(Seed, drop_thresh)
    return slope2, seed_lo, seed_hi, off_lo, thresh


_OPTION_PARAMS = ["stride_sb", "drop_thresh"]


def _option_args(scale: float, softcap: float = 0.0, alibi_slopes=None, dropout_p: float = 0.0, seed=None) -> tuple[tuple, dict]:
    """The options' runtime arguments (cap_in, cap_out, Slopes, stride_sb, Seed, drop_thresh,
    drop_scale) and constexprs (only the flags that are set, so a call without options compiles
    and tunes exactly the kernels it did before). softcap c: cap_in = scale / c, cap_out = c log2 e;
    alibi_slopes fp32 (Hq,) (stride_sb 0) or (B, Hq), unit stride in the head dim; dropout_p with
    seed (int64 (2,) [seed, offset] on the device): drop_thresh = floor(p 2^32), drop_scale = 1 / (1 - p)."""
    meta = {}
    cap_in = cap_out = 0.0
    stride_sb = 0
    thresh, drop_scale = 0, 1.0
    if softcap:
        meta["HAS_SOFTCAP"] = True
        cap_in, cap_out = scale / softcap, softcap * LOG2E
    if alibi_slopes is not None:
        if alibi_slopes.dtype != torch.float32 or alibi_slopes.stride(-1) != 1:
            raise ValueError(f"fastlm.triton.attention: alibi_slopes must be fp32 with unit stride in the head dim, got "
                             f"{alibi_slopes.dtype} with strides {alibi_slopes.stride()}")
        meta["HAS_ALIBI"] = True
        stride_sb = alibi_slopes.stride(0) if alibi_slopes.dim() == 2 else 0
    if dropout_p:
        if seed is None or seed.dtype != torch.int64 or seed.numel() != 2:
            raise ValueError("fastlm.triton.attention: dropout needs seed = an int64 tensor [seed, offset] of shape (2,)")
        meta["HAS_DROPOUT"] = True
        thresh, drop_scale = dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p)
        seed = seed.contiguous()
    else:
        seed = None
    return (cap_in, cap_out, alibi_slopes, stride_sb, seed, thresh, drop_scale), meta
