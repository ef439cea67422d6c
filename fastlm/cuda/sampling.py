"""CUDA launchers for sampling (csrc/sampling.cu), with the signatures of fastlm/triton/sampling.py.

Per-row parameter tensors are cast on the device (no sync) to the kernel's types (fp32, top_k
int64); the workspaces of the pass sequence are allocated here with torch on the logits' device
(the histograms zeroed); data pointers, sizes, strides, the dtype code and the current stream go to
fastlm._C.sampling (fastlm._C_host on CPU tensors), which launches every pass on that stream, and
a non-zero CUDA error code raises.
"""

from __future__ import annotations

import torch

from fastlm.cuda import check, dtype_code, lib, ptr, stream_handle

CUDA_COVERAGE = ("sample and top_k_top_p_filter on fp32/fp16/bf16 logits, vocab up to 2^22, in at most 7 passes "
                 "over the logits plus one 2048-element chunk (radix selects for top-k and top-p, several blocks "
                 "a row when the batch is small, 16-byte loads on 16-byte aligned rows; sampling has no backward, "
                 "the filter's gradient is a masked copy of the upstream one)")

MAX_VOCAB = 1 << 22  # the int64 fixed-point masses of a row must not overflow
CHUNK = 2048  # elements of a lookup chunk (SUM and the draw) and of the slicing unit (csrc/sampling.cu kChunk)
BINS = 2048  # radix histogram bins
STATE_SLOTS = 6


def _params(V: int, temperature, top_k, top_p, min_p):
    def split(v, default, dtype):
        if isinstance(v, torch.Tensor):
            return v.to(dtype).contiguous(), default, True
        return None, (default if v is None else v), False

    T, t_val, has_t = split(temperature, 1.0, torch.float32)
    K, k_val, has_k = split(top_k, V, torch.int64)
    P, p_val, has_p = split(top_p, 1.0, torch.float32)
    MP, mp_val, has_mp = split(min_p, 0.0, torch.float32)
    all_greedy = not has_t and t_val == 0.0
    flags = (not all_greedy and (has_k or k_val < V), not all_greedy and (has_p or p_val < 1.0), has_mp or mp_val > 0.0)
    return (T, K, P, MP), (float(t_val), int(min(k_val, 2**62)), float(p_val), float(mp_val)), flags


def _sm_count(device: torch.device) -> int:
    if device.type == "cpu":
        return lib(device).emulation_sm_count()
    return torch.cuda.get_device_properties(device).multi_processor_count


def slices_for(B: int, V: int, device: torch.device, num_slices=None) -> int:
    """Blocks a row: 1 when B alone fills the GPU, else min(ceil(2 SMs / B), ceil(V / 4096), 32);
    a given num_slices (>= 1) is capped at the row's ceil(V / 2048) chunks."""
    chunks = -(-V // CHUNK)
    if num_slices is None:
        sms = _sm_count(device)
        return 1 if B >= 2 * sms else max(1, min(-(-2 * sms // max(B, 1)), -(-V // 4096), 32))
    if isinstance(num_slices, bool) or not isinstance(num_slices, int) or num_slices < 1:
        raise ValueError(f"fastlm.cuda.sampling: num_slices must be an int >= 1 or None, got {num_slices!r}")
    return min(num_slices, chunks)


def _launch(logits, params, seed, tokens, logprobs, out, loads, num_slices, what) -> None:
    B, V = logits.shape
    if V > MAX_VOCAB:
        raise ValueError(f"fastlm.ops.{what}: the cuda backend takes a vocabulary of at most {MAX_VOCAB}, got {V}; use backend='triton'")
    if B == 0:
        return
    if loads is not None and (loads.dtype != torch.int64 or tuple(loads.shape) != (B,) or loads.device != logits.device
                              or not loads.is_contiguous()):
        raise ValueError(f"fastlm.cuda.sampling.{what}: loads must be a contiguous ({B},) int64 tensor on {logits.device}, "
                         f"got {tuple(loads.shape)} {loads.dtype} on {loads.device}")
    tensors, vals, flags = params
    dev = logits.device
    ns = slices_for(B, V, dev, num_slices)
    use_k, use_p, _ = flags
    stats = torch.empty((B, ns, 3), device=dev, dtype=torch.int64)
    state = torch.empty((B, STATE_SLOTS, 2), device=dev, dtype=torch.int64)
    hist_k = torch.zeros((B, 3, BINS), device=dev, dtype=torch.int32) if use_k else None
    hist_p = torch.zeros((B, 3, BINS), device=dev, dtype=torch.int64) if use_p else None
    chunk_sum = torch.empty((B, -(-V // CHUNK)), device=dev, dtype=torch.int64) if out is None else None
    code = lib(dev).sampling(
        ptr(logits), B, V, logits.stride(0), dtype_code(logits), *(ptr(t) for t in tensors), *vals, *flags,
        ptr(seed), ptr(tokens), ptr(logprobs), ptr(out), 0 if out is None else out.stride(0), ptr(loads), ns,
        ptr(stats), ptr(hist_k), ptr(hist_p), ptr(state), ptr(chunk_sum), stream_handle(logits),
    )
    check(code, what)


def sample(logits, temperature, top_k, top_p, min_p, seed, tokens, logprobs, *, loads=None, num_slices=None) -> None:
    """See fastlm.triton.sampling.sample. loads: a zeroed (B,) int64 tensor receiving the logits
    elements each row loaded; num_slices: blocks a row (None: ``slices_for``)."""
    _launch(logits, _params(logits.shape[1], temperature, top_k, top_p, min_p), seed, tokens, logprobs, None, loads,
            num_slices, "sample")


def top_k_top_p_filter(logits, top_k, top_p, min_p, out, status, *, loads=None, num_slices=None) -> None:
    """See fastlm.triton.sampling.top_k_top_p_filter (loads, num_slices: as ``sample``)."""
    if out.stride(1) != 1:
        raise ValueError("fastlm.cuda.sampling.top_k_top_p_filter: out needs unit column stride")
    _launch(logits, _params(logits.shape[1], None, top_k, top_p, min_p), None, status, None, out, loads, num_slices,
            "top_k_top_p_filter")
