"""CUDA launchers for attention (csrc/attention.cu, attention_bwd.cu, decode_attention.cu), with the
signatures of fastlm/triton/attention.py.

What runs as CUDA and what does not (the cuda backend never fails on a valid call: it hands what
its kernels do not cover to the Triton launcher, which computes the same thing):
- attention forward: CUDA for fp16/bf16, head dim 64, 96 or 128, causal or not, sliding windows,
  any GQA ratio, scale > 0, B * Hq * ceil(Sq / 128) * splits <= 2^31 - 1 blocks
  (``_C.attention_fwd_grids``), 16-byte aligned rows; split-KV (``fwd_splits_for``) when the query
  blocks alone leave SMs idle; anything else (fp32, other head dims) runs the Triton forward.
- attention backward (csrc/attention_bwd.cu): CUDA for fp16/bf16, head dim 64 or 128, causal or
  not, sliding windows, any GQA ratio, grids within ``_C.attention_bwd_grids``, 16-byte aligned
  rows of q, k, v, out, dout, dq, dk, dv (``bwd_runs_cuda``); anything else runs the Triton backward.
- decode_attention: CUDA split-KV (one block per batch, key/value head and split, mma.sync over
  the whole GQA group, a cp.async K/V ring) for fp16/bf16 at head dim 64, 128 or 256 (with or
  without a left window), at most 64 rows (Hq / Hkv) * Sq per key/value head, 16-byte aligned cache
  rows, B * Hkv <= 2^31 - 1 (``_C.decode_attention_grids``); anything else (fp32, other head dims,
  larger groups) runs the Triton decode. Paged caches (block_table) run the same kernel with a
  per-row page lookup in the 16-byte cp.async copies (paged_decode_split_kernel), same coverage.
- paged_kv_append: CUDA for every dtype and shape (16-byte copies on aligned rows).
- attention_varlen forward (packed sequences): the forward kernel's VARLEN path (per-sequence
  bounds from cu_seqlens, no host sync: ceil(max_seqlen_q / 128) query blocks per sequence, blocks
  past a sequence's end exit; split-KV as the dense forward) with the dense forward's coverage
  (``varlen_fwd_runs_cuda``), else Triton; the varlen backward likewise: the backward kernels'
  VARLEN path (per-sequence bounds from cu_seqlens on the device, blocks over the longest lengths,
  delta and lse in a workspace padded per sequence to max_seqlen_q) with the dense backward's
  coverage (``varlen_bwd_runs_cuda``), else Triton.
- the options softcap, alibi_slopes and dropout: the forward (dense and varlen) runs them in its
  OPTIONS kernels, decode (softcap, ALiBi) in its OPTIONS split kernels, the backward (dense and
  varlen) in its OPTIONS dK/dV and dQ kernels (dropout recomputed from the seed), each with the same
  coverage as without options.
``CUDA_COVERAGE`` says this in one line for ``fastlm info``.
On CPU tensors the kernels run through fastlm._C_host and the Triton cases through the interpreter
(TRITON_INTERPRET=1), bf16 ones on fp32 copies rounded once (the interpreter's bf16 is wrong).
"""

from __future__ import annotations

import math

import torch

from fastlm.backend import BackendUnavailableError, interpreted_bf16, interpreter_on
from fastlm.cuda import check, dtype_code, lib, ptr, stream_handle
from fastlm.ops._common import attention_options

CUDA_COVERAGE = (
    "forward: CUDA (mma.sync, ldmatrix, cp.async, split-KV) for fp16/bf16 at head dim 64/96/128, causal, "
    "windows, GQA; fp32, other head dims and scale <= 0 run the Triton kernels. backward: CUDA (mma.sync, deterministic) for fp16/bf16 at head dim 64/128, "
    "causal, windows, GQA; fp32 and other head dims run Triton. decode: CUDA split-KV (mma.sync, one block per "
    "KV head) for fp16/bf16 at head dim 64/128/256, GQA groups x new tokens <= 64; fp32, other head dims "
    "and larger groups run Triton; paged caches too (same coverage); paged_kv_append: CUDA. varlen: the CUDA VARLEN "
    "paths of the forward and backward (same coverage). options (softcap, ALiBi, dropout): CUDA forward, backward and "
    "decode (same coverage)"
)


def _triton(device: torch.device):
    """fastlm.triton.attention, for the cases the CUDA kernels do not cover; on CPU tensors only
    under the interpreter (TRITON_INTERPRET=1)."""
    if device.type == "cpu" and not interpreter_on():
        raise BackendUnavailableError(
            "fastlm.cuda.attention: this case is served by the Triton kernels (see CUDA_COVERAGE), which run on CPU "
            "tensors only under the interpreter: set TRITON_INTERPRET=1 before importing fastlm"
        )
    try:
        from fastlm.triton import attention as triton_attention
    except Exception as exc:  # pragma: no cover - depends on the machine
        raise BackendUnavailableError(
            f"fastlm.cuda.attention: this case is served by the Triton kernels (see CUDA_COVERAGE), and triton is not importable: {exc}"
        ) from exc
    return triton_attention


def _cuda_options(softcap=0.0, alibi_slopes=None, dropout_p=0.0, seed=None) -> tuple[dict, list]:
    """The options as the CUDA launchers' keyword arguments (softcap, alibi_slopes pointer and batch
    stride, dropout_p, seed pointer), and the tensors those pointers keep alive."""
    kw, keep = {}, []
    if softcap:
        kw["softcap"] = float(softcap)
    if alibi_slopes is not None:
        slopes = alibi_slopes if alibi_slopes.stride(-1) == 1 else alibi_slopes.contiguous()
        kw.update(alibi_slopes=ptr(slopes), alibi_stride_b=slopes.stride(0) if slopes.dim() == 2 else 0)
        keep.append(slopes)
    if dropout_p:
        if seed is None:
            raise ValueError("fastlm.cuda.attention: dropout_p > 0 needs seed = an int64 tensor [seed, offset]")
        seed = seed.contiguous()
        kw.update(dropout_p=float(dropout_p), seed=ptr(seed))
        keep.append(seed)
    return kw, keep


def _rows_aligned(*tensors, elems: int) -> bool:
    for t in tensors:
        if t.data_ptr() % 16 or any(s % elems for s in t.stride()[:-1]) or t.stride(-1) != 1:
            return False
    return True


def _strides(q, k, v, out, lse) -> list[int]:
    return [*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], lse.stride(0), lse.stride(1)]


def fwd_runs_cuda(q, k, v, causal, window_left, window_right, out, scale=1.0) -> bool:
    """True when attention_fwd runs the CUDA kernel for these arguments (else Triton)."""
    B, Hq, _, D = q.shape
    return (
        scale > 0
        and math.isfinite(scale)
        and q.shape[2] + k.shape[2] <= 2**30 - 1
        and bool(lib(q.device).attention_fwd_supported(D, dtype_code(q)))
        and bool(lib(q.device).attention_fwd_grids(max(B, 1), max(Hq, 1), max(q.shape[2], 1), 1))
        and _rows_aligned(q, k, v, out, elems=8)
    )


def _sm_count(device: torch.device) -> int:
    if torch.device(device).type == "cpu":
        return lib(device).emulation_sm_count()
    return torch.cuda.get_device_properties(device).multi_processor_count


def fwd_splits_for(batch: int, q_heads: int, sq: int, sk: int, device: torch.device) -> int:
    """Key splits per query block: 1 when the B * Hq * ceil(Sq / 128) blocks fill the SMs; else
    enough to cover them once, each split at least 4 key tiles (256 keys), at most 32."""
    blocks = batch * q_heads * -(-sq // lib(device).attention_fwd_block_rows())
    sms = _sm_count(device)
    if blocks >= sms:
        return 1
    return max(1, min(-(-sms // blocks), sk // 256, 32))


def attention_fwd(q, k, v, causal, scale, window_left, window_right, out, lse, num_splits=None, *, softcap=0.0,
                  alibi_slopes=None, dropout_p=0.0, seed=None) -> None:
    """See fastlm.triton.attention.attention_fwd. num_splits: key splits per query block (None:
    ``fwd_splits_for``); CUDA only."""
    opts = attention_options(softcap, alibi_slopes, dropout_p, seed)
    if not fwd_runs_cuda(q, k, v, causal, window_left, window_right, out, scale):
        T = _triton(q.device)
        if not interpreted_bf16(q):
            return T.attention_fwd(q, k, v, causal, scale, window_left, window_right, out, lse, **opts)
        out32 = torch.empty_like(out, dtype=torch.float32)
        T.attention_fwd(q.float(), k.float(), v.float(), causal, scale, window_left, window_right, out32, lse, **opts)
        out.copy_(out32)
        return
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    if B == 0 or Hq == 0 or Sq == 0:
        return
    splits = num_splits or fwd_splits_for(B, Hq, Sq, Sk, q.device)
    o_part = l_part = None
    if splits > 1:
        o_part = torch.empty((splits, B * Hq * Sq, D), device=q.device, dtype=torch.float32)
        l_part = torch.empty((splits, B * Hq * Sq), device=q.device, dtype=torch.float32)
    kw, _alive = _cuda_options(softcap, alibi_slopes, dropout_p, seed)
    code = lib(q.device).attention_fwd(
        ptr(q), ptr(k), ptr(v), ptr(out), ptr(lse), ptr(o_part), ptr(l_part), B, Hq, Hkv, Sq, Sk, D, _strides(q, k, v, out, lse), float(scale),
        bool(causal), int(window_left), int(window_right), splits, dtype_code(q), stream_handle(q), **kw,
    )
    check(code, "attention_fwd")


def bwd_runs_cuda(do, q, k, v, out, dq, dk, dv) -> bool:
    """True when attention_bwd runs the CUDA kernels for these arguments (else Triton); the options
    (softcap, ALiBi, dropout) do not change it."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    tensors = (do, q, k, v, out, dq, dk, dv)
    return (
        all(t.dtype == q.dtype for t in tensors)
        and bool(lib(q.device).attention_bwd_supported(D, dtype_code(q)))
        and bool(lib(q.device).attention_bwd_grids(max(B, 1), max(Hq, 1), max(Hkv, 1), max(Sq, 1), Sk))
        and _rows_aligned(*tensors, elems=8)
    )


def attention_bwd(do, dlse, q, k, v, out, lse, causal, scale, window_left, window_right, dq, dk, dv, deterministic=True, *,
                  softcap=0.0, alibi_slopes=None, dropout_p=0.0, seed=None) -> None:
    """See fastlm.triton.attention.attention_bwd (always deterministic; so are the CUDA kernels:
    every output element is summed by one block in a fixed order). The options run in the CUDA
    kernels too (dropout recomputed from seed)."""
    opts = attention_options(softcap, alibi_slopes, dropout_p, seed)
    if bwd_runs_cuda(do, q, k, v, out, dq, dk, dv):
        return _attention_bwd_cuda(do, dlse, q, k, v, out, lse, causal, scale, window_left, window_right, dq, dk, dv, **opts)
    T = _triton(q.device)
    if not interpreted_bf16(q):
        return T.attention_bwd(do, dlse, q, k, v, out, lse, causal, scale, window_left, window_right, dq, dk, dv, deterministic,
                               **opts)
    grads = [torch.empty_like(g, dtype=torch.float32) for g in (dq, dk, dv)]
    T.attention_bwd(do.float(), dlse, q.float(), k.float(), v.float(), out.float(), lse, causal, scale,
                    window_left, window_right, *grads, deterministic, **opts)
    for g, g32 in zip((dq, dk, dv), grads, strict=True):
        g.copy_(g32)


def _unit_last(t):
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _attention_bwd_cuda(do, dlse, q, k, v, out, lse, causal, scale, window_left, window_right, dq, dk, dv, **opts) -> None:
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    if B == 0 or Hkv == 0:
        return
    if Sq == 0:
        dk.zero_()
        dv.zero_()
        return
    if lse.shape != (B, Hq, Sq) or (dlse is not None and dlse.shape != (B, Hq, Sq)):
        raise ValueError(f"fastlm.cuda.attention: lse and dlse must have shape {(B, Hq, Sq)} (got {tuple(lse.shape)} and "
                         f"{None if dlse is None else tuple(dlse.shape)})")
    lse = _unit_last(lse.float())
    dlse = _unit_last(dlse.float()) if dlse is not None else None
    C = lib(q.device)
    workspace = torch.empty(C.attention_bwd_workspace_size(B, Hq, Sq), device=q.device, dtype=torch.float32)
    option_args, _alive = _cuda_options(**opts)  # after the last other _C call: ptr() extents go to the next one
    strides = [*(s for t in (q, k, v, out, do, dq, dk, dv) for s in t.stride()[:3]), lse.stride(0), lse.stride(1)]
    strides += [dlse.stride(0), dlse.stride(1)] if dlse is not None else [0, 0]
    code = C.attention_bwd(
        ptr(do), ptr(dlse), ptr(q), ptr(k), ptr(v), ptr(out), ptr(lse), ptr(dq), ptr(dk),
        ptr(dv), ptr(workspace), B, Hq, Hkv, Sq, Sk, D, strides, float(scale), bool(causal), int(window_left),
        int(window_right), dtype_code(q), stream_handle(q), **option_args,
    )
    check(code, "attention_bwd")


def decode_runs_cuda(q, k_cache, v_cache, block_table=None) -> bool:
    """True when decode_attention_fwd runs the CUDA kernels for these arguments (else Triton)."""
    C = lib(q.device)
    return (
        bool(C.decode_attention_supported(q.shape[-1], dtype_code(q)))
        and bool(C.decode_attention_grids(max(q.shape[0], 1), q.shape[1], k_cache.shape[1], q.shape[2], 1))
        and _rows_aligned(k_cache, v_cache, elems=8)
    )


def num_splits_for(batch: int, kv_heads: int, s_max: int, device: torch.device) -> int:
    """Splits so that splits * batch * kv_heads blocks (one per key/value head and split) cover the
    SMs about twice, each split at least 128 keys of S_max long, at most 64. From S_max, not the live
    lengths, so it needs no device->host sync and stays fixed under CUDA-graph capture (each block's
    chunk follows its own sequence's length). On CPU tensors the SMs are fastlm._C_host's emulated ones."""
    want = -(-2 * _sm_count(device) // max(1, batch * kv_heads))
    return max(1, min(want, -(-s_max // 128), 64))


def decode_attention_fwd(q, k_cache, v_cache, cache_seqlens, scale, window_left, window_right, out, lse, num_splits=None,
                         block_table=None, *, softcap=0.0, alibi_slopes=None) -> None:
    """See fastlm.triton.attention.decode_attention_fwd (block_table: paged caches)."""
    opts = attention_options(softcap, alibi_slopes)
    if not decode_runs_cuda(q, k_cache, v_cache, block_table):
        T = _triton(q.device)
        if not interpreted_bf16(q):
            return T.decode_attention_fwd(q, k_cache, v_cache, cache_seqlens, scale, window_left, window_right, out, lse, num_splits,
                                          block_table=block_table, **opts)
        out32 = torch.empty_like(out, dtype=torch.float32)
        T.decode_attention_fwd(q.float(), k_cache.float(), v_cache.float(), cache_seqlens, scale, window_left, window_right,
                               out32, lse, num_splits, block_table=block_table, **opts)
        out.copy_(out32)
        return
    B, Hq, Sq, D = q.shape
    Hkv = k_cache.shape[1]
    page_size = k_cache.shape[2] if block_table is not None else 0
    if block_table is not None and block_table.stride(1) != 1:
        block_table = block_table.contiguous()
    S_max = block_table.shape[1] * page_size if block_table is not None else k_cache.shape[2]
    if B == 0 or Hq == 0 or Sq == 0:
        return
    splits = num_splits or num_splits_for(B, Hkv, S_max, q.device)
    o_part = l_part = None  # one split writes out and lse directly
    if splits > 1:
        o_part = torch.empty((splits, B * Hq * Sq, D), device=q.device, dtype=torch.float32)
        l_part = torch.empty((splits, B * Hq * Sq), device=q.device, dtype=torch.float32)
    lens = cache_seqlens if cache_seqlens.dtype == torch.int32 else cache_seqlens.to(torch.int32)
    lens = lens.contiguous()
    kw, _alive = _cuda_options(softcap, alibi_slopes)
    code = lib(q.device).decode_attention_fwd(
        ptr(q), ptr(k_cache), ptr(v_cache), ptr(lens), ptr(out), ptr(lse), ptr(o_part), ptr(l_part),
        B, Hq, Hkv, Sq, S_max, D, _strides(q, k_cache, v_cache, out, lse), splits, float(scale),
        int(window_left), int(window_right), dtype_code(q), stream_handle(q),
        ptr(block_table), block_table.stride(0) if block_table is not None else 0, page_size,
        k_cache.shape[0] if block_table is not None else 0, **kw,
    )
    check(code, "decode_attention_fwd")


def paged_kv_append(k_cache, v_cache, block_table, cache_seqlens, k_new, v_new) -> None:
    """See fastlm.triton.decode_attention.paged_kv_append: the CUDA copy kernel for every dtype and
    shape (16-byte copies on 16-byte aligned rows, element copies otherwise). cache_seqlens and
    block_table as int32 with unit stride (block_table's row stride any)."""
    for name, t in dict(k_cache=k_cache, v_cache=v_cache, k_new=k_new, v_new=v_new).items():
        if t.numel() and t.stride(-1) != 1:
            raise ValueError(f"fastlm.cuda.paged_kv_append: {name} must have unit stride in the head dim (got strides {t.stride()})")
    B, Hkv, S_new, D = k_new.shape
    if B == 0 or Hkv == 0 or S_new == 0:
        return
    lens = cache_seqlens if cache_seqlens.dtype == torch.int32 else cache_seqlens.to(torch.int32)
    lens = lens.contiguous()
    table = block_table if block_table.stride(1) == 1 else block_table.contiguous()
    strides = [*k_new.stride()[:3], *v_new.stride()[:3], *k_cache.stride()[:3], *v_cache.stride()[:3], table.stride(0)]
    code = lib(k_new.device).paged_kv_append(
        ptr(k_cache), ptr(v_cache), ptr(table), ptr(lens), ptr(k_new), ptr(v_new), B, Hkv, S_new, D, k_cache.shape[2],
        table.shape[1], k_cache.shape[0], strides, dtype_code(k_new), stream_handle(k_new),
    )
    check(code, "paged_kv_append")


def varlen_fwd_runs_cuda(q, k, v, out, lse, max_seqlen_q, max_seqlen_k, scale=1.0) -> bool:
    """True when attention_varlen_fwd runs the CUDA kernel (the forward's VARLEN path) for these
    arguments (else Triton): the dense forward's coverage, packed rows within 2^30 - 1, lse with
    unit stride in its rows."""
    Tq, Hq, D = q.shape
    return (
        scale > 0
        and math.isfinite(scale)
        and q.shape[0] + k.shape[0] <= 2**30 - 1
        and max_seqlen_q + max_seqlen_k <= 2**30 - 1
        and Hq * Tq <= 2**31 - 1
        and bool(lib(q.device).attention_fwd_supported(D, dtype_code(q)))
        and bool(lib(q.device).attention_fwd_grids(1, max(Hq, 1), max(max_seqlen_q, 1), 1))
        and _rows_aligned(q, k, v, out, elems=8)
        and (lse.numel() == 0 or lse.stride(-1) == 1)
    )


def attention_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
                         window_left, window_right, out, lse, num_splits=None, *, softcap=0.0, alibi_slopes=None, dropout_p=0.0,
                         seed=None) -> None:
    """See fastlm.triton.attention.attention_varlen_fwd. The CUDA VARLEN kernels where
    ``varlen_fwd_runs_cuda`` (grid B * Hq * ceil(max_seqlen_q / 128) * splits; no host sync), else
    Triton. num_splits: key splits per query block (None: ``fwd_splits_for`` on the longest lengths)."""
    if not varlen_fwd_runs_cuda(q, k, v, out, lse, max_seqlen_q, max_seqlen_k, scale):
        T, opts = _triton(q.device), attention_options(softcap, alibi_slopes, dropout_p, seed)
        if not interpreted_bf16(q):
            return T.attention_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
                                          window_left, window_right, out, lse, **opts)
        out32 = torch.empty_like(out, dtype=torch.float32)
        T.attention_varlen_fwd(q.float(), k.float(), v.float(), cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                               scale, window_left, window_right, out32, lse, **opts)
        out.copy_(out32)
        return
    Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[0], k.shape[1]
    B = cu_seqlens_q.shape[0] - 1
    if B <= 0 or Hq == 0 or Tq == 0 or max_seqlen_q <= 0:
        return
    splits = num_splits or fwd_splits_for(B, Hq, max_seqlen_q, max_seqlen_k, q.device)
    o_part = l_part = None
    if splits > 1:
        o_part = torch.empty((splits, Hq * Tq, D), device=q.device, dtype=torch.float32)
        l_part = torch.empty((splits, Hq * Tq), device=q.device, dtype=torch.float32)
    cq, ck = (c if c.dtype == torch.int32 else c.to(torch.int32) for c in (cu_seqlens_q, cu_seqlens_k))
    cq, ck = cq.contiguous(), ck.contiguous()
    strides = [*q.stride()[:2], *k.stride()[:2], *v.stride()[:2], *out.stride()[:2], lse.stride(0)]
    kw, _alive = _cuda_options(softcap, alibi_slopes, dropout_p, seed)
    code = lib(q.device).attention_varlen_fwd(
        ptr(q), ptr(k), ptr(v), ptr(cq), ptr(ck), ptr(out), ptr(lse), ptr(o_part), ptr(l_part), B, Hq, Hkv, Tq, Tk,
        int(max_seqlen_q), int(max_seqlen_k), D, strides, float(scale), bool(causal), int(window_left), int(window_right),
        splits, dtype_code(q), stream_handle(q), **kw,
    )
    check(code, "attention_varlen_fwd")


def varlen_bwd_runs_cuda(do, q, k, v, out, dq, dk, dv, cu_seqlens_q, max_seqlen_q, max_seqlen_k) -> bool:
    """True when attention_varlen_bwd runs the CUDA kernels for these arguments (else Triton): the
    dense backward's coverage (fp16/bf16, head dim 64 or 128, 16-byte aligned rows) with the grids
    of B = len(cu_seqlens_q) - 1 sequences of max_seqlen_q queries and max_seqlen_k keys."""
    Hq, D = q.shape[1], q.shape[2]
    tensors = (do, q, k, v, out, dq, dk, dv)
    C = lib(q.device)
    return (
        all(t.dtype == q.dtype for t in tensors)
        and bool(C.attention_bwd_supported(D, dtype_code(q)))
        and bool(C.attention_bwd_grids(max(cu_seqlens_q.shape[0] - 1, 1), max(Hq, 1), max(k.shape[1], 1), max(max_seqlen_q, 1),
                                       max(max_seqlen_k, 0)))
        and _rows_aligned(*tensors, elems=8)
    )


def attention_varlen_bwd(do, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
                         window_left, window_right, dq, dk, dv, deterministic=True, *, softcap=0.0, alibi_slopes=None,
                         dropout_p=0.0, seed=None) -> None:
    """See fastlm.triton.attention.attention_varlen_bwd: the CUDA kernels of attention_bwd with
    per-sequence bounds read from cu_seqlens on the device (no host sync) where
    ``varlen_bwd_runs_cuda``, options included; else the Triton one."""
    opts = attention_options(softcap, alibi_slopes, dropout_p, seed)
    if varlen_bwd_runs_cuda(do, q, k, v, out, dq, dk, dv, cu_seqlens_q, max_seqlen_q, max_seqlen_k):
        return _attention_varlen_bwd_cuda(do, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                          causal, scale, window_left, window_right, dq, dk, dv, **opts)
    T = _triton(q.device)
    if not interpreted_bf16(q):
        return T.attention_varlen_bwd(do, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                      causal, scale, window_left, window_right, dq, dk, dv, deterministic, **opts)
    grads = [torch.empty_like(g, dtype=torch.float32) for g in (dq, dk, dv)]
    T.attention_varlen_bwd(do.float(), dlse, q.float(), k.float(), v.float(), out.float(), lse, cu_seqlens_q, cu_seqlens_k,
                           max_seqlen_q, max_seqlen_k, causal, scale, window_left, window_right, *grads, deterministic, **opts)
    for g, g32 in zip((dq, dk, dv), grads, strict=True):
        g.copy_(g32)


def _attention_varlen_bwd_cuda(do, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
                               window_left, window_right, dq, dk, dv, **opts) -> None:
    Tq, Hq, D = q.shape
    Hkv = k.shape[1]
    B = cu_seqlens_q.shape[0] - 1
    if B <= 0 or Hkv == 0:
        return
    if Tq == 0 or max_seqlen_q <= 0:
        dk.zero_()
        dv.zero_()
        return
    if lse.shape != (Hq, Tq) or (dlse is not None and dlse.shape != (Hq, Tq)):
        raise ValueError(f"fastlm.cuda.attention: lse and dlse must have shape {(Hq, Tq)} (got {tuple(lse.shape)} and "
                         f"{None if dlse is None else tuple(dlse.shape)})")
    lse = _unit_last(lse.float())
    dlse = _unit_last(dlse.float()) if dlse is not None else None
    cu_q = cu_seqlens_q.to(torch.int32).contiguous()
    cu_k = cu_seqlens_k.to(torch.int32).contiguous()
    C = lib(q.device)
    workspace = torch.empty(C.attention_bwd_workspace_size(B, Hq, max_seqlen_q), device=q.device, dtype=torch.float32)
    option_args, _alive = _cuda_options(**opts)  # after the last other _C call: ptr() extents go to the next one
    strides = [*(s for t in (q, k, v, out, do, dq, dk, dv) for s in (0, t.stride(1), t.stride(0))), 0, lse.stride(0)]
    strides += [0, dlse.stride(0)] if dlse is not None else [0, 0]
    code = C.attention_varlen_bwd(
        ptr(do), ptr(dlse), ptr(q), ptr(k), ptr(v), ptr(out), ptr(lse), ptr(dq), ptr(dk), ptr(dv), ptr(workspace),
        ptr(cu_q), ptr(cu_k), B, Hq, Hkv, int(max_seqlen_q), int(max_seqlen_k), D, strides, float(scale), bool(causal),
        int(window_left), int(window_right), dtype_code(q), stream_handle(q), **option_args,
    )
    check(code, "attention_varlen_bwd")
