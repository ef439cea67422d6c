"""Scaled dot-product attention in plain PyTorch: the oracle for the kernels and the CPU fallback.

Layout (B, H, S, D). Computed in float32 (float64 for float64 inputs); the output in the input's
dtype, the log-sum-exp in float32 (float64 for float64 inputs).

    S = scale * Q K^T,  P = softmax(S over the visible keys),  O = P V,  LSE = log sum_j exp(S_ij)

Visibility of key j to query i, with the diagonal aligned bottom-right (off = Sk - Sq, so the last
query sees the last key, which is what chunked prefill and decode need):
    causal:          j <= i + off
    window (l, r):   i + off - l <= j <= i + off + r      (l or r = -1: that side unbounded)
Causal and a window combine (causal caps r at 0). A query that sees no key gets O = 0, LSE = -inf.
GQA/MQA: Hq = G * Hkv; query head h reads key/value head h // G.

decode_attention: the new Sq tokens are the last Sq of each sequence b, whose keys fill
cache[b, :, :L_b]; it equals attention(causal=True) over those L_b keys, per sequence. Keys that
no query sees (the cache beyond L_b) are never read into the result: NaN or inf there cannot reach
the output.
"""

from __future__ import annotations

import math

import torch


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def visible_mask(sq: int, sk: int, causal: bool = False, window=None, device=None) -> torch.Tensor:
    """(Sq, Sk) bool: key j is visible to query i (bottom-right aligned)."""
    left, right = window if window is not None else (-1, -1)
    if causal:
        right = 0 if right < 0 else min(right, 0)
    i = torch.arange(sq, device=device)[:, None]
    j = torch.arange(sk, device=device)[None, :]
    diag = i + (sk - sq)
    mask = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if right >= 0:
        mask &= j <= diag + right
    if left >= 0:
        mask &= j >= diag - left
    return mask


def _masked_attention(q, k, v, mask, scale, return_lse):
    """softmax(scale q k^T) v over the keys where mask (broadcast to (..., Sq, Sk)) is True."""
    ct = _compute_dtype(q)
    hq, hkv = q.shape[-3], k.shape[-3]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    qf, kf, vf = q.to(ct), k.to(ct), v.to(ct)
    if hq != hkv:
        kf = kf.repeat_interleave(hq // hkv, dim=-3)
        vf = vf.repeat_interleave(hq // hkv, dim=-3)
    # Keys no query sees (a cache beyond its length) never reach the products, even as NaN * 0.
    used = mask.any(-2)[..., None]
    kf, vf = torch.where(used, kf, 0.0), torch.where(used, vf, 0.0)
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    mask = mask.expand_as(s)
    seen = mask.any(-1, keepdim=True)
    # Rows that see no key are filled with 0 (not -inf) so that no NaN appears, even in gradients.
    s = torch.where(mask, s, torch.where(seen, float("-inf"), 0.0))
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    p = torch.where(mask, torch.exp(s - lse), 0.0)
    out = torch.matmul(p, vf).to(q.dtype)
    if not return_lse:
        return out
    return out, torch.where(seen, lse, float("-inf")).squeeze(-1)


def attention(q, k, v, causal=False, scale=None, window=None, return_lse=False):
    """Reference attention; differentiable by autograd (rows that see no key have zero gradient)."""
    mask = visible_mask(q.shape[-2], k.shape[-2], causal, window, device=q.device)
    return _masked_attention(q, k, v, mask, scale, return_lse)


def paged_to_contiguous(cache, block_table):
    """The contiguous cache (B, Hkv, max_pages * page_size, D) of a paged one (num_pages, Hkv,
    page_size, D): row j of sequence b is row j % page_size of page block_table[b, j // page_size].
    Page ids outside [0, num_pages) are clamped (the rows of pages past L_b are masked anyway)."""
    pages = cache[block_table.long().clamp(0, cache.shape[0] - 1)]  # (B, max_pages, Hkv, page_size, D)
    B, P, H, ps, D = pages.shape
    return pages.transpose(1, 2).reshape(B, H, P * ps, D)


def decode_attention(q, k_cache, v_cache, cache_seqlens, scale=None, window=None, return_lse=False, block_table=None):
    """Per sequence b: attention(q[b], cache[b, :, :L_b], causal=True, window) with L_b = cache_seqlens[b]
    (computed for all sequences at once, with a per-sequence mask). With block_table the caches are
    paged and are gathered into contiguous ones first (paged_to_contiguous)."""
    if block_table is not None:
        k_cache, v_cache = paged_to_contiguous(k_cache, block_table), paged_to_contiguous(v_cache, block_table)
    sq, s_max = q.shape[-2], k_cache.shape[-2]
    left, right = window if window is not None else (-1, -1)
    right = 0 if right < 0 else min(right, 0)
    n = cache_seqlens.to(device=q.device, dtype=torch.int64).clamp(0, s_max)[:, None, None, None]
    i = torch.arange(sq, device=q.device)[:, None]
    j = torch.arange(s_max, device=q.device)[None, :]
    diag = n - sq + i
    mask = (j < n) & (j <= diag + right)
    if left >= 0:
        mask &= j >= diag - left
    return _masked_attention(q, k_cache, v_cache, mask, scale, return_lse)


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=False, scale=None, window=None, return_lse=False):
    """Packed attention: q (Tq, Hq, D), k/v (Tk, Hkv, D); sequence b owns query rows
    cu_seqlens_q[b]:cu_seqlens_q[b + 1] and key rows cu_seqlens_k[b]:cu_seqlens_k[b + 1], and gets
    attention() over them alone (bottom-right causal per sequence). out (Tq, Hq, D), lse (Hq, Tq).
    A loop over the sequences (one host sync for the offsets); differentiable by autograd."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [q.new_zeros((0, *q.shape[1:]))], [q.new_zeros((q.shape[1], 0), dtype=_compute_dtype(q))]
    for b in range(len(cq) - 1):
        qb = q[cq[b]:cq[b + 1]].transpose(0, 1)
        kb, vb = k[ck[b]:ck[b + 1]].transpose(0, 1), v[ck[b]:ck[b + 1]].transpose(0, 1)
        out, lse = attention(qb, kb, vb, causal=causal, scale=scale, window=window, return_lse=True)
        outs.append(out.transpose(0, 1))
        lses.append(lse)
    out, lse = torch.cat(outs, 0), torch.cat(lses, 1)
    return (out, lse) if return_lse else out


def paged_kv_append(k_cache, v_cache, block_table, cache_seqlens, k_new, v_new):
    """In place: k_new[b, :, s], v_new[b, :, s] (B, Hkv, S_new, D) go to position p = cache_seqlens[b] + s
    of sequence b, row p % page_size of page block_table[b, p // page_size] of the paged caches
    (num_pages, Hkv, page_size, D). cache_seqlens is not changed. Positions must lie within
    max_pages * page_size and their page ids within [0, num_pages) (unchecked here)."""
    ps = k_cache.shape[2]
    pos = cache_seqlens.long()[:, None] + torch.arange(k_new.shape[2], device=k_new.device)  # (B, S_new)
    page = block_table.long().gather(1, pos // ps)
    slot = pos % ps
    k_cache[page, :, slot] = k_new.transpose(1, 2).to(k_cache.dtype)
    v_cache[page, :, slot] = v_new.transpose(1, 2).to(v_cache.dtype)
