"""CUDA launchers for attention (csrc/attention.cu), with the signatures of fastlm/triton/attention.py.

What runs as CUDA and what does not (the cuda backend never fails on a valid call: it hands what
its kernels do not cover to the Triton launcher, which computes the same thing):
- attention forward: CUDA for fp16/bf16, head dim 64 or 128, causal or not, any GQA ratio, no
  sliding window, B * Hq * ceil(Sq / 64) <= 2^31 - 1 blocks (``_C.attention_fwd_grids``), 16-byte
  aligned rows; anything else (fp32, other head dims, a window) runs the Triton forward.
- attention backward: always the Triton backward (there is no CUDA backward yet).
- decode_attention: CUDA for fp16/bf16 at head dim 64, 128 or 256 (with or without a left
  window), 16-byte aligned cache rows, B * Hq <= 2^31 - 1 (``_C.decode_attention_grids``); anything
  else (fp32, other head dims) runs the Triton decode.
``CUDA_COVERAGE`` says this in one line for ``fastlm info``.
On CPU tensors the kernels run through fastlm._C_host and the Triton cases through the interpreter
(TRITON_INTERPRET=1), bf16 ones on fp32 copies rounded once (the interpreter's bf16 is wrong).
"""

from __future__ import annotations

import torch

from fastlm.backend import BackendUnavailableError, interpreted_bf16, interpreter_on
from fastlm.cuda import check, dtype_code, lib, ptr, stream_handle

CUDA_COVERAGE = (
    "forward: CUDA (mma.sync) for fp16/bf16 at head dim 64/128, causal or not, no window; other forward "
    "cases, and the whole backward, run the Triton kernels. decode: CUDA split-KV for fp16/bf16 at head "
    "dim 64/128/256; fp32 and other head dims run Triton"
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


def _rows_aligned(*tensors, elems: int) -> bool:
    for t in tensors:
        if t.data_ptr() % 16 or any(s % elems for s in t.stride()[:-1]) or t.stride(-1) != 1:
            return False
    return True


def _strides(q, k, v, out, lse) -> list[int]:
    return [*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], lse.stride(0), lse.stride(1)]


def fwd_runs_cuda(q, k, v, causal, window_left, window_right, out) -> bool:
    """True when attention_fwd runs the CUDA kernel for these arguments (else Triton)."""
    B, Hq, _, D = q.shape
    window = window_left >= 0 or (window_right >= 0 and not causal)
    return (
        not window
        and bool(lib(q.device).attention_fwd_supported(D, dtype_code(q)))
        and bool(lib(q.device).attention_fwd_grids(max(B, 1), max(Hq, 1), max(q.shape[2], 1)))
        and _rows_aligned(q, k, v, out, elems=8)
    )


def attention_fwd(q, k, v, causal, scale, window_left, window_right, out, lse) -> None:
    """See fastlm.triton.attention.attention_fwd."""
    if not fwd_runs_cuda(q, k, v, causal, window_left, window_right, out):
        T = _triton(q.device)
        if not interpreted_bf16(q):
            return T.attention_fwd(q, k, v, causal, scale, window_left, window_right, out, lse)
        out32 = torch.empty_like(out, dtype=torch.float32)
        T.attention_fwd(q.float(), k.float(), v.float(), causal, scale, window_left, window_right, out32, lse)
        out.copy_(out32)
        return
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    if B == 0 or Hq == 0 or Sq == 0:
        return
    code = lib(q.device).attention_fwd(
        ptr(q), ptr(k), ptr(v), ptr(out), ptr(lse), B, Hq, Hkv, Sq, Sk, D, _strides(q, k, v, out, lse),
        float(scale), bool(causal), dtype_code(q), stream_handle(q),
    )
    check(code, "attention_fwd")


def attention_bwd(do, dlse, q, k, v, out, lse, causal, scale, window_left, window_right, dq, dk, dv, deterministic=True) -> None:
    """The Triton backward (no CUDA backward yet); see fastlm.triton.attention.attention_bwd."""
    T = _triton(q.device)
    if not interpreted_bf16(q):
        return T.attention_bwd(do, dlse, q, k, v, out, lse, causal, scale, window_left, window_right, dq, dk, dv, deterministic)
    grads = [torch.empty_like(g, dtype=torch.float32) for g in (dq, dk, dv)]
    T.attention_bwd(do.float(), dlse, q.float(), k.float(), v.float(), out.float(), lse, causal, scale,
                    window_left, window_right, *grads, deterministic)
    for g, g32 in zip((dq, dk, dv), grads, strict=True):
        g.copy_(g32)


def decode_runs_cuda(q, k_cache, v_cache) -> bool:
    """True when decode_attention_fwd runs the CUDA kernels for these arguments (else Triton)."""
    C = lib(q.device)
    return (
        bool(C.decode_attention_supported(q.shape[-1], dtype_code(q)))
        and bool(C.decode_attention_grids(max(q.shape[0], 1), max(q.shape[1], 1), 1, 1))  # B * Hq fits
        and _rows_aligned(k_cache, v_cache, elems=8)
    )


def num_splits_for(batch: int, q_heads: int, s_max: int, device: torch.device) -> int:
    """Splits so that splits * batch * q_heads blocks cover the SMs about twice, each split at
    least 128 keys long, at most 64. On CPU tensors the SMs are fastlm._C_host's emulated ones."""
    if torch.device(device).type == "cpu":
        sms = lib(device).emulation_sm_count()
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = -(-2 * sms // max(1, batch * q_heads))
    return max(1, min(want, -(-s_max // 128), 64))


def decode_attention_fwd(q, k_cache, v_cache, cache_seqlens, scale, window_left, window_right, out, lse, num_splits=None) -> None:
    """See fastlm.triton.attention.decode_attention_fwd."""
    if not decode_runs_cuda(q, k_cache, v_cache):
        T = _triton(q.device)
        if not interpreted_bf16(q):
            return T.decode_attention_fwd(q, k_cache, v_cache, cache_seqlens, scale, window_left, window_right, out, lse, num_splits)
        out32 = torch.empty_like(out, dtype=torch.float32)
        T.decode_attention_fwd(q.float(), k_cache.float(), v_cache.float(), cache_seqlens, scale, window_left, window_right,
                               out32, lse, num_splits)
        out.copy_(out32)
        return
    B, Hq, Sq, D = q.shape
    Hkv, S_max = k_cache.shape[1], k_cache.shape[2]
    if B == 0 or Hq == 0 or Sq == 0:
        return
    splits = num_splits or num_splits_for(B, Hq, S_max, q.device)
    o_part = torch.empty((splits, B * Hq * Sq, D), device=q.device, dtype=torch.float32)
    l_part = torch.empty((splits, B * Hq * Sq), device=q.device, dtype=torch.float32)
    lens = cache_seqlens if cache_seqlens.dtype == torch.int32 else cache_seqlens.to(torch.int32)
    lens = lens.contiguous()
    code = lib(q.device).decode_attention_fwd(
        ptr(q), ptr(k_cache), ptr(v_cache), ptr(lens), ptr(out), ptr(lse), ptr(o_part), ptr(l_part),
        B, Hq, Hkv, Sq, S_max, D, _strides(q, k_cache, v_cache, out, lse), splits, float(scale),
        int(window_left), int(window_right), dtype_code(q), stream_handle(q),
    )
    check(code, "decode_attention_fwd")
