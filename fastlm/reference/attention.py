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

Options (flash-attn's semantics), applied in this order to the scaled score S = scale q.k:
    softcap c > 0:   S <- c tanh(S / c)                               (Gemma 2; c = 0: off)
    ALiBi:           S <- S - slope_h |i + off - j|                   (alibi_slopes (Hq,) or (B, Hq), fp32;
                                                                       no gradient reaches the slopes)
    then the mask and P = softmax(S); the LSE is that of S (before dropout).
    dropout p:       O = (P * keep / (1 - p)) V, keep_ij = word_{jg mod 4} of Philox4x32-10(counter =
                     (jg >> 2, ig, h, offset mod 2**32), key = (seed_lo, seed_hi)) >= floor(p 2**32)
                     (as uint32), where ig / jg are the query / key row in the packed layout (for a
                     (B, H, S, D) batch: b Sq + i and b Sk + j; for attention_varlen the packed rows
                     themselves), h the query head, and seed = [seed, offset] the int64 pair the op
                     draws like fastlm.ops.sample does. So attention on a batch and attention_varlen on
                     the same sequences packed drop the same entries, on every backend.

decode_attention: the new Sq tokens are the last Sq of each sequence b, whose keys fill
cache[b, :, :L_b]; it equals attention(causal=True) over those L_b keys, per sequence. Keys that
no query sees (the cache beyond L_b) are never read into the result: NaN or inf there cannot reach
the output.
"""

from __future__ import annotations

import math

import torch

from fastlm.reference.sampling import _M32, philox4x32


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


def dropout_keep(seed: torch.Tensor, p: float, q_rows: torch.Tensor, k_rows: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
    """The dropout keep mask (bool, the broadcast shape of q_rows, k_rows and heads): the packed query
    rows ig, key rows jg and query heads h, by the Philox rule in the module docstring."""
    seed = seed.to(torch.int64)
    s, off = seed[0], seed[1]
    ig, jg, h = torch.broadcast_tensors(q_rows.to(torch.int64), k_rows.to(torch.int64), heads.to(torch.int64))
    words = philox4x32(jg >> 2, ig, h, (off & _M32) + torch.zeros_like(ig), s & _M32, (s >> 32) & _M32)
    word = torch.stack(words, -1).gather(-1, (jg & 3)[..., None]).squeeze(-1)
    return word >= dropout_threshold(p)


def dropout_threshold(p: float) -> int:
    """floor(p 2**32) as a uint32 (an entry is kept iff its Philox word is >= this)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must lie in [0, 1), got {p}")
    return min(int(p * 2**32), 2**32 - 1)


def alibi_bias(slopes: torch.Tensor, sq: int, sk: int, device) -> torch.Tensor:
    """-slope_h |i + off - j| with off = Sk - Sq: (H, Sq, Sk) for slopes (H,), (B, H, Sq, Sk) for (B, H)."""
    i = torch.arange(sq, device=device)[:, None]
    j = torch.arange(sk, device=device)[None, :]
    return -slopes.double()[..., None, None] * (i + (sk - sq) - j).abs()


def _masked_attention(q, k, v, mask, scale, return_lse, softcap=0.0, bias=None, keep=None, dropout_p=0.0):
    """softmax(scale q k^T) v over the keys where mask (broadcast to (..., Sq, Sk)) is True; with the
    options of the module docstring (bias: the ALiBi term, keep: the dropout mask)."""
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
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if bias is not None:
        s = s + bias.to(s.dtype)
    mask = mask.expand_as(s)
    seen = mask.any(-1, keepdim=True)
    # Rows that see no key are filled with 0 (not -inf) so that no NaN appears, even in gradients.
    s = torch.where(mask, s, torch.where(seen, float("-inf"), 0.0))
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    p = torch.where(mask, torch.exp(s - lse), 0.0)
    if dropout_p:
        p = torch.where(keep, p, 0.0) * (1.0 / (1.0 - dropout_p))
    out = torch.matmul(p, vf).to(q.dtype)
    if not return_lse:
        return out
    return out, torch.where(seen, lse, float("-inf")).squeeze(-1)


def _options(q, sq, sk, softcap, alibi_slopes, dropout_p, seed, q_row0=0, k_row0=0):
    """(bias, keep) for q (B, H, Sq, D) or (H, Sq, D); the batch's packed rows start at q_row0 / k_row0."""
    bias = keep = None
    if alibi_slopes is not None:
        bias = alibi_bias(alibi_slopes.to(q.device), sq, sk, q.device)
    if dropout_p:
        if seed is None:
            raise ValueError("the reference dropout needs seed = an int64 tensor [seed, offset]")
        nb = q.shape[0] if q.dim() == 4 else 1
        b = torch.arange(nb, device=q.device)[:, None, None, None]
        i = torch.arange(sq, device=q.device)[None, None, :, None]
        j = torch.arange(sk, device=q.device)[None, None, None, :]
        h = torch.arange(q.shape[-3], device=q.device)[None, :, None, None]
        keep = dropout_keep(seed.to(q.device), dropout_p, q_row0 + b * sq + i, k_row0 + b * sk + j, h)
        if q.dim() == 3:
            keep = keep[0]
    return bias, keep


def attention(q, k, v, causal=False, scale=None, window=None, return_lse=False, softcap=0.0, alibi_slopes=None,
              dropout_p=0.0, seed=None, _rows=(0, 0)):
    """Reference attention; differentiable by autograd (rows that see no key have zero gradient)."""
    sq, sk = q.shape[-2], k.shape[-2]
    mask = visible_mask(sq, sk, causal, window, device=q.device)
    bias, keep = _options(q, sq, sk, softcap, alibi_slopes, dropout_p, seed, *_rows)
    return _masked_attention(q, k, v, mask, scale, return_lse, softcap, bias, keep, dropout_p)


def paged_to_contiguous(cache, block_table):
    """The contiguous cache (B, Hkv, max_pages * page_size, D) of a paged one (num_pages, Hkv,
    page_size, D): row j of sequence b is row j % page_size of page block_table[b, j // page_size].
    Page ids outside [0, num_pages) are clamped (the rows of pages past L_b are masked anyway)."""
    pages = cache[block_table.long().clamp(0, cache.shape[0] - 1)]  # (B, max_pages, Hkv, page_size, D)
    B, P, H, ps, D = pages.shape
    return pages.transpose(1, 2).reshape(B, H, P * ps, D)


def decode_attention(q, k_cache, v_cache, cache_seqlens, scale=None, window=None, return_lse=False, block_table=None,
                     softcap=0.0, alibi_slopes=None):
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
    bias = None
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(q.device)
        slopes = slopes.expand(q.shape[0], -1) if slopes.ndim == 1 else slopes
        bias = -slopes.double()[:, :, None, None] * (diag - j).abs()
    return _masked_attention(q, k_cache, v_cache, mask, scale, return_lse, softcap, bias)


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=False, scale=None, window=None, return_lse=False,
                     softcap=0.0, alibi_slopes=None, dropout_p=0.0, seed=None):
    """Packed attention: q (Tq, Hq, D), k/v (Tk, Hkv, D); sequence b owns query rows
    cu_seqlens_q[b]:cu_seqlens_q[b + 1] and key rows cu_seqlens_k[b]:cu_seqlens_k[b + 1], and gets
    attention() over them alone (bottom-right causal per sequence). out (Tq, Hq, D), lse (Hq, Tq).
    A loop over the sequences (one host sync for the offsets); differentiable by autograd."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [q.new_zeros((0, *q.shape[1:]))], [q.new_zeros((q.shape[1], 0), dtype=_compute_dtype(q))]
    for b in range(len(cq) - 1):
        qb = q[cq[b]:cq[b + 1]].transpose(0, 1)
        kb, vb = k[ck[b]:ck[b + 1]].transpose(0, 1), v[ck[b]:ck[b + 1]].transpose(0, 1)
        slopes = alibi_slopes if alibi_slopes is None or alibi_slopes.ndim == 1 else alibi_slopes[b]
        out, lse = attention(qb, kb, vb, causal=causal, scale=scale, window=window, return_lse=True, softcap=softcap,
                             alibi_slopes=slopes, dropout_p=dropout_p, seed=seed, _rows=(cq[b], ck[b]))
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
