"""KV-cache decode attention in Triton: split-KV (flash-decoding) plus a combine kernel.

A decode step has few query rows (Sq = 1..16 new tokens per sequence) and a long cache, so one
program per query block would leave the GPU idle at small batch. Instead the keys of each
sequence are cut into ``num_splits`` chunks; one program handles one (chunk, batch, kv head,
row block) and writes an fp32 partial output normalised by its own softmax sum, plus its
log-sum-exp. The rows of a program are all GROUP * Sq (query head, token) pairs of one kv head,
so K and V are read once for the whole GQA group (MQA: all heads). The combine kernel merges the
partials per row:
    m = max_s lse_s,  w_s = 2^(lse_s - m),  O = sum_s w_s O_s / sum_s w_s,  LSE = m + log2 sum_s w_s
Cost: an fp32 partial write + read per split (B * Hq * Sq * D * 4 bytes each), small beside the
cache read when the cache is long; the split count is picked so splits * B * Hkv fills the SMs.

Masking (per sequence b with L_b = cache_seqlens[b] keys, bottom-right aligned, always causal):
key j is visible to token t iff j < L_b and j <= L_b - Sq + t + RIGHT (RIGHT <= 0) and, with a
left window, j >= L_b - Sq + t - LEFT. Lengths are clamped to [0, S_max] in the kernel, so a bad
length can never read outside the cache. No autotuning (a decode step is captured in CUDA graphs,
where the autotuner's benchmarking cannot run): a fixed config per head dim.

Paged caches (PAGED): the caches are (num_pages, Hkv, PAGE_SIZE, D) and block_table (B, max_pages)
maps key j of sequence b to row j % PAGE_SIZE of page block_table[b, j // PAGE_SIZE]. The launcher
caps BLOCK_N at PAGE_SIZE, so every BLOCK_N-aligned key tile lies in one page: one scalar page-id
load per tile, then the same contiguous tile loads as the unpaged kernel. paged_kv_append writes
new rows into their pages (one program per (b, kv head, BLOCK_S new rows)).

Options (HAS_SOFTCAP, HAS_ALIBI; fastlm/reference/attention.py): the score of token t and key j is
c tanh(scale q.k / c) with softcap c, minus slope_h |L_b - Sq + t - j| with ALiBi (slopes (Hq,) or
(B, Hq), read per row's query head), the same score code as the prefill kernels (_scores). No
dropout at decode.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastlm.triton._configs import capability, dot_precision, grid_1d, small_configs
from fastlm.triton._online_softmax import _online_softmax_step
from fastlm.triton.attention_options import _option_args, _scores

LOG2E = 1.4426950408889634


@triton.jit(do_not_specialize=["B", "Hkv", "GROUP", "Sq", "S_max", "num_splits", "LEFT", "RIGHT", "num_pages", "stride_sb"])
def _decode_split_kernel(
    Q, K, V, Lens, OP, LP,  # q (B, Hq, Sq, D); k/v cache (B, Hkv, S_max, D); lens (B,) int32; partials
    BT,  # PAGED: block table (B, max_pages) int32, caches (num_pages, Hkv, PAGE_SIZE, D); else None
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs, stride_bt,
    B, Hkv, GROUP, Sq, S_max, num_splits, LEFT, RIGHT, qk_scale, num_pages,
    cap_in, cap_out, Slopes, stride_sb,  # the options: softcap (scale / c, c log2 e); ALiBi slopes fp32 and their batch stride
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_LEFT: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGED: tl.constexpr = False, PAGE_SIZE: tl.constexpr = 1,
    HAS_SOFTCAP: tl.constexpr = False, HAS_ALIBI: tl.constexpr = False,
):
    """Partial attention of rows (g, t) of kv head hk over keys [split * chunk, (split + 1) * chunk),
    chunk = ceil(L / num_splits) rounded up to BLOCK_N. OP[split, b, h, t] = sum_j p_j v_j / sum_j p_j
    (fp32), LP[split, b, h, t] = log2-domain LSE (m + log2 l), -inf when no key was seen.
    PAGED (BLOCK_N <= PAGE_SIZE, so a BLOCK_N-aligned key tile lies in one page): key j of sequence b
    is row j % PAGE_SIZE of page BT[b, j // PAGE_SIZE] (S_max = max_pages * PAGE_SIZE); the batch
    stride is the page stride; page ids are clamped to [0, num_pages) so no id reads outside the cache."""
    row_blocks = tl.cdiv(GROUP * Sq, BLOCK_M)
    split = tl.program_id(0) % num_splits
    pid_hr = (tl.program_id(0) // num_splits) % (Hkv * row_blocks)  # kv head * row blocks + row block
    b = tl.program_id(0) // num_splits // (Hkv * row_blocks)
    hk = pid_hr // row_blocks
    pid_r = pid_hr % row_blocks
    L = tl.minimum(tl.maximum(tl.load(Lens + b), 0), S_max)
    chunk = tl.cdiv(tl.cdiv(L, num_splits), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, L)

    rows = pid_r * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = rows < GROUP * Sq
    g = rows // Sq
    t = rows % Sq
    h = hk * GROUP + g
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h[:, None].to(tl.int64) * stride_qh + t[:, None].to(tl.int64) * stride_qs + offs_d[None, :],
                mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    if PAGED:
        Kb = K + hk.to(tl.int64) * stride_kh
        Vb = V + hk.to(tl.int64) * stride_vh
    else:
        Kb = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
        Vb = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh

    diag = L - Sq + t  # the key aligned with token t
    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = tl.load(Slopes + b.to(tl.int64) * stride_sb + h, mask=r_ok, other=0.0)[:, None] * 1.4426950408889634
    lo = start
    if HAS_LEFT:
        lo = tl.maximum(start, L - Sq - LEFT)
    lo = (lo // BLOCK_N) * BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    offs_nb = tl.arange(0, BLOCK_N)
    for start_n in range(lo, end, BLOCK_N):
        if PAGED:
            page = tl.load(BT + b.to(tl.int64) * stride_bt + start_n // PAGE_SIZE)
            page = tl.minimum(tl.maximum(page, 0), num_pages - 1).to(tl.int64)
            slot = tl.cast(start_n % PAGE_SIZE, tl.int64)
            Kt = Kb + page * stride_kb + slot * stride_ks
            Vt = Vb + page * stride_vb + slot * stride_vs
        else:
            n0 = tl.cast(start_n, tl.int64)
            Kt = Kb + n0 * stride_ks
            Vt = Vb + n0 * stride_vs
        offs_n = start_n + offs_nb
        n_ok = offs_n < end
        kt = tl.load(Kt + offs_nb[None, :] * stride_ks + offs_d[:, None], mask=d_ok[:, None] & n_ok[None, :], other=0.0)
        v = tl.load(Vt + offs_nb[:, None] * stride_vs + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        if HAS_SOFTCAP or HAS_ALIBI:
            s, _ = _scores(tl.dot(q, kt, input_precision=DOT_PREC), diag[:, None], offs_n[None, :], 0, qk_scale, cap_in, cap_out,
                           slope2, HAS_SOFTCAP, HAS_ALIBI)
        else:
            s = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale
        ok = n_ok[None, :] & (offs_n[None, :] <= diag[:, None] + RIGHT)
        if HAS_LEFT:
            ok = ok & (offs_n[None, :] >= diag[:, None] - LEFT)
        s = tl.where(ok, s, float("-inf"))
        acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, s, v, DOT_PREC)

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    Hq = Hkv * GROUP
    prow = ((split.to(tl.int64) * B + b) * Hq + h) * Sq + t  # row index in (num_splits, B, Hq, Sq)
    tl.store(OP + prow[:, None] * BLOCK_D + offs_d[None, :], out, mask=r_ok[:, None])
    tl.store(LP + prow, lse, mask=r_ok)


@triton.jit(do_not_specialize=["Hq", "Sq", "num_rows", "num_splits"])
def _decode_combine_kernel(
    OP, LP, O, LSE,  # partials (num_splits, rows, BLOCK_D) / (num_splits, rows) fp32; o (B, Hq, Sq, D); lse (B, Hq, Sq)
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
    Hq, Sq, num_rows, num_splits, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Per row (b, h, t): O = sum_s 2^(lse_s - m) O_s / sum_s 2^(lse_s - m), m = max_s lse_s;
    LSE = (m + log2 sum_s 2^(lse_s - m)) ln 2; a row no split saw gets O = 0, LSE = -inf."""
    row32 = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # b * Hq * Sq + h * Sq + t (< 2^31: the launcher checks)
    r_ok = row32 < num_rows
    row = row32.to(tl.int64)
    m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    for s in range(0, num_splits):
        m = tl.maximum(m, tl.load(LP + tl.cast(s, tl.int64) * num_rows + row, mask=r_ok, other=float("-inf")))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    offs_d = tl.arange(0, BLOCK_D)
    total = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for s in range(0, num_splits):
        base = tl.cast(s, tl.int64) * num_rows + row
        w = tl.math.exp2(tl.load(LP + base, mask=r_ok, other=float("-inf")) - m_safe)
        o_s = tl.load(OP + base[:, None] * BLOCK_D + offs_d[None, :], mask=r_ok[:, None], other=0.0)
        total += w
        acc += o_s * w[:, None]
    seen = total > 0.0
    out = acc / tl.where(seen, total, 1.0)[:, None]
    lse = tl.where(seen, (m + tl.math.log2(tl.where(seen, total, 1.0))) * 0.6931471805599453, float("-inf"))
    b = (row32 // (Hq * Sq)).to(tl.int64)
    h = ((row32 // Sq) % Hq).to(tl.int64)
    t = (row32 % Sq).to(tl.int64)
    o_ptrs = O + (b * stride_ob + h * stride_oh + t * stride_os)[:, None] + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=r_ok[:, None] & (offs_d < HEAD_DIM)[None, :])
    tl.store(LSE + b * stride_lb + h * stride_lh + t, lse, mask=r_ok)


def config(head_dim: int, rows: int, dtype: torch.dtype, cc: int = 90) -> dict:
    """The split kernel's config for head_dim, GROUP * Sq rows per kv head (BLOCK_M covers them up
    to 64) and the GPU's compute capability cc, and the combine kernel's BLOCK_R; small tiles under
    the interpreter. Every config compiles without spills on sm_90a and sm_80 (the compile tier):
    BLOCK_D 256 and fp32 above BLOCK_D 64 take 16-row blocks (more row blocks, each reading the
    cache), a 64-row block on sm_80 halves BLOCK_N, fp32 at BLOCK_D 256 (IEEE FMA dots) uses 16 x 16.
    Every GPU config has num_stages >= 2: the key loop's K/V tiles stream through a cp.async ring
    (16-byte LDGSTS per thread and row segment, the compile tier's gate), one tile in flight while
    the previous one is multiplied."""
    bd = max(16, triton.next_power_of_2(head_dim))
    bm = min(max(16, triton.next_power_of_2(rows)), 64)
    if small_configs():
        return dict(BLOCK_D=bd, BLOCK_M=bm, BLOCK_N=16, num_warps=4, num_stages=1, BLOCK_R=64)
    fp32 = dtype == torch.float32
    if bd > 128 or (fp32 and bd > 64):
        bm = 16
    bn = 32 if fp32 or bd > 128 else 64
    if cc < 90 and bm == 64:
        bn //= 2
    stages = 3 if bm <= 16 and bd <= 128 and not fp32 else 2
    if fp32 and bd > 128:
        bn = 16
    return dict(BLOCK_D=bd, BLOCK_M=bm, BLOCK_N=bn, num_warps=4, num_stages=stages, BLOCK_R=max(1, 2048 // bd))


def num_splits_for(batch: int, kv_heads: int, row_blocks: int, s_max: int, block_n: int, device: torch.device) -> int:
    """Splits so that splits * batch * kv_heads * row_blocks programs cover the SMs about twice,
    never more splits than key blocks (nor than 128)."""
    max_splits = max(1, triton.cdiv(s_max, block_n))
    if device.type != "cuda":
        return min(max_splits, 3)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = triton.cdiv(2 * sms, max(1, batch * kv_heads * row_blocks))
    return max(1, min(want, max_splits, 128))


def decode_attention_fwd(q, k_cache, v_cache, cache_seqlens, scale, window_left, window_right, out, lse, num_splits=None,
                         block_table=None, *, softcap=0.0, alibi_slopes=None) -> None:
    """Decode into caller-given out (B, Hq, Sq, D) and lse (B, Hq, Sq) fp32 (unit stride in S).
    q (B, Hq, Sq, D); caches (B, Hkv, S_max, D), unit stride in D; cache_seqlens (B,) int32: the
    keys of sequence b are cache[b, :, :L_b], its Sq new tokens being the last Sq of them.
    block_table (B, max_pages) int32: paged caches (num_pages, Hkv, page_size, D), S_max =
    max_pages * page_size, key j of sequence b in page block_table[b, j // page_size], row
    j % page_size; key tiles shrink to at most page_size keys so that each lies in one page.
    window sides -1 = unbounded (the right side is capped at 0: decode is causal). softcap and
    alibi_slopes (fp32 (Hq,) or (B, Hq), unit stride in the head dim) as in attention_fwd."""
    for name, t in dict(q=q, k_cache=k_cache, v_cache=v_cache, out=out).items():
        if t.numel() and t.stride(-1) != 1:
            raise ValueError(f"fastlm.triton.decode_attention: {name} must have unit stride in the head dim (got strides {t.stride()})")
    B, Hq, Sq, D = q.shape
    Hkv = k_cache.shape[1]
    paged = block_table is not None
    page_size = k_cache.shape[2] if paged else 1
    S_max = block_table.shape[1] * page_size if paged else k_cache.shape[2]
    if B == 0 or Hq == 0 or Sq == 0:
        return
    group = Hq // Hkv
    cfg = config(D, group * Sq, q.dtype, capability(q))
    bd, bm, bn = cfg["BLOCK_D"], cfg["BLOCK_M"], cfg["BLOCK_N"]
    if paged:
        bn = min(bn, page_size)
    row_blocks = triton.cdiv(group * Sq, bm)
    splits = num_splits or num_splits_for(B, Hkv, row_blocks, S_max, bn, q.device)
    right = 0 if window_right < 0 else min(window_right, 0)
    rows = B * Hq * Sq
    if rows >= 2**31:
        raise ValueError(f"fastlm.triton.decode_attention: B * Hq * Sq = {rows} query rows; at most 2^31 - 1 are supported")
    o_part = torch.empty((splits, rows, bd), device=q.device, dtype=torch.float32)
    l_part = torch.empty((splits, rows), device=q.device, dtype=torch.float32)
    lens = cache_seqlens.to(torch.int32).contiguous()
    (cap_in, cap_out, slopes, stride_sb, *_), opt_meta = _option_args(scale, softcap, alibi_slopes)
    _decode_split_kernel[grid_1d(splits, Hkv * row_blocks, B)](
        q, k_cache, v_cache, lens, o_part, l_part, block_table,
        q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_table.stride(0) if paged else 0,
        B, Hkv, group, Sq, S_max, splits, max(window_left, 0), right, scale * LOG2E, k_cache.shape[0] if paged else 1,
        cap_in, cap_out, slopes, stride_sb, **opt_meta,
        HEAD_DIM=D, BLOCK_D=bd, HAS_LEFT=window_left >= 0, DOT_PREC=dot_precision(q.dtype, bd),
        BLOCK_M=bm, BLOCK_N=bn, PAGED=paged, PAGE_SIZE=page_size, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    block_r = cfg["BLOCK_R"]
    _decode_combine_kernel[grid_1d(triton.cdiv(rows, block_r))](
        o_part, l_part, out, lse, out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
        Hq, Sq, rows, splits, D, BLOCK_D=bd, BLOCK_R=block_r, num_warps=4,
    )


@triton.jit(do_not_specialize=["Hkv", "S_new", "max_pages", "num_pages"])
def _paged_append_kernel(
    KN, VN, KC, VC, BT, Lens,  # new k/v (B, Hkv, S_new, D); paged caches (num_pages, Hkv, PAGE_SIZE, D); table; lens
    stride_knb, stride_knh, stride_kns, stride_vnb, stride_vnh, stride_vns,
    stride_kcp, stride_kch, stride_kcs, stride_vcp, stride_vch, stride_vcs, stride_bt,
    Hkv, S_new, max_pages, num_pages,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, PAGE_SIZE: tl.constexpr,
):
    """Rows s of (b, h): position p = Lens[b] + s goes to page BT[b, p // PAGE_SIZE], row p % PAGE_SIZE.
    A position outside [0, max_pages * PAGE_SIZE) or a page id outside [0, num_pages) is not written."""
    s_blocks = tl.cdiv(S_new, BLOCK_S)
    pid_s = tl.program_id(0) % s_blocks
    bh = tl.program_id(0) // s_blocks
    b = (bh // Hkv).to(tl.int64)
    h = (bh % Hkv).to(tl.int64)
    s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    pos = tl.load(Lens + b) + s
    ok = (s < S_new) & (pos >= 0) & (pos < max_pages * PAGE_SIZE)
    page = tl.load(BT + b * stride_bt + pos // PAGE_SIZE, mask=ok, other=0)
    ok = ok & (page >= 0) & (page < num_pages)
    page = page.to(tl.int64)
    slot = (pos % PAGE_SIZE).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    m = ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    s64 = s.to(tl.int64)[:, None]
    k = tl.load(KN + b * stride_knb + h * stride_knh + s64 * stride_kns + offs_d[None, :], mask=m)
    v = tl.load(VN + b * stride_vnb + h * stride_vnh + s64 * stride_vns + offs_d[None, :], mask=m)
    tl.store(KC + (page * stride_kcp + h * stride_kch + slot * stride_kcs)[:, None] + offs_d[None, :], k, mask=m)
    tl.store(VC + (page * stride_vcp + h * stride_vch + slot * stride_vcs)[:, None] + offs_d[None, :], v, mask=m)


def append_config(head_dim: int) -> dict:
    """BLOCK_S rows of BLOCK_D per program (about 4096 elements of k and of v), 4 warps."""
    bd = max(16, triton.next_power_of_2(head_dim))
    return dict(BLOCK_D=bd, BLOCK_S=max(1, 4096 // bd) if not small_configs() else 4, num_warps=4)


def paged_kv_append(k_cache, v_cache, block_table, cache_seqlens, k_new, v_new) -> None:
    """Write k_new, v_new (B, Hkv, S_new, D) into the paged caches (num_pages, Hkv, page_size, D)
    at positions cache_seqlens[b] + s, s < S_new, of sequence b (page block_table[b, p // page_size],
    row p % page_size), in place; cache_seqlens is not changed. No host sync, no value-dependent
    allocation (CUDA-graph capturable). Unit stride in D for all four tensors."""
    for name, t in dict(k_cache=k_cache, v_cache=v_cache, k_new=k_new, v_new=v_new).items():
        if t.numel() and t.stride(-1) != 1:
            raise ValueError(f"fastlm.triton.paged_kv_append: {name} must have unit stride in the head dim (got strides {t.stride()})")
    B, Hkv, S_new, D = k_new.shape
    if B == 0 or Hkv == 0 or S_new == 0:
        return
    cfg = append_config(D)
    lens = cache_seqlens.to(torch.int32).contiguous()
    _paged_append_kernel[grid_1d(B, Hkv, triton.cdiv(S_new, cfg["BLOCK_S"]))](
        k_new, v_new, k_cache, v_cache, block_table, lens,
        *k_new.stride()[:3], *v_new.stride()[:3], *k_cache.stride()[:3], *v_cache.stride()[:3], block_table.stride(0),
        Hkv, S_new, block_table.shape[1], k_cache.shape[0],
        HEAD_DIM=D, BLOCK_D=cfg["BLOCK_D"], BLOCK_S=cfg["BLOCK_S"], PAGE_SIZE=k_cache.shape[2], num_warps=cfg["num_warps"],
    )
