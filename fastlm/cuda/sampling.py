"""CUDA launchers for sampling (csrc/sampling.cu), with the signatures of fastlm/triton/sampling.py.

Per-row parameter tensors are cast on the device (no sync) to the kernel's types (fp32, top_k
int64); data pointers, sizes, strides, the dtype code and the current stream go to
fastlm._C.sampling (fastlm._C_host on CPU tensors), and a non-zero CUDA error code raises.
"""

from __future__ import annotations

import torch

from fastlm.cuda import check, dtype_code, lib, ptr, stream_handle

CUDA_COVERAGE = ("sample and top_k_top_p_filter on fp32/fp16/bf16 logits, vocab up to 2^22 "
                 "(sampling has no backward; the filter's gradient is a masked copy of the upstream one)")


def _params(V: int, temperature, top_k, top_p, min_p):
    def split(v, default, dtype):
        if isinstance(v, torch.Tensor):
            return v.to(dtype).contiguous(), default, True
        return None, (default if v is None else v), False

    T, t_val, _ = split(temperature, 1.0, torch.float32)
    K, k_val, has_k = split(top_k, V, torch.int64)
    P, p_val, has_p = split(top_p, 1.0, torch.float32)
    MP, mp_val, has_mp = split(min_p, 0.0, torch.float32)
    flags = (has_k or k_val < V, has_p or p_val < 1.0, has_mp or mp_val > 0.0)
    return (T, K, P, MP), (float(t_val), int(min(k_val, 2**62)), float(p_val), float(mp_val)), flags


MAX_VOCAB = 1 << 22  # the int64 fixed-point masses of a row must not overflow


def _launch(logits, params, seed, tokens, logprobs, out, what) -> None:
    B, V = logits.shape
    if V > MAX_VOCAB:
        raise ValueError(f"fastlm.ops.{what}: the cuda backend takes a vocabulary of at most {MAX_VOCAB}, got {V}; use backend='triton'")
    if B == 0:
        return
    tensors, vals, flags = params
    code = lib(logits.device).sampling(
        ptr(logits), B, V, logits.stride(0), dtype_code(logits), *(ptr(t) for t in tensors), *vals, *flags,
        ptr(seed), ptr(tokens), ptr(logprobs), ptr(out), 0 if out is None else out.stride(0), stream_handle(logits),
    )
    check(code, what)


def sample(logits, temperature, top_k, top_p, min_p, seed, tokens, logprobs) -> None:
    """See fastlm.triton.sampling.sample."""
    _launch(logits, _params(logits.shape[1], temperature, top_k, top_p, min_p), seed, tokens, logprobs, None, "sample")


def top_k_top_p_filter(logits, top_k, top_p, min_p, out, status) -> None:
    """See fastlm.triton.sampling.top_k_top_p_filter."""
    if out.stride(1) != 1:
        raise ValueError("fastlm.cuda.sampling.top_k_top_p_filter: out needs unit column stride")
    _launch(logits, _params(logits.shape[1], None, top_k, top_p, min_p), None, status, None, out, "top_k_top_p_filter")
