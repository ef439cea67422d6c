"""Fused attention in Triton: FlashAttention-2 forward and backward, and split-KV decode.

Forward: one program owns BLOCK_M query rows of one (batch, query head) and streams the visible
key/value blocks once, keeping the running row max m, the running sum l and the unnormalised
output in fp32 registers (online softmax, base 2); the (Sq, Sk) score matrix never reaches memory.
It writes O and the log-sum-exp LSE (fp32), which is all the backward needs to recompute P.

Backward (recompute from LSE, no atomics, so it is deterministic by construction):
    delta_i = sum_d dO_id O_id                                   (preprocess kernel)
    P_ij = exp(scale q_i.k_j - LSE_i),  dS_ij = P_ij (dO_i.v_j - delta_i)   (delta_i - dLSE_i when
                                                                  the LSE output has a gradient)
    dV_j = sum_i P_ij dO_i,  dK_j = scale sum_i dS_ij q_i        (one program per key block; for
                                                                  GQA it loops over the group's
                                                                  query heads, so the sum over
                                                                  heads is a plain loop)
    dQ_i = scale sum_j dS_ij k_j                                 (one program per query block)
The key-major and query-major passes each own their output rows, so every element is written by
exactly one program in a fixed order: bit-identical results from run to run. The price is that
QK^T and dO V^T are computed twice (once per pass), the usual FA2-without-atomics trade.

Masking (bottom-right aligned, off = Sk - Sq): key j is visible to query i iff
    (not HAS_LEFT or j >= i + off - LEFT) and (not HAS_RIGHT or j <= i + off + RIGHT) and j < Sk.
Causal is HAS_RIGHT with RIGHT <= 0. Each program splits its block range into blocks that every
row sees completely (no mask arithmetic) and boundary blocks (masked), so the common interior
runs the lean loop. A row that sees no key gets O = 0 and LSE = -inf.

Head dims: any multiple of 8 up to 256; BLOCK_D is the next power of two and the tail is masked
(80 -> 128). HEAD_DIM is a constexpr, so the compiler sees the mask's 16-byte groups and keeps
vector loads and cp.async for every head dim (one compile per head dim). fp32 inputs run 3xTF32
dots on tensor cores (fp32-level accuracy) up to BLOCK_D 128 and IEEE FMA dots above (see
dot_precision): both on small tiles, several times slower than 16-bit inputs.

On sm_90 the forward loads Q, K, V and stores O through host tensor descriptors (TMA:
_attn_fwd_tma_kernel, rank-4 descriptors over (B, H, S, D), so any 16-byte aligned layout works and
boxes past a sequence's end or the head dim read as zeros); the pointer kernel serves sm_80, older
Triton, and layouts no descriptor expresses (uses_tma, FASTLM_ATTENTION_TMA).

Options (softcap, ALiBi, dropout: fastlm/triton/attention_options.py): constexpr HAS_SOFTCAP /
HAS_ALIBI / HAS_DROPOUT in the pointer forward, dK/dV and dQ (and the varlen path, which is the
same kernels); a call that sets one runs the pointer forward, never the TMA one. Dropout's mask is
recomputed in the backward from the seed (nothing stored); the forward's l sums the whole P, its
accumulator the kept entries, and O is scaled by 1 / (1 - p).

Packed variable-length batches (attention_varlen_fwd / _bwd): the same three pointer kernels with
IS_VARLEN, on (total_rows, H, D) tensors seen as (1, H, total_rows, D). Program b of the batch axis
is sequence b: it reads its first rows and lengths from cu_seqlens_q/k (int32 prefix sums), offsets
its pointers by them, and is then attention of that sequence alone (its own bottom-right diagonal,
windows, GQA); the LSE and delta rows are (Hq, total_q). The grid covers ceil(max_seqlen / BLOCK)
blocks of every sequence and blocks past a sequence's end exit after reading its offsets: simpler
than a precomputed (sequence, block) map, which needs the lengths on the host (a sync) or an extra
kernel, and it keeps the launch shape a function of host ints alone (CUDA graphs, torch.compile);
the cost is those idle programs when lengths vary widely. No TMA path: a descriptor box would run
past a sequence into its neighbour's rows, and the O store would overwrite them.

Grids are one-dimensional (blocks x heads x batch on grid x, which allows 2^31 - 1 programs;
y and z allow only 65535); each kernel splits program_id(0) again, query/key blocks fastest.

Configs: the tables below, per kernel, BLOCK_D row, dtype class and target (sm_80 rows where
sm_90a's spill); the compile tier (tests/test_static_triton.py, `fastlm audit`) proves every
default compiles without spills on both targets. On the GPU the autotuner picks among a row's
candidates, keyed on the constexprs and a sequence-length bucket (seq_bucket); FASTLM_AUTOTUNE=0
uses each row's first candidate. Under TRITON_INTERPRET=1 one small fixed config, or the GPU
defaults inside fastlm.triton._configs.gpu_configs(). Sizes and head counts are not specialised on
(do_not_specialize), so new sequence lengths never trigger a recompile. Decode (a fixed heuristic
config, so CUDA-graph capture never autotunes) lives in fastlm/triton/decode_attention.py and is
re-exported here.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from fastlm.backend import interpreter_on
from fastlm.triton._configs import capability, dot_precision, grid_1d, is_fp32_prec, small_configs
from fastlm.triton._online_softmax import _online_softmax_step
from fastlm.triton.attention_options import _OPTION_PARAMS, _dropout_keep, _option_args, _option_state, _scores

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
MAX_HEAD_DIM = 256



def block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def resolve_window(causal: bool, window_left: int, window_right: int) -> tuple[bool, int, bool, int]:
    """(HAS_LEFT, LEFT, HAS_RIGHT, RIGHT) for the kernels; -1 means that side is unbounded and
    causal caps the right side at 0 (the diagonal)."""
    has_left = window_left >= 0
    left = max(window_left, 0)
    if causal:
        return has_left, left, True, 0 if window_right < 0 else min(window_right, 0)
    return has_left, left, window_right >= 0, max(window_right, 0)


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------


@triton.jit
def _key_visible(rows, keys, Sk, diag, LEFT, RIGHT, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Key j visible to query i (broadcast index tensors): j < Sk, i + diag - LEFT <= j <= i + diag + RIGHT."""
    ok = keys < Sk
    if HAS_RIGHT:
        ok = ok & (keys <= rows + (diag + RIGHT))
    if HAS_LEFT:
        ok = ok & (keys >= rows + (diag - LEFT))
    return ok


@triton.jit
def _varlen_bounds(CU_Q, CU_K, b):
    """Sequence b of a packed batch: its first query row, first key row, and lengths Sq, Sk."""
    q_start = tl.load(CU_Q + b)
    k_start = tl.load(CU_K + b)
    return q_start, k_start, tl.load(CU_Q + b + 1) - q_start, tl.load(CU_K + b + 1) - k_start


@triton.jit
def _fwd_blocks(
    acc, m_i, l_i, q, K, V, stride_kn, stride_vn,  # K, V: base pointers of this (batch, kv head)
    offs_m, offs_d, lo, hi, Sk, diag, LEFT, RIGHT, qk_scale,
    MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, EVEN_D: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
    cap_in, cap_out, slope2, ig0, jg0, h, seed_lo, seed_hi, off_lo, thresh,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr,
):
    """Online softmax over key blocks [lo, hi): s = qk_scale q.k (log2 units; the options by _scores),
    m' = max(m, max_j s), p = 2^(s - m'), l' = l 2^(m - m') + sum_j p, acc' = acc 2^(m - m') + p V
    (HAS_DROPOUT: acc' takes p keep, l' the whole p; the caller scales by 1 / (1 - p_drop))."""
    offs_nb = tl.arange(0, BLOCK_N)
    d_ok = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        n0 = tl.cast(start_n, tl.int64)
        offs_n = start_n + offs_nb
        kt_ptrs = K + n0 * stride_kn + offs_nb[None, :] * stride_kn + offs_d[:, None]
        v_ptrs = V + n0 * stride_vn + offs_nb[:, None] * stride_vn + offs_d[None, :]
        if MASKED:
            n_ok = offs_n < Sk
            kt = tl.load(kt_ptrs, mask=d_ok[:, None] & n_ok[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        elif EVEN_D:
            kt = tl.load(kt_ptrs)
            v = tl.load(v_ptrs)
        else:
            kt = tl.load(kt_ptrs, mask=d_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        if HAS_SOFTCAP or HAS_ALIBI:
            s, _ = _scores(tl.dot(q, kt, input_precision=DOT_PREC), offs_m[:, None], offs_n[None, :], diag, qk_scale,
                           cap_in, cap_out, slope2, HAS_SOFTCAP, HAS_ALIBI)
        else:
            s = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale
        if MASKED:
            ok = _key_visible(offs_m[:, None], offs_n[None, :], Sk, diag, LEFT, RIGHT, HAS_LEFT, HAS_RIGHT)
            s = tl.where(ok, s, float("-inf"))
        if HAS_DROPOUT:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            keep = _dropout_keep(ig0, offs_m[:, None], jg0, offs_n[None, :], h, seed_lo, seed_hi, off_lo, thresh)
            acc = tl.dot(tl.where(keep, p, 0.0).to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
            m_i = m_new
        else:
            acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, s, v, DOT_PREC)
    return acc, m_i, l_i


@triton.jit
def _block_ranges(lo, hi, full_lo, full_hi, BLOCK: tl.constexpr):
    """Split the BLOCK-aligned blocks covering [lo, hi) into masked [lo_blk, a_hi), unmasked
    [b_lo, b_hi) (blocks inside [full_lo, full_hi), seen completely by every row) and masked
    [c_lo, hi). An empty unmasked range has b_hi <= b_lo, and then [lo_blk, hi) is all masked."""
    lo_blk = (lo // BLOCK) * BLOCK
    b_lo = tl.cdiv(tl.maximum(full_lo, lo_blk), BLOCK) * BLOCK
    b_hi = (tl.maximum(full_hi, 0) // BLOCK) * BLOCK
    return lo_blk, tl.minimum(b_lo, hi), b_lo, b_hi, tl.maximum(b_hi, b_lo)


@triton.jit
def _query_block_key_ranges(m0, Sq, Sk, LEFT, RIGHT, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The keys query rows [m0, m0 + BLOCK_M) may see: row i sees keys j with
    i + diag - LEFT <= j <= i + diag + RIGHT (diag = Sk - Sq, bottom-right alignment). Returns
    _block_ranges' split of [lo, hi) and hi itself."""
    diag = Sk - Sq
    m_last = tl.minimum(m0 + BLOCK_M, Sq) - 1
    lo = 0
    hi = Sk
    full_lo = 0
    full_hi = Sk
    if HAS_LEFT:
        lo = tl.maximum(m0 + diag - LEFT, 0)
        full_lo = tl.maximum(m_last + diag - LEFT, 0)
    if HAS_RIGHT:
        hi = tl.minimum(m_last + diag + RIGHT + 1, Sk)
        full_hi = tl.minimum(m0 + diag + RIGHT + 1, Sk)
    lo_blk, a_hi, b_lo, b_hi, c_lo = _block_ranges(lo, hi, full_lo, full_hi, BLOCK_N)
    return lo_blk, a_hi, b_lo, b_hi, c_lo, hi


@triton.jit(do_not_specialize=["Hq", "GROUP", "Sq", "Sk", "LEFT", "RIGHT", "SEQ_BUCKET"] + _OPTION_PARAMS)
def _attn_fwd_kernel(
    Q, K, V, O, LSE,  # q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D), o like q, lse (B, Hq, Sq) fp32; unit D stride
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
    Hq, GROUP, Sq, Sk, LEFT, RIGHT,  # GROUP = Hq // Hkv; LEFT/RIGHT: window bounds (see module doc)
    qk_scale,  # scale * log2(e)
    SEQ_BUCKET,  # seq_bucket(Sq, Sk): unused by the code, a key of the autotuner
    CU_Q, CU_K,  # IS_VARLEN: (B + 1,) int32 first rows of each sequence (see attention_varlen_fwd); else unused
    cap_in, cap_out, Slopes, stride_sb, Seed, drop_thresh, drop_scale,  # the options (see _option_args)
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_VARLEN: tl.constexpr = False,
    HAS_SOFTCAP: tl.constexpr = False, HAS_ALIBI: tl.constexpr = False, HAS_DROPOUT: tl.constexpr = False,
):
    """O_i = sum_j softmax_j(scale q_i.k_j) v_j over visible j;  LSE_i = log sum_j exp(scale q_i.k_j).
    IS_VARLEN: the batch is packed (B = 1 in the strides, rows of sequence b from CU_Q[b] / CU_K[b]),
    b indexes sequences, Sq / Sk are the longest lengths, and blocks past a sequence's end exit.
    The options (fastlm/reference/attention.py): HAS_SOFTCAP, HAS_ALIBI change the score (_scores),
    HAS_DROPOUT drops P entries by _dropout_keep (packed rows b Sq + i / b Sk + j, or the varlen rows)
    and scales O by drop_scale = 1 / (1 - p); the LSE is that of the undropped P."""
    num_m = tl.cdiv(Sq, BLOCK_M)
    pid_m = tl.program_id(0) % num_m
    bh = tl.program_id(0) // num_m
    h = bh % Hq
    b = bh // Hq
    if HAS_RIGHT:  # causal-like: later query blocks see more keys; start those first
        pid_m = num_m - 1 - pid_m
    hk = h // GROUP
    if IS_VARLEN:
        q_start, k_start, Sq, Sk = _varlen_bounds(CU_Q, CU_K, b)
        if pid_m * BLOCK_M >= Sq:
            return
        ig0 = q_start.to(tl.uint32)
        jg0 = k_start.to(tl.uint32)
        Q += q_start.to(tl.int64) * stride_qs + h.to(tl.int64) * stride_qh
        O += q_start.to(tl.int64) * stride_os + h.to(tl.int64) * stride_oh
        K += k_start.to(tl.int64) * stride_ks + hk.to(tl.int64) * stride_kh
        V += k_start.to(tl.int64) * stride_vs + hk.to(tl.int64) * stride_vh
        LSE += q_start.to(tl.int64) + h.to(tl.int64) * stride_lh
    else:
        ig0 = (b.to(tl.int64) * Sq).to(tl.uint32)
        jg0 = (b.to(tl.int64) * Sk).to(tl.uint32)
        Q += b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        O += b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
        K += b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
        V += b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
        LSE += b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh
    slope2, seed_lo, seed_hi, off_lo, thresh = _option_state(Slopes, stride_sb, Seed, drop_thresh, b, h, HAS_ALIBI, HAS_DROPOUT)

    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Sq
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + offs_m[:, None].to(tl.int64) * stride_qs + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)

    diag = Sk - Sq
    lo_blk, a_hi, b_lo, b_hi, c_lo, hi = _query_block_key_ranges(m0, Sq, Sk, LEFT, RIGHT, HAS_LEFT, HAS_RIGHT, BLOCK_M, BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc, m_i, l_i = _fwd_blocks(acc, m_i, l_i, q, K, V, stride_ks, stride_vs, offs_m, offs_d, lo_blk, a_hi, Sk, diag,
                                LEFT, RIGHT, qk_scale, True, HAS_LEFT, HAS_RIGHT, EVEN_D, HEAD_DIM, BLOCK_N, DOT_PREC,
                                cap_in, cap_out, slope2, ig0, jg0, h, seed_lo, seed_hi, off_lo, thresh, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT)
    acc, m_i, l_i = _fwd_blocks(acc, m_i, l_i, q, K, V, stride_ks, stride_vs, offs_m, offs_d, b_lo, b_hi, Sk, diag,
                                LEFT, RIGHT, qk_scale, False, HAS_LEFT, HAS_RIGHT, EVEN_D, HEAD_DIM, BLOCK_N, DOT_PREC,
                                cap_in, cap_out, slope2, ig0, jg0, h, seed_lo, seed_hi, off_lo, thresh, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT)
    acc, m_i, l_i = _fwd_blocks(acc, m_i, l_i, q, K, V, stride_ks, stride_vs, offs_m, offs_d, c_lo, hi, Sk, diag,
                                LEFT, RIGHT, qk_scale, True, HAS_LEFT, HAS_RIGHT, EVEN_D, HEAD_DIM, BLOCK_N, DOT_PREC,
                                cap_in, cap_out, slope2, ig0, jg0, h, seed_lo, seed_hi, off_lo, thresh, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT)

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    if HAS_DROPOUT:
        out = out * drop_scale
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(O + offs_m[:, None].to(tl.int64) * stride_os + offs_d[None, :], out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSE + offs_m, lse, mask=m_ok)


# ---------------------------------------------------------------------------------------------
# Forward through tensor descriptors (TMA, sm_90)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _fwd_blocks_tma(
    acc, m_i, l_i, q, K, V, b, hk,  # K, V: descriptors of (B, Hkv, Sk, D), blocks (1, 1, BLOCK_N, BLOCK_D)
    offs_m, lo, hi, Sk, diag, LEFT, RIGHT, qk_scale,
    MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """_fwd_blocks with K and V tiles fetched by TMA: keys past Sk and columns past the head dim
    arrive as zeros, so only the scores are masked."""
    offs_nb = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        k = K.load([b, hk, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
        v = V.load([b, hk, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        if MASKED:
            offs_n = start_n + offs_nb
            ok = _key_visible(offs_m[:, None], offs_n[None, :], Sk, diag, LEFT, RIGHT, HAS_LEFT, HAS_RIGHT)
            s = tl.where(ok, s, float("-inf"))
        acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, s, v, DOT_PREC)
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["Hq", "GROUP", "Sq", "Sk", "LEFT", "RIGHT", "SEQ_BUCKET"])
def _attn_fwd_tma_kernel(
    Q, K, V, O, LSE,  # descriptors of q, o (B, Hq, Sq, D) and k, v (B, Hkv, Sk, D); lse (B, Hq, Sq) fp32 pointer
    stride_lb, stride_lh,
    Hq, GROUP, Sq, Sk, LEFT, RIGHT, qk_scale, SEQ_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """_attn_fwd_kernel with Q, K, V loaded and O stored by TMA (block shapes set by the launcher
    or the autotuner's pre_hook: (1, 1, BLOCK_M, BLOCK_D) for Q/O, (1, 1, BLOCK_N, BLOCK_D) for K/V)."""
    num_m = tl.cdiv(Sq, BLOCK_M)
    pid_m = tl.program_id(0) % num_m
    bh = tl.program_id(0) // num_m
    h = bh % Hq
    b = bh // Hq
    if HAS_RIGHT:
        pid_m = num_m - 1 - pid_m
    hk = h // GROUP
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    q = Q.load([b, h, m0, 0]).reshape(BLOCK_M, BLOCK_D)

    diag = Sk - Sq
    lo_blk, a_hi, b_lo, b_hi, c_lo, hi = _query_block_key_ranges(m0, Sq, Sk, LEFT, RIGHT, HAS_LEFT, HAS_RIGHT, BLOCK_M, BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc, m_i, l_i = _fwd_blocks_tma(acc, m_i, l_i, q, K, V, b, hk, offs_m, lo_blk, a_hi, Sk, diag, LEFT, RIGHT, qk_scale,
                                    True, HAS_LEFT, HAS_RIGHT, BLOCK_N, BLOCK_D, DOT_PREC)
    acc, m_i, l_i = _fwd_blocks_tma(acc, m_i, l_i, q, K, V, b, hk, offs_m, b_lo, b_hi, Sk, diag, LEFT, RIGHT, qk_scale,
                                    False, HAS_LEFT, HAS_RIGHT, BLOCK_N, BLOCK_D, DOT_PREC)
    acc, m_i, l_i = _fwd_blocks_tma(acc, m_i, l_i, q, K, V, b, hk, offs_m, c_lo, hi, Sk, diag, LEFT, RIGHT, qk_scale,
                                    True, HAS_LEFT, HAS_RIGHT, BLOCK_N, BLOCK_D, DOT_PREC)

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    O.store([b, h, m0, 0], out.to(q.dtype).reshape(1, 1, BLOCK_M, BLOCK_D))
    LSE += b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh
    tl.store(LSE + offs_m, lse, mask=offs_m < Sq)


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["Hq", "Sq"])
def _bwd_preprocess_kernel(
    O, DO, Delta,  # o, do (B, Hq, Sq, D) unit D stride; delta (B, Hq, Sq) fp32 contiguous
    stride_ob, stride_oh, stride_os, stride_db, stride_dh, stride_ds,
    Hq, Sq,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta_i = sum_d O_id dO_id (fp32)."""
    num_m = tl.cdiv(Sq, BLOCK_M)
    pid_m = tl.program_id(0) % num_m
    h = (tl.program_id(0) // num_m) % Hq
    b = tl.program_id(0) // num_m // Hq
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < Sq)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + offs_m[:, None].to(tl.int64) * stride_os + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b.to(tl.int64) * stride_db + h.to(tl.int64) * stride_dh + offs_m[:, None].to(tl.int64) * stride_ds + offs_d[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(Delta + (b.to(tl.int64) * Hq + h) * Sq + offs_m, tl.sum(o * do, 1), mask=offs_m < Sq)


@triton.jit
def _bwd_dkdv_blocks(
    dk, dv, k, v, Q, DO, LSE2, Delta, stride_qs, stride_ds,  # Q/DO/LSE2/Delta: bases of one query head
    offs_n, offs_d, lo, hi, Sq, Sk, diag, LEFT, RIGHT, qk_scale,
    MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, EVEN_D: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PREC: tl.constexpr,
    cap_in, cap_out, slope2, ig0, jg0, h, seed_lo, seed_hi, off_lo, thresh, drop_scale,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr,
):
    """Over query blocks [lo, hi): P^T = 2^(qk_scale k.q - LSE2), dV += P^T dO,
    dS^T = P^T (v.dO - delta), dK += dS^T q (scale applied by the caller). The options: scores by
    _scores; dropout: dV += (P keep / (1 - p))^T dO, dP = v.dO keep / (1 - p); softcap:
    dS_raw = dS (1 - t^2)."""
    offs_mb = tl.arange(0, BLOCK_M)
    d_ok = offs_d < HEAD_DIM
    for start_m in range(lo, hi, BLOCK_M):
        m0 = tl.cast(start_m, tl.int64)
        offs_m = start_m + offs_mb
        q_ptrs = Q + m0 * stride_qs + offs_mb[:, None] * stride_qs + offs_d[None, :]
        do_ptrs = DO + m0 * stride_ds + offs_mb[:, None] * stride_ds + offs_d[None, :]
        if MASKED:
            m_ok = offs_m < Sq
            q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
            do = tl.load(do_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
            lse2 = tl.load(LSE2 + offs_m, mask=m_ok, other=0.0)
            delta = tl.load(Delta + offs_m, mask=m_ok, other=0.0)
        else:
            if EVEN_D:
                q = tl.load(q_ptrs)
                do = tl.load(do_ptrs)
            else:
                q = tl.load(q_ptrs, mask=d_ok[None, :], other=0.0)
                do = tl.load(do_ptrs, mask=d_ok[None, :], other=0.0)
            lse2 = tl.load(LSE2 + offs_m)
            delta = tl.load(Delta + offs_m)
        lse2 = tl.where(lse2 == float("-inf"), float("inf"), lse2)
        if HAS_SOFTCAP or HAS_ALIBI:
            st, tt = _scores(tl.dot(k, tl.trans(q), input_precision=DOT_PREC), offs_m[None, :], offs_n[:, None], diag, qk_scale,
                             cap_in, cap_out, slope2, HAS_SOFTCAP, HAS_ALIBI)
        else:
            st = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale
        pt = tl.math.exp2(st - lse2[None, :])
        if MASKED:
            ok = (offs_m[None, :] < Sq) & _key_visible(offs_m[None, :], offs_n[:, None], Sk, diag, LEFT, RIGHT, HAS_LEFT, HAS_RIGHT)
            pt = tl.where(ok, pt, 0.0)
        if HAS_DROPOUT:
            keep = _dropout_keep(ig0, offs_m[None, :], jg0, offs_n[:, None], h, seed_lo, seed_hi, off_lo, thresh)
            dv = tl.dot(tl.where(keep, pt * drop_scale, 0.0).to(do.dtype), do, dv, input_precision=DOT_PREC)
            dpt = tl.where(keep, tl.dot(v, tl.trans(do), input_precision=DOT_PREC) * drop_scale, 0.0)
        else:
            dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PREC)
            dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        dst = pt * (dpt - delta[None, :])
        if HAS_SOFTCAP:
            dst = dst * (1.0 - tt * tt)
        dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=DOT_PREC)
    return dk, dv


@triton.jit(do_not_specialize=["Hkv", "GROUP", "Sq", "Sk", "LEFT", "RIGHT", "SEQ_BUCKET", "TOTAL_Q"] + _OPTION_PARAMS)
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE2, Delta, DK, DV,  # LSE2 = LSE * log2(e) and Delta: (B, Hq, Sq) fp32 contiguous
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    stride_db, stride_dh, stride_ds, stride_dkb, stride_dkh, stride_dks, stride_dvb, stride_dvh, stride_dvs,
    Hkv, GROUP, Sq, Sk, LEFT, RIGHT, qk_scale, sm_scale, SEQ_BUCKET,
    CU_Q, CU_K, TOTAL_Q,  # IS_VARLEN: as in _attn_fwd_kernel; LSE2 and Delta are then (Hq, TOTAL_Q)
    cap_in, cap_out, Slopes, stride_sb, Seed, drop_thresh, drop_scale,  # the options, as in _attn_fwd_kernel
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_VARLEN: tl.constexpr = False,
    HAS_SOFTCAP: tl.constexpr = False, HAS_ALIBI: tl.constexpr = False, HAS_DROPOUT: tl.constexpr = False,
):
    """dK_j = scale sum_{h in group} sum_i dS_ij q_i;  dV_j = sum_{h in group} sum_i P_ij dO_i
    (P, dS with the options of _attn_fwd_kernel; the dropout mask recomputed from Seed)."""
    num_n = tl.cdiv(Sk, BLOCK_N)
    pid_n = tl.program_id(0) % num_n
    hk = (tl.program_id(0) // num_n) % Hkv
    b = tl.program_id(0) // num_n // Hkv
    n0 = pid_n * BLOCK_N
    if IS_VARLEN:
        q_start, k_start, Sq, Sk = _varlen_bounds(CU_Q, CU_K, b)
        if n0 >= Sk:
            return
        ig0 = q_start.to(tl.uint32)
        jg0 = k_start.to(tl.uint32)
        Q += q_start.to(tl.int64) * stride_qs
        DO += q_start.to(tl.int64) * stride_ds
        K += k_start.to(tl.int64) * stride_ks
        V += k_start.to(tl.int64) * stride_vs
    else:
        ig0 = (b.to(tl.int64) * Sq).to(tl.uint32)
        jg0 = (b.to(tl.int64) * Sk).to(tl.uint32)
        Q += b.to(tl.int64) * stride_qb
        DO += b.to(tl.int64) * stride_db
        K += b.to(tl.int64) * stride_kb
        V += b.to(tl.int64) * stride_vb
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n < Sk)[:, None] & (offs_d < HEAD_DIM)[None, :]
    k = tl.load(K + hk.to(tl.int64) * stride_kh + offs_n[:, None].to(tl.int64) * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + hk.to(tl.int64) * stride_vh + offs_n[:, None].to(tl.int64) * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)

    # query i sees key j iff j - diag - RIGHT <= i <= j - diag + LEFT
    diag = Sk - Sq
    n_last = tl.minimum(n0 + BLOCK_N, Sk) - 1
    lo = 0
    hi = Sq
    full_lo = 0
    full_hi = Sq
    if HAS_RIGHT:
        lo = tl.maximum(n0 - diag - RIGHT, 0)
        full_lo = tl.maximum(n_last - diag - RIGHT, 0)
    if HAS_LEFT:
        hi = tl.minimum(n_last - diag + LEFT + 1, Sq)
        full_hi = tl.minimum(n0 - diag + LEFT + 1, Sq)
    lo_blk, a_hi, b_lo, b_hi, c_lo = _block_ranges(lo, hi, full_lo, full_hi, BLOCK_M)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(0, GROUP):
        h = (hk * GROUP + g).to(tl.int64)
        slope2, seed_lo, seed_hi, off_lo, thresh = _option_state(Slopes, stride_sb, Seed, drop_thresh, b, h, HAS_ALIBI, HAS_DROPOUT)
        Qh = Q + h * stride_qh
        DOh = DO + h * stride_dh
        if IS_VARLEN:
            row = h * TOTAL_Q + q_start
        else:
            row = (b.to(tl.int64) * (Hkv * GROUP) + h) * Sq
        dk, dv = _bwd_dkdv_blocks(dk, dv, k, v, Qh, DOh, LSE2 + row, Delta + row, stride_qs, stride_ds, offs_n, offs_d,
                                  lo_blk, a_hi, Sq, Sk, diag, LEFT, RIGHT, qk_scale,
                                  True, HAS_LEFT, HAS_RIGHT, EVEN_D, HEAD_DIM, BLOCK_M, DOT_PREC,
                                  cap_in, cap_out, slope2, ig0, jg0, h, seed_lo, seed_hi, off_lo, thresh, drop_scale,
                                  HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT)
        dk, dv = _bwd_dkdv_blocks(dk, dv, k, v, Qh, DOh, LSE2 + row, Delta + row, stride_qs, stride_ds, offs_n, offs_d,
                                  b_lo, b_hi, Sq, Sk, diag, LEFT, RIGHT, qk_scale,
                                  False, HAS_LEFT, HAS_RIGHT, EVEN_D, HEAD_DIM, BLOCK_M, DOT_PREC,
                                  cap_in, cap_out, slope2, ig0, jg0, h, seed_lo, seed_hi, off_lo, thresh, drop_scale,
                                  HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT)
        dk, dv = _bwd_dkdv_blocks(dk, dv, k, v, Qh, DOh, LSE2 + row, Delta + row, stride_qs, stride_ds, offs_n, offs_d,
                                  c_lo, hi, Sq, Sk, diag, LEFT, RIGHT, qk_scale,
                                  True, HAS_LEFT, HAS_RIGHT, EVEN_D, HEAD_DIM, BLOCK_M, DOT_PREC,
                                  cap_in, cap_out, slope2, ig0, jg0, h, seed_lo, seed_hi, off_lo, thresh, drop_scale,
                                  HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT)
    dk = dk * sm_scale
    if IS_VARLEN:  # offset here, not above: two 64-bit pointers live across the loop spill at D=128
        DK += k_start.to(tl.int64) * stride_dks
        DV += k_start.to(tl.int64) * stride_dvs
    else:
        DK += b.to(tl.int64) * stride_dkb
        DV += b.to(tl.int64) * stride_dvb
    tl.store(DK + hk.to(tl.int64) * stride_dkh + offs_n[:, None].to(tl.int64) * stride_dks + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + hk.to(tl.int64) * stride_dvh + offs_n[:, None].to(tl.int64) * stride_dvs + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_blocks(
    dq, q, do, lse2, delta, K, V, stride_kn, stride_vn,
    offs_m, offs_d, lo, hi, Sk, diag, LEFT, RIGHT, qk_scale,
    MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, EVEN_D: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
    cap_in, cap_out, slope2, ig0, jg0, h, seed_lo, seed_hi, off_lo, thresh, drop_scale,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr,
):
    """Over key blocks [lo, hi): P = 2^(qk_scale q.k - LSE2), dS = P (dO.v - delta), dQ += dS k
    (the options as in _bwd_dkdv_blocks)."""
    offs_nb = tl.arange(0, BLOCK_N)
    d_ok = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        n0 = tl.cast(start_n, tl.int64)
        offs_n = start_n + offs_nb
        k_ptrs = K + n0 * stride_kn + offs_nb[:, None] * stride_kn + offs_d[None, :]
        v_ptrs = V + n0 * stride_vn + offs_nb[:, None] * stride_vn + offs_d[None, :]
        if MASKED:
            n_ok = offs_n < Sk
            k = tl.load(k_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        elif EVEN_D:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            k = tl.load(k_ptrs, mask=d_ok[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        if HAS_SOFTCAP or HAS_ALIBI:
            s, t = _scores(tl.dot(q, tl.trans(k), input_precision=DOT_PREC), offs_m[:, None], offs_n[None, :], diag, qk_scale,
                           cap_in, cap_out, slope2, HAS_SOFTCAP, HAS_ALIBI)
        else:
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        p = tl.math.exp2(s - lse2[:, None])
        if MASKED:
            ok = _key_visible(offs_m[:, None], offs_n[None, :], Sk, diag, LEFT, RIGHT, HAS_LEFT, HAS_RIGHT)
            p = tl.where(ok, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        if HAS_DROPOUT:
            keep = _dropout_keep(ig0, offs_m[:, None], jg0, offs_n[None, :], h, seed_lo, seed_hi, off_lo, thresh)
            dp = tl.where(keep, dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)
    return dq


@triton.jit(do_not_specialize=["Hq", "GROUP", "Sq", "Sk", "LEFT", "RIGHT", "SEQ_BUCKET", "TOTAL_Q"] + _OPTION_PARAMS)
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE2, Delta, DQ,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    stride_db, stride_dh, stride_ds, stride_dqb, stride_dqh, stride_dqs,
    Hq, GROUP, Sq, Sk, LEFT, RIGHT, qk_scale, sm_scale, SEQ_BUCKET,
    CU_Q, CU_K, TOTAL_Q,  # IS_VARLEN: as in _attn_bwd_dkdv_kernel
    cap_in, cap_out, Slopes, stride_sb, Seed, drop_thresh, drop_scale,  # the options, as in _attn_fwd_kernel
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_VARLEN: tl.constexpr = False,
    HAS_SOFTCAP: tl.constexpr = False, HAS_ALIBI: tl.constexpr = False, HAS_DROPOUT: tl.constexpr = False,
):
    """dQ_i = scale sum_j dS_ij k_j (the options as in _attn_bwd_dkdv_kernel)."""
    num_m = tl.cdiv(Sq, BLOCK_M)
    pid_m = tl.program_id(0) % num_m
    h = (tl.program_id(0) // num_m) % Hq
    b = tl.program_id(0) // num_m // Hq
    if HAS_RIGHT:
        pid_m = num_m - 1 - pid_m
    hk = h // GROUP
    m0 = pid_m * BLOCK_M
    if IS_VARLEN:
        q_start, k_start, Sq, Sk = _varlen_bounds(CU_Q, CU_K, b)
        if m0 >= Sq:
            return
        ig0 = q_start.to(tl.uint32)
        jg0 = k_start.to(tl.uint32)
        Q += q_start.to(tl.int64) * stride_qs
        DO += q_start.to(tl.int64) * stride_ds
        DQ += q_start.to(tl.int64) * stride_dqs
        K += k_start.to(tl.int64) * stride_ks
        V += k_start.to(tl.int64) * stride_vs
        row = h.to(tl.int64) * TOTAL_Q + q_start
    else:
        ig0 = (b.to(tl.int64) * Sq).to(tl.uint32)
        jg0 = (b.to(tl.int64) * Sk).to(tl.uint32)
        Q += b.to(tl.int64) * stride_qb
        DO += b.to(tl.int64) * stride_db
        DQ += b.to(tl.int64) * stride_dqb
        K += b.to(tl.int64) * stride_kb
        V += b.to(tl.int64) * stride_vb
        row = (b.to(tl.int64) * Hq + h) * Sq
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Sq
    qmask = m_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(Q + h.to(tl.int64) * stride_qh + offs_m[:, None].to(tl.int64) * stride_qs + offs_d[None, :], mask=qmask, other=0.0)
    do = tl.load(DO + h.to(tl.int64) * stride_dh + offs_m[:, None].to(tl.int64) * stride_ds + offs_d[None, :], mask=qmask, other=0.0)
    lse2 = tl.load(LSE2 + row + offs_m, mask=m_ok, other=0.0)
    lse2 = tl.where(lse2 == float("-inf"), float("inf"), lse2)
    delta = tl.load(Delta + row + offs_m, mask=m_ok, other=0.0)
    Kh = K + hk.to(tl.int64) * stride_kh
    Vh = V + hk.to(tl.int64) * stride_vh
    slope2, seed_lo, seed_hi, off_lo, thresh = _option_state(Slopes, stride_sb, Seed, drop_thresh, b, h, HAS_ALIBI, HAS_DROPOUT)

    diag = Sk - Sq
    lo_blk, a_hi, b_lo, b_hi, c_lo, hi = _query_block_key_ranges(m0, Sq, Sk, LEFT, RIGHT, HAS_LEFT, HAS_RIGHT, BLOCK_M, BLOCK_N)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _bwd_dq_blocks(dq, q, do, lse2, delta, Kh, Vh, stride_ks, stride_vs, offs_m, offs_d, lo_blk, a_hi, Sk, diag,
                        LEFT, RIGHT, qk_scale, True, HAS_LEFT, HAS_RIGHT, EVEN_D, HEAD_DIM, BLOCK_N, DOT_PREC,
                        cap_in, cap_out, slope2, ig0, jg0, h, seed_lo, seed_hi, off_lo, thresh, drop_scale,
                        HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT)
    dq = _bwd_dq_blocks(dq, q, do, lse2, delta, Kh, Vh, stride_ks, stride_vs, offs_m, offs_d, b_lo, b_hi, Sk, diag,
                        LEFT, RIGHT, qk_scale, False, HAS_LEFT, HAS_RIGHT, EVEN_D, HEAD_DIM, BLOCK_N, DOT_PREC,
                        cap_in, cap_out, slope2, ig0, jg0, h, seed_lo, seed_hi, off_lo, thresh, drop_scale,
                        HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT)
    dq = _bwd_dq_blocks(dq, q, do, lse2, delta, Kh, Vh, stride_ks, stride_vs, offs_m, offs_d, c_lo, hi, Sk, diag,
                        LEFT, RIGHT, qk_scale, True, HAS_LEFT, HAS_RIGHT, EVEN_D, HEAD_DIM, BLOCK_N, DOT_PREC,
                        cap_in, cap_out, slope2, ig0, jg0, h, seed_lo, seed_hi, off_lo, thresh, drop_scale,
                        HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT)
    dq = dq * sm_scale
    tl.store(DQ + h.to(tl.int64) * stride_dqh + offs_m[:, None].to(tl.int64) * stride_dqs + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=qmask)


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates per BLOCK_D, the first being the default
# without autotuning. Every candidate compiles for sm_90a and sm_80 without spilling and within
# shared memory (the compile tier, tests/test_static_triton.py, checks the defaults on every commit
# and `make static-check` all of them). fp32 inputs run 3xTF32 dots (three tensor-core products
# per fp32 product, fp32-level accuracy) and have rows of their own: their tiles are twice the bytes
# and their dots three times the registers.
_TABLES = {
    "fwd": {
        False: {
            64: [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3)],
            128: [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3)],
            256: [(128, 32, 8, 2), (64, 32, 4, 1)],
        },
        True: {
            64: [(32, 32, 8, 1), (16, 32, 8, 1), (16, 16, 4, 1)],
            128: [(16, 32, 8, 1), (16, 16, 4, 1)],
            256: [(16, 16, 4, 1)],
        },
    },
    "dkdv": {  # BLOCK_N: keys owned; BLOCK_M: query block streamed
        False: {
            64: [(32, 128, 8, 3), (32, 64, 4, 3), (32, 128, 8, 2), (32, 64, 4, 2)],
            128: [(16, 64, 8, 2), (16, 64, 8, 3), (16, 32, 4, 2)],
            256: [(16, 16, 4, 1)],
        },
        True: {
            64: [(32, 16, 8, 1), (16, 16, 4, 1)],
            128: [(16, 16, 8, 1), (32, 16, 8, 1)],
            256: [(32, 16, 8, 1)],
        },
    },
    "dq": {  # BLOCK_M: queries owned; BLOCK_N: key block streamed
        False: {
            64: [(128, 32, 4, 3), (128, 64, 8, 3), (64, 32, 4, 3), (64, 64, 4, 2), (128, 32, 8, 3), (64, 32, 4, 2)],
            128: [(128, 32, 8, 3), (64, 32, 4, 3), (64, 32, 4, 2), (64, 64, 8, 2), (128, 32, 8, 2)],
            256: [(32, 32, 4, 2), (32, 16, 4, 2), (64, 16, 4, 2), (32, 32, 4, 1), (32, 16, 4, 1)],
        },
        True: {
            64: [(16, 16, 4, 1), (16, 16, 8, 1), (64, 16, 8, 1)],
            128: [(16, 16, 8, 1)],
            256: [(16, 16, 8, 1)],
        },
    },
}
# Head dims that are not a power of two (80, 96, 112 in the 128 row) mask the padded columns and
# need fewer registers per tile: their own rows where the even ones spill.
_UNEVEN = {
    "fwd": {False: {128: [(128, 32, 8, 3)]}},
    "dkdv": {False: {128: [(16, 32, 8, 2)]}},
}
# sm_80 (A100): where the sm_90a rows spill.
_SM80 = {
    "fwd": {False: {256: [(64, 32, 8, 2), (32, 32, 4, 2)]}},
    "dkdv": {False: {64: [(32, 32, 4, 2), (16, 32, 4, 2)], 128: [(16, 64, 8, 2), (32, 32, 8, 2), (16, 32, 8, 2)],
                     256: [(16, 16, 4, 1), (16, 32, 8, 1)]}},
    "dq": {False: {64: [(128, 32, 8, 3), (64, 64, 4, 2), (128, 32, 4, 3)],
                   128: [(128, 32, 8, 3), (64, 32, 4, 2), (64, 64, 8, 2), (128, 32, 8, 2)],
                   256: [(32, 32, 4, 2), (32, 16, 4, 2), (32, 32, 4, 1), (32, 16, 4, 1)]},
           True: {256: [(32, 16, 4, 1)]}},
}
# Packed sequences (IS_VARLEN), on every target: where the lengths and offsets the varlen prologue
# loads (registers, where the padded kernel reads parameters) make a row spill (D=128 windows).
_VARLEN = {"dkdv": {False: {128: [(16, 32, 8, 2)]}}}
# The options, on every target, where the rows above spill: softcap / ALiBi (HAS_SOFTCAP, HAS_ALIBI:
# the tanh and the distance per score element) and dropout (HAS_DROPOUT: one Philox4x32-10 per score
# element keeps its four words and the key live, so the backward's score tiles shrink to a few
# elements per thread); _DROPOUT first, then _SCORE_OPTIONS (which dropout takes too); on sm_80
# (whole mma.sync accumulators per warp) _DROPOUT_SM80 and _SCORE_SM80 before them.
_SCORE_OPTIONS = {
    "fwd": {False: {256: [(64, 32, 8, 2)]}},
    "dkdv": {False: {128: [(16, 32, 8, 2)]}},
}
_DROPOUT = {
    "fwd": {False: {256: [(64, 16, 8, 2)]}},
    "dkdv": {False: {64: [(16, 64, 8, 2)], 128: [(16, 32, 8, 2)]}},
    "dq": {False: {64: [(64, 32, 8, 2)], 128: [(64, 32, 8, 2)], 256: [(32, 16, 4, 2)]}},
}
_SCORE_SM80 = {
    "fwd": {False: {128: [(128, 32, 8, 3)]}},
    "dkdv": {False: {256: [(16, 16, 8, 1)]}},
}
_DROPOUT_SM80 = {"dkdv": {False: {64: [(16, 32, 8, 2)]}, True: {128: [(32, 16, 8, 1)]}}}
_KEY = ["BLOCK_D", "EVEN_D", "HAS_LEFT", "HAS_RIGHT", "DOT_PREC", "SEQ_BUCKET"]
_OPTION_KEY = ["HAS_SOFTCAP", "HAS_ALIBI", "HAS_DROPOUT"]  # the pointer kernels only (the TMA forward takes no option)
# Under the interpreter: one small fixed config (BLOCK_M != BLOCK_N, so mismatched block boundaries
# are exercised); inside fastlm.triton._configs.gpu_configs() the GPU defaults instead.
_INTERP = {"fwd": dict(BLOCK_M=32, BLOCK_N=16), "dkdv": dict(BLOCK_M=16, BLOCK_N=32), "dq": dict(BLOCK_M=32, BLOCK_N=16)}
_INTERP["fwd_tma"] = _INTERP["fwd"]
# The TMA forward ("fwd_tma") takes the "fwd" rows except where these differ.
_TMA: dict = {}


def table_row(kind: str, bd: int, fp32: bool, even: bool = True, cc: int = 90, varlen: bool = False,
              dropout: bool = False, scores: bool = False) -> list[tuple[int, int, int, int]]:
    """The candidates of kernel ``kind`` ("fwd", "dkdv", "dq") for BLOCK_D = bd, the dtype class,
    whether the head dim fills BLOCK_D, and the GPU's compute capability cc (sm_80 keeps whole
    mma.sync accumulators per warp, so some rows differ there). "fwd_tma" (the TMA forward, sm_90
    only) is the "fwd" row unless _TMA has its own; ``varlen`` (IS_VARLEN) takes _VARLEN's first,
    ``dropout`` (HAS_DROPOUT) _DROPOUT's before all, ``scores`` (HAS_SOFTCAP or HAS_ALIBI) or dropout
    _SCORE_OPTIONS' next."""
    tma = kind == "fwd_tma"
    kind = "fwd" if tma else kind
    table = _TABLES[kind][fp32]
    key = min((k for k in table if k >= bd), default=max(table))
    sm80 = cc < 90
    for override, applies in ((_DROPOUT_SM80, dropout and sm80), (_SCORE_SM80, (scores or dropout) and sm80), (_DROPOUT, dropout),
                              (_SCORE_OPTIONS, scores or dropout), (_VARLEN, varlen), (_TMA, tma), (_SM80, cc < 90), (_UNEVEN, not even)):
        row = override.get(kind, {}).get(fp32, {}).get(key) if applies else None
        if row:
            return row
    return table[key]


def candidates(kind: str, bd: int, fp32: bool, even: bool = True, cc: int = 90, varlen: bool = False, dropout: bool = False,
               scores: bool = False) -> list[dict]:
    """Every config the autotuner may try for this kernel variant (its pruned list), default first."""
    return [dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s) for bm, bn, w, s in table_row(kind, bd, fp32, even, cc, varlen, dropout, scores)]


def default_config(kind: str, bd: int, fp32: bool = False, even: bool = True, cc: int = 90, varlen: bool = False,
                   dropout: bool = False, scores: bool = False) -> dict:
    """The config used without autotuning (and under gpu_configs()): the first candidate."""
    return candidates(kind, bd, fp32, even, cc, varlen, dropout, scores)[0]




def seq_bucket(Sq: int, Sk: int) -> int:
    """The autotuner's sequence-length key: max(Sq, Sk) rounded up to a power of two in [128, 16384]."""
    return min(max(triton.next_power_of_2(max(Sq, Sk, 1)), 128), 16384)


def _set_tma_blocks(nargs: dict) -> None:
    """Give the TMA forward's descriptors the block shapes of the config in nargs (its pre_hook)."""
    bm, bn, bd = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_D"]
    nargs["Q"].block_shape = [1, 1, bm, bd]
    nargs["O"].block_shape = [1, 1, bm, bd]
    nargs["K"].block_shape = [1, 1, bn, bd]
    nargs["V"].block_shape = [1, 1, bn, bd]


_PRE_HOOKS = {"fwd_tma": _set_tma_blocks}


def _has_scores(meta: dict) -> bool:
    return bool(meta.get("HAS_SOFTCAP", False) or meta.get("HAS_ALIBI", False))


def _autotuned(kind: str, kernel):
    table_kind = "fwd" if kind == "fwd_tma" else kind
    tables = (_TABLES, _UNEVEN, _SM80, _TMA) if kind == "fwd_tma" else (_TABLES, _UNEVEN, _SM80, _VARLEN, _DROPOUT, _SCORE_OPTIONS, _DROPOUT_SM80, _SCORE_SM80)
    configs = sorted({c for t in tables for rows in t.get(table_kind, {}).values() for cs in rows.values() for c in cs})

    def prune(configs, named_args, **kwargs):
        meta = {**named_args, **kwargs}
        q = meta["Q"]
        want = table_row(kind, meta["BLOCK_D"], is_fp32_prec(meta["DOT_PREC"]), meta["EVEN_D"], capability(getattr(q, "base", q)),
                         meta.get("IS_VARLEN", False), meta.get("HAS_DROPOUT", False), _has_scores(meta))
        keep = [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in want]
        return keep or configs[:1]

    hook = _PRE_HOOKS.get(kind)
    return triton.autotune(
        [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s, pre_hook=hook) for (bm, bn, w, s) in configs],
        key=_KEY if kind == "fwd_tma" else _KEY + ["IS_VARLEN"] + _OPTION_KEY, prune_configs_by={"early_config_prune": prune},
    )(kernel)


_fwd_tuned = _autotuned("fwd", _attn_fwd_kernel)
_fwd_tma_tuned = _autotuned("fwd_tma", _attn_fwd_tma_kernel)
_dkdv_tuned = _autotuned("dkdv", _attn_bwd_dkdv_kernel)
_dq_tuned = _autotuned("dq", _attn_bwd_dq_kernel)
_KERNELS = {"fwd": (_attn_fwd_kernel, _fwd_tuned), "fwd_tma": (_attn_fwd_tma_kernel, _fwd_tma_tuned), "dkdv": (_attn_bwd_dkdv_kernel, _dkdv_tuned), "dq": (_attn_bwd_dq_kernel, _dq_tuned)}


def autotune_enabled() -> bool:
    """Autotuning runs on CUDA tensors unless FASTLM_AUTOTUNE=0 (read per call; the tests set it
    to keep the GPU suite's compile count down, the benchmarks leave it on)."""
    return os.environ.get("FASTLM_AUTOTUNE", "1") not in ("0", "")


def _launch(kind, grid_fn, args, meta):
    raw, tuned = _KERNELS[kind]
    fp32 = is_fp32_prec(meta["DOT_PREC"])
    first = getattr(args[0], "base", args[0])  # a tensor, or the tensor under a descriptor
    varlen, dropout, scores = meta.get("IS_VARLEN", False), meta.get("HAS_DROPOUT", False), _has_scores(meta)
    if not first.is_cuda or interpreter_on():
        cfg = (_INTERP[kind] if small_configs()
               else default_config(kind, meta["BLOCK_D"], fp32, meta["EVEN_D"], varlen=varlen, dropout=dropout, scores=scores))
    elif autotune_enabled():
        tuned[lambda m: grid_fn(m)](*args, **meta)
        return
    else:
        cfg = default_config(kind, meta["BLOCK_D"], fp32, meta["EVEN_D"], capability(first), varlen, dropout, scores)
    if kind in _PRE_HOOKS:
        _PRE_HOOKS[kind](dict(zip("QKVO", args[:4], strict=True), **meta, **cfg))
    raw[grid_fn(cfg)](*args, **meta, **cfg)


def fwd_meta(D: int, dtype: torch.dtype, causal: bool, window_left: int, window_right: int) -> tuple[dict, int, int]:
    """The forward's constexprs for head dim D, and the window bounds (left, right) it is passed."""
    has_left, left, has_right, right = resolve_window(causal, window_left, window_right)
    bd = block_d(D)
    meta = dict(HEAD_DIM=D, BLOCK_D=bd, EVEN_D=bd == D, HAS_LEFT=has_left, HAS_RIGHT=has_right, DOT_PREC=dot_precision(dtype, bd))
    return meta, left, right


def dkdv_meta(meta: dict, opt_meta: dict) -> dict:
    """The dK/dV kernel's constexprs: the forward's and the options', except that fp32 with dropout
    at BLOCK_D 128 runs IEEE FMA dots (exact, slow): every 3xTF32 dK/dV tile spills there (the
    per-element Philox words beside the hi/lo operand halves), as fp32 does above BLOCK_D 128."""
    meta = {**meta, **opt_meta}
    if opt_meta.get("HAS_DROPOUT") and meta["DOT_PREC"] != "ieee" and is_fp32_prec(meta["DOT_PREC"]) and meta["BLOCK_D"] == 128:
        meta["DOT_PREC"] = "ieee"
    return meta


def _check_unit_d(**tensors):
    for name, t in tensors.items():
        if t is not None and t.numel() and t.stride(-1) != 1:
            raise ValueError(f"fastlm.triton.attention: {name} must have unit stride in the head dim (got strides {t.stride()})")


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _tensor_descriptor_class():
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:
        return None
    return TensorDescriptor


TensorDescriptor = _tensor_descriptor_class()


def _descriptor_ok(t: torch.Tensor) -> bool:
    """A TMA descriptor can express t: 16-byte aligned base and strides, unit last stride, no empty dim."""
    size = t.element_size()
    return (t.dim() == 4 and t.stride(-1) == 1 and all(n > 0 for n in t.shape) and t.data_ptr() % 16 == 0
            and all(st > 0 and st * size % 16 == 0 for st in t.stride()[:-1]))


def uses_tma(q, k, v, out) -> bool:
    """Whether attention_fwd loads Q, K, V and stores O through tensor descriptors (TMA): only
    with FASTLM_ATTENTION_TMA=1 until a GPU run has validated it (the interpreter and the sm_90a
    compile tier have; no GPU has yet): then on a device of capability 90 or more, and on CPU
    tensors under TRITON_INTERPRET=1, whose interpreter executes descriptors, when this Triton has
    host tensor descriptors (triton.tools.tensor_descriptor), every
    tensor is expressible as one (_descriptor_ok) and the dots are not IEEE fp32 (head dims over
    128 in fp32, whose TMA tile spills). Otherwise the pointer kernel, which also serves sm_80.
    No warp specialisation: Triton's tl.range(warp_specialize=True) is Blackwell-only (on sm_90 the
    3.9 compiler accepts it and emits the same code)."""
    mode = os.environ.get("FASTLM_ATTENTION_TMA", "")
    if mode == "0" or TensorDescriptor is None or not all(_descriptor_ok(t) for t in (q, k, v, out)):
        return False
    if dot_precision(q.dtype, block_d(q.shape[-1])) == "ieee":
        return False
    if not q.is_cuda:
        return mode == "1" and interpreter_on()
    if interpreter_on():
        return False
    return mode == "1" and capability(q) >= 90


def attention_fwd(q, k, v, causal, scale, window_left, window_right, out, lse, *, softcap=0.0, alibi_slopes=None,
                  dropout_p=0.0, seed=None) -> None:
    """Forward into caller-given out (B, Hq, Sq, D) and lse (B, Hq, Sq) fp32 (unit stride in S).
    q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D) with Hq % Hkv == 0, unit stride in D; window sides -1 =
    unbounded; scale multiplies q.k. Q, K, V and O go through TMA descriptors when uses_tma() and
    no option is set; the options (softcap, alibi_slopes, dropout_p with seed: _option_args) run the
    pointer kernel."""
    _check_unit_d(q=q, k=k, v=v, out=out)
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    if B == 0 or Hq == 0 or Sq == 0:
        return
    meta, left, right = fwd_meta(D, q.dtype, causal, window_left, window_right)
    opt_args, opt_meta = _option_args(scale, softcap, alibi_slopes, dropout_p, seed)
    grid = lambda m: grid_1d(triton.cdiv(Sq, m["BLOCK_M"]), Hq, B)  # noqa: E731
    if not opt_meta and uses_tma(q, k, v, out):
        bd = meta["BLOCK_D"]
        descs = [TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, 16, bd]) for t in (q, k, v, out)]
        args = (*descs, lse, lse.stride(0), lse.stride(1), Hq, Hq // Hkv, Sq, Sk, left, right, scale * LOG2E, seq_bucket(Sq, Sk))
        _launch("fwd_tma", grid, args, meta)
        return
    args = (
        q, k, v, out, lse,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
        Hq, Hq // Hkv, Sq, Sk, left, right, scale * LOG2E, seq_bucket(Sq, Sk), None, None, *opt_args,
    )
    _launch("fwd", grid, args, {**meta, **opt_meta})


def attention_bwd(do, dlse, q, k, v, out, lse, causal, scale, window_left, window_right, dq, dk, dv, deterministic=True, *,
                  softcap=0.0, alibi_slopes=None, dropout_p=0.0, seed=None) -> None:
    """Backward into caller-given dq (like q), dk, dv (like k, v). lse is the forward's (B, Hq, Sq)
    fp32; dlse (its upstream gradient, or None) enters as delta_i - dlse_i, since dLSE_i/dS_ij =
    P_ij. Always deterministic (no atomics): ``deterministic`` is accepted for the interface. The
    options are the forward's (the same seed recomputes the same dropout mask)."""
    _check_unit_d(do=do, q=q, k=k, v=v, out=out, dq=dq, dk=dk, dv=dv)
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    if B == 0 or Hkv == 0:
        return
    if Sq == 0:
        dk.zero_()
        dv.zero_()
        return
    meta, left, right = fwd_meta(D, q.dtype, causal, window_left, window_right)
    bd = meta["BLOCK_D"]
    opt_args, opt_meta = _option_args(scale, softcap, alibi_slopes, dropout_p, seed)
    delta = torch.empty((B, Hq, Sq), device=q.device, dtype=torch.float32)
    pre_m = PREPROCESS_BLOCK_M if not small_configs() else 32
    _bwd_preprocess_kernel[grid_1d(triton.cdiv(Sq, pre_m), Hq, B)](
        out, do, delta, out.stride(0), out.stride(1), out.stride(2), do.stride(0), do.stride(1), do.stride(2),
        Hq, Sq, HEAD_DIM=D, BLOCK_D=bd, EVEN_D=bd == D, BLOCK_M=pre_m,
    )
    if dlse is not None:
        delta -= dlse
    lse2 = (lse.float() * LOG2E).contiguous()
    common = (
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
    )
    bucket = seq_bucket(Sq, Sk)
    if Sk > 0:
        args = (q, k, v, do, lse2, delta, dk, dv, *common,
                dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
                Hkv, Hq // Hkv, Sq, Sk, left, right, scale * LOG2E, scale, bucket, None, None, 0, *opt_args)
        _launch("dkdv", lambda m: grid_1d(triton.cdiv(Sk, m["BLOCK_N"]), Hkv, B), args, dkdv_meta(meta, opt_meta))
    args = (q, k, v, do, lse2, delta, dq, *common, dq.stride(0), dq.stride(1), dq.stride(2),
            Hq, Hq // Hkv, Sq, Sk, left, right, scale * LOG2E, scale, bucket, None, None, 0, *opt_args)
    _launch("dq", lambda m: grid_1d(triton.cdiv(Sq, m["BLOCK_M"]), Hq, B), args, {**meta, **opt_meta})


def _packed(t: torch.Tensor) -> torch.Tensor:
    """Packed rows (T, H, D) seen as (1, H, T, D), the layout the kernels index."""
    return t.transpose(0, 1).unsqueeze(0)


def attention_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
                         window_left, window_right, out, lse, *, softcap=0.0, alibi_slopes=None, dropout_p=0.0, seed=None) -> None:
    """Packed forward into caller-given out (Tq, Hq, D) and lse (Hq, Tq) fp32 (unit stride in Tq).
    q (Tq, Hq, D), k/v (Tk, Hkv, D), unit stride in D; cu_seqlens_q/k (B + 1,) int32 on q's device:
    sequence b owns query rows [cu_seqlens_q[b], cu_seqlens_q[b + 1]) and key rows likewise, and is
    computed exactly as attention_fwd computes it alone. The grid is ceil(max_seqlen_q / BLOCK_M)
    query blocks x Hq x B; a block past its sequence's end exits after reading two offsets, so
    max_seqlen_* must be at least every length (the caller checks: this launcher never syncs).
    The options as in attention_fwd; (B, Hq) alibi_slopes are per sequence, and dropout's rows are
    the packed rows themselves."""
    _check_unit_d(q=q, k=k, v=v, out=out)
    Tq, Hq, D = q.shape
    Hkv = k.shape[1]
    B = cu_seqlens_q.shape[0] - 1
    if B <= 0 or Hq == 0 or Tq == 0 or max_seqlen_q <= 0:
        return
    meta, left, right = fwd_meta(D, q.dtype, causal, window_left, window_right)
    opt_args, opt_meta = _option_args(scale, softcap, alibi_slopes, dropout_p, seed)
    q4, k4, v4, o4 = (_packed(t) for t in (q, k, v, out))
    grid = lambda m: grid_1d(triton.cdiv(max_seqlen_q, m["BLOCK_M"]), Hq, B)  # noqa: E731
    args = (
        q4, k4, v4, o4, lse,
        0, q4.stride(1), q4.stride(2), 0, k4.stride(1), k4.stride(2),
        0, v4.stride(1), v4.stride(2), 0, o4.stride(1), o4.stride(2), 0, lse.stride(0),
        Hq, Hq // Hkv, max_seqlen_q, max_seqlen_k, left, right, scale * LOG2E, seq_bucket(max_seqlen_q, max_seqlen_k),
        cu_seqlens_q, cu_seqlens_k, *opt_args,
    )
    _launch("fwd", grid, args, {**meta, "IS_VARLEN": True, **opt_meta})


def attention_varlen_bwd(do, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
                         window_left, window_right, dq, dk, dv, deterministic=True, *, softcap=0.0, alibi_slopes=None,
                         dropout_p=0.0, seed=None) -> None:
    """Packed backward into caller-given dq (like q), dk, dv (like k, v): per sequence exactly
    attention_bwd (dlse (Hq, Tq) fp32 or None; deterministic, no atomics). Key blocks of sequences
    with no query rows get dK = dV = 0; the grids are as in attention_varlen_fwd (key blocks over
    max_seqlen_k for dK/dV)."""
    _check_unit_d(do=do, q=q, k=k, v=v, out=out, dq=dq, dk=dk, dv=dv)
    Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[0], k.shape[1]
    B = cu_seqlens_q.shape[0] - 1
    if B <= 0 or Hkv == 0:
        return
    meta, left, right = fwd_meta(D, q.dtype, causal, window_left, window_right)
    bd = meta["BLOCK_D"]
    opt_args, opt_meta = _option_args(scale, softcap, alibi_slopes, dropout_p, seed)
    q4, k4, v4, o4, do4, dq4, dk4, dv4 = (_packed(t) for t in (q, k, v, out, do, dq, dk, dv))
    delta = torch.empty((Hq, Tq), device=q.device, dtype=torch.float32)
    if Tq > 0:
        pre_m = PREPROCESS_BLOCK_M if not small_configs() else 32
        _bwd_preprocess_kernel[grid_1d(triton.cdiv(Tq, pre_m), Hq)](
            o4, do4, delta, 0, o4.stride(1), o4.stride(2), 0, do4.stride(1), do4.stride(2),
            Hq, Tq, HEAD_DIM=D, BLOCK_D=bd, EVEN_D=bd == D, BLOCK_M=pre_m,
        )
    if dlse is not None:
        delta -= dlse
    lse2 = (lse.float() * LOG2E).contiguous()
    common = (
        0, q4.stride(1), q4.stride(2), 0, k4.stride(1), k4.stride(2), 0, v4.stride(1), v4.stride(2),
        0, do4.stride(1), do4.stride(2),
    )
    bucket = seq_bucket(max_seqlen_q, max_seqlen_k)
    varlen = (cu_seqlens_q, cu_seqlens_k, Tq)
    meta, opt_meta = {**meta, "IS_VARLEN": True}, opt_meta
    if Tk > 0 and max_seqlen_k > 0:
        args = (q4, k4, v4, do4, lse2, delta, dk4, dv4, *common, 0, dk4.stride(1), dk4.stride(2), 0, dv4.stride(1), dv4.stride(2),
                Hkv, Hq // Hkv, max_seqlen_q, max_seqlen_k, left, right, scale * LOG2E, scale, bucket, *varlen, *opt_args)
        _launch("dkdv", lambda m: grid_1d(triton.cdiv(max_seqlen_k, m["BLOCK_N"]), Hkv, B), args, dkdv_meta(meta, opt_meta))
    if Tq > 0 and max_seqlen_q > 0:
        args = (q4, k4, v4, do4, lse2, delta, dq4, *common, 0, dq4.stride(1), dq4.stride(2),
                Hq, Hq // Hkv, max_seqlen_q, max_seqlen_k, left, right, scale * LOG2E, scale, bucket, *varlen, *opt_args)
        _launch("dq", lambda m: grid_1d(triton.cdiv(max_seqlen_q, m["BLOCK_M"]), Hq, B), args, {**meta, **opt_meta})


PREPROCESS_BLOCK_M = 64


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


from fastlm.triton.decode_attention import decode_attention_fwd, paged_kv_append  # noqa: E402,F401  (one launcher module per op name)
