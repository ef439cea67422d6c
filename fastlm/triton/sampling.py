"""Token sampling (temperature, top-k, top-p, min-p) and the top-k/top-p filter in Triton.

Nothing is sorted and every threshold is exact: z = fp32(x) / T is mapped to an unsigned 32-bit
key u monotone in the value, and the k-th largest key (top-k) and the top-p key are found by a
radix select over u's three digits (11, 11 and 10 bits): a pass builds the row's 2048-bin
histogram of the next digit, counts for top-k and int64 masses (trunc(e 2^40)) for top-p, among
the elements whose higher digits match the prefix chosen so far. The token is drawn by inverse CDF
over those integer masses with one 53-bit Philox uniform per row. Integer sums are exact in any
order, so every backend takes the same decisions as the reference.

A row is split into slices, one program per (row, slice), so a small batch still covers the GPU;
the programs of a pass meet through small workspaces between launches: per-slice max statistics,
the row histograms (integer atomics of a program's non-zero bins: order-free, deterministic), the
selection state and per-2048-element chunk masses. Passes over the logits, each read once:
stats (max, first argmax, NaN/+inf; the first top-k histogram) 1, top-k 2, top-p 3, the chunk
masses 1, then the draw reloads the one chunk that holds the token: temperature-only 2V + 2048
element loads a row, everything on 7V + 2048 (the filter: 7V with its write). The trade-off: a
launch a pass and a few KB of workspace a row, in exchange for a bounded number of passes, no
sort, no host sync and bit-exact agreement with the reference.
The definition being computed is in fastlm/reference/sampling.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastlm.backend import interpreter_on

INT32_MAX: tl.constexpr = tl.constexpr(2147483647)
NB: tl.constexpr = tl.constexpr(2048)  # histogram bins (11-bit digits)
CHUNK: tl.constexpr = tl.constexpr(2048)  # elements a lookup chunk of the draw
CHUNK_ELEMS = 2048
HISTS_K, HISTS_P = 3, 3


@triton.jit
def _philox(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 tensors: 10 rounds of (hi(M1*c2)^c1^k0, lo(M1*c2), hi(M0*c0)^c3^k1,
    lo(M0*c0)), the key bumped by the Weyl constants after each round."""
    for _ in tl.static_range(10):
        _c0 = c0
        _c2 = c2
        c0 = tl.umulhi(_c2, 0xCD9E8D57) ^ c1 ^ k0
        c2 = tl.umulhi(_c0, 0xD2511F53) ^ c3 ^ k1
        c1 = _c2 * 0xCD9E8D57
        c3 = _c0 * 0xD2511F53
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def _ukey(z):
    """u = key(z) + 2^31 as int64 in [0, 2^32): monotone in the fp32 value z (no NaN, no -0.0);
    key(z) is the reference's float_key."""
    b = z.to(tl.int32, bitcast=True)
    return (b ^ ((b >> 31) & 0x7FFFFFFF)).to(tl.int64) + 2147483648


@triton.jit
def _scale(x, t_eff, USE_T: tl.constexpr):
    """z = fp32(x) / T, IEEE-rounded like the reference and csrc (a plain `/` compiles to
    approximate division), -0.0 made +0.0."""
    z = x.to(tl.float32)
    if USE_T:
        z = tl.math.div_rn(z, t_eff)
    return tl.where(z == 0.0, 0.0, z)


@triton.jit
def _mass(z, m):
    """trunc(exp2((z - m) log2 e) 2^40) as int64."""
    return (tl.exp2((z - m) * 1.4426950408889634) * 1099511627776.0).to(tl.int64)


@triton.jit
def _rows(Temp, TopK, TopP, MinP, t_val, k_val, p_val, mp_val, rows, rmask,
          HAS_T: tl.constexpr, HAS_K: tl.constexpr, HAS_P: tl.constexpr, HAS_MP: tl.constexpr):
    """The rows' (T, k, p, min_p): from the (B,) tensors where given, else the scalars."""
    zf = tl.zeros(rows.shape, tl.float32)
    T = tl.load(Temp + rows, mask=rmask, other=1.0).to(tl.float32) if HAS_T else zf + t_val
    k = tl.load(TopK + rows, mask=rmask, other=1).to(tl.int64) if HAS_K else tl.zeros(rows.shape, tl.int64) + k_val
    p = tl.load(TopP + rows, mask=rmask, other=1.0).to(tl.float32) if HAS_P else zf + p_val
    mp = tl.load(MinP + rows, mask=rmask, other=0.0).to(tl.float32) if HAS_MP else zf + mp_val
    return T, k, p, mp


@triton.jit
def _t_eff(T):
    """(greedy, t_ok, the divisor): T = 0 is greedy and a bad T reports a status, both divide by 1."""
    greedy = T == 0.0
    t_ok = (T >= 0.0) & (T <= 3.4028234663852886e38)
    return greedy, t_ok, tl.where(greedy | (t_ok == 0), 1.0, T)


@triton.jit
def _row_stats(SMax, SArg, SBad, rows, rmask, NS, T, k, p, mp, NS_P2: tl.constexpr):
    """Combine the rows' slice statistics: (m, first argmax, status, t_eff, greedy). m is 0 for a
    row whose status is not 0 (so no later exp2 overflows)."""
    s = tl.arange(0, NS_P2)
    sm = rmask[:, None] & (s[None, :] < NS)
    off = rows[:, None] * NS + s[None, :]
    smax = tl.load(SMax + off, mask=sm, other=float("-inf"))
    m = tl.max(smax, 1)
    am = tl.min(tl.where(sm & (smax == m[:, None]), tl.load(SArg + off, mask=sm, other=INT32_MAX), INT32_MAX), 1)
    bad = tl.max(tl.load(SBad + off, mask=sm, other=0), 1)
    greedy, t_ok, t_eff = _t_eff(T)
    status = tl.zeros(rows.shape, tl.int32)
    status = tl.where((mp >= 0.0) & (mp <= 1.0), status, -6)
    status = tl.where((p > 0.0) & (p <= 1.0), status, -5)
    status = tl.where(k >= 1, status, -4)
    status = tl.where(t_ok, status, -3)
    status = tl.where(m == float("-inf"), -2, status)
    status = tl.where(bad > 0, -1, status)
    m = tl.where(status == 0, m, 0.0)
    return m, am.to(tl.int64), status, t_eff, greedy


@triton.jit
def _select(H, rows, on, prefix, target, BITS: tl.constexpr):
    """One radix-select step on the rows' histograms H (B, NB), for the rows that are on: b* = the
    largest b with G(b) = sum_{b' >= b} H[b'] >= target; returns ((prefix << BITS) | b*,
    target - G(b* + 1)); the other rows keep (prefix, target)."""
    bins = tl.arange(0, NB)
    h = tl.load(H + rows[:, None] * NB + bins[None, :], mask=on[:, None], other=0)
    g = tl.sum(h, 1)[:, None] - tl.cumsum(h, 1) + h
    b = tl.max(tl.where(g >= target[:, None], bins[None, :], -1), 1)
    above = tl.sum(tl.where(bins[None, :] > b[:, None], h, 0), 1)
    return tl.where(on, (prefix << BITS) | b.to(tl.int64), prefix), tl.where(on, target - above, target)


@triton.jit
def _digit(u, D: tl.constexpr):
    """Digit D of u (D0 = bits 31..21, D1 = 20..10, D2 = 9..0) and the prefix it extends."""
    if D == 0:
        return u >> 21, u * 0
    elif D == 1:
        return (u >> 10) & 2047, u >> 21
    else:
        return u & 1023, u >> 10


@triton.jit
def _hist_add(d, sel, BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr):
    """The count histogram of digits d (BLOCK_B, BLOCK_V) where sel, one NB-bin block a row, as a
    (BLOCK_B * NB,) int32 tensor."""
    flat = tl.reshape(d.to(tl.int32) + tl.arange(0, BLOCK_B)[:, None] * NB, (BLOCK_B * BLOCK_V,))
    return tl.histogram(flat, BLOCK_B * NB, mask=tl.reshape(sel, (BLOCK_B * BLOCK_V,)))


@triton.jit
def _hist_flush(HistOut, row0, B, hist, BLOCK_B: tl.constexpr):
    """Add a program's non-zero bins to the rows' histograms (integer atomics: order-free)."""
    idx = tl.arange(0, BLOCK_B * NB)
    tl.atomic_add(HistOut + row0 * NB + idx, hist.to(tl.int64), mask=(hist > 0) & (row0 + idx // NB < B), sem="relaxed")


@triton.jit
def _sampling_pass_kernel(
    X, stride_x, V, SL,  # logits (B, V): row stride, unit column stride; slice length (a multiple of BLOCK_V)
    Temp, TopK, TopP, MinP,  # (B,) per-row parameters, read when HAS_T/HAS_K/HAS_P/HAS_MP
    t_val, k_val, p_val, mp_val,  # the scalar parameters otherwise
    SMax, SArg, SBad, NS,  # (B, NS) slice statistics: fp32 max z, int32 first argmax, int32 NaN/+inf
    HistIn, HistOut, B,  # (B, NB) int64 row histograms: the last pass's (CONSUME) and this pass's (PRODUCE)
    StateIn, StateOut,  # (B, 4) int64 selection state (tau_k prefix, k target, tau_p prefix, p target)
    ChunkSum, NCH,  # (B, NCH) int64 F-mass of each 2048-element chunk (SUM)
    Out, stride_o, Status,  # FILTER: (B, V) filtered logits, x's dtype; (B,) int64 status
    Loads,  # (B,) int64 logits elements loaded (COUNT_LOADS)
    HAS_T: tl.constexpr, HAS_K: tl.constexpr, HAS_P: tl.constexpr, HAS_MP: tl.constexpr,
    USE_T: tl.constexpr, USE_K: tl.constexpr, USE_P: tl.constexpr, USE_MP: tl.constexpr,
    MODE: tl.constexpr, CONSUME: tl.constexpr, PRODUCE: tl.constexpr, FILTER_ROWS: tl.constexpr,
    NS_P2: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr, SUB: tl.constexpr, COUNT_LOADS: tl.constexpr,
):
    """Program (row block, slice) of one pass over x[rows, slice * SL : (slice + 1) * SL].
    MODE 0 (stats): slice max of z (NaN as -inf), its first index, any NaN/+inf; with PRODUCE 1
    also the count histogram of digit 0 of u.
    Before the others, the selection state advances over the histogram the last pass built
    (CONSUME 1..3: top-k digits 0..2 with target k; 4..6: top-p digits 0..2, target
    ceil(fp64(p) * S_k) with S_k the sum of histogram 4), written by slice 0 into StateOut.
    MODE 1 (radix): PRODUCE 2, 3: count histograms of digits 1, 2 of u among prefix matches;
    4..6: mass histograms of digits 0..2 among u >= tau_k and prefix matches.
    MODE 2 (sum): ChunkSum[row, c] = sum over chunk c of mass on F = {u >= tau, e >= min_p}.
    MODE 3 (filter): Out = x on F, -inf elsewhere, NaN rows where the status < 0."""
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_B
    rows = row0 + tl.arange(0, BLOCK_B)
    rmask = rows < B
    rows = tl.where(rmask, rows, 0)
    sl = tl.program_id(1)
    T, k, p, mp = _rows(Temp, TopK, TopP, MinP, t_val, k_val, p_val, mp_val, rows, rmask, HAS_T, HAS_K, HAS_P, HAS_MP)
    x_rows = X + rows[:, None] * stride_x
    start = sl * SL
    stop = tl.minimum(start + SL, V)
    lanes = tl.arange(0, BLOCK_V)[None, :]
    if MODE == 0:
        _, _, t_eff = _t_eff(T)
        vmax = tl.full([BLOCK_B, BLOCK_V], float("-inf"), tl.float32)
        varg = tl.full([BLOCK_B, BLOCK_V], INT32_MAX, tl.int32)
        vbad = tl.zeros([BLOCK_B, BLOCK_V], dtype=tl.int32)
        hist = tl.zeros([BLOCK_B * NB], dtype=tl.int32)
        for c in range(start, stop, BLOCK_V):
            cols = c + lanes
            msk = rmask[:, None] & (cols < stop)
            z = _scale(tl.load(x_rows + cols, mask=msk, other=float("-inf")), t_eff[:, None], USE_T)
            vbad = tl.maximum(vbad, (((z != z) | (z == float("inf"))) & msk).to(tl.int32))
            z = tl.where(z != z, float("-inf"), z)
            upd = z > vmax
            varg = tl.where(upd, cols, varg)
            vmax = tl.where(upd, z, vmax)
            if PRODUCE == 1:
                hist += _hist_add(_ukey(z) >> 21, msk, BLOCK_B, BLOCK_V)
        smax = tl.max(vmax, 1)
        tl.store(SMax + rows * NS + sl, smax, mask=rmask)
        tl.store(SArg + rows * NS + sl, tl.min(tl.where(vmax == smax[:, None], varg, INT32_MAX), 1), mask=rmask)
        tl.store(SBad + rows * NS + sl, tl.max(vbad, 1), mask=rmask)
        if PRODUCE == 1:
            _hist_flush(HistOut, row0, B, hist, BLOCK_B)
        if COUNT_LOADS:
            tl.atomic_add(Loads + rows, (tl.zeros([BLOCK_B], tl.int64) + (stop - start)), mask=rmask, sem="relaxed")
    else:
        m, am, status, t_eff, greedy = _row_stats(SMax, SArg, SBad, rows, rmask, NS, T, k, p, mp, NS_P2)
        if FILTER_ROWS:
            active = rmask & (status == 0)
        else:
            active = rmask & (status == 0) & (greedy == 0)
        k_on = active & (k < V) if USE_K else active & (k < 0)
        p_on = active & (p < 1.0) if USE_P else active & (k < 0)
        zero = tl.zeros([BLOCK_B], tl.int64)
        pk = tl.load(StateIn + rows * 4 + 0, mask=rmask, other=0) if CONSUME > 1 else zero
        tk = tl.load(StateIn + rows * 4 + 1, mask=rmask, other=0) if CONSUME > 1 else k
        pp = tl.load(StateIn + rows * 4 + 2, mask=rmask, other=0) if CONSUME > 4 else zero
        tp = tl.load(StateIn + rows * 4 + 3, mask=rmask, other=0) if CONSUME > 4 else zero
        if CONSUME >= 1:
            if CONSUME <= 3:
                pk, tk = _select(HistIn, rows, k_on, pk, tk, 10 if CONSUME == 3 else 11)
            else:
                if CONSUME == 4:
                    bins = tl.arange(0, NB)
                    s_k = tl.sum(tl.load(HistIn + rows[:, None] * NB + bins[None, :], mask=p_on[:, None], other=0), 1)
                    tp = tl.ceil(p.to(tl.float64) * s_k.to(tl.float64)).to(tl.int64)
                pp, tp = _select(HistIn, rows, p_on, pp, tp, 10 if CONSUME == 6 else 11)
            if sl == 0:
                tl.store(StateOut + rows * 4 + 0, pk, mask=rmask)
                tl.store(StateOut + rows * 4 + 1, tk, mask=rmask)
                tl.store(StateOut + rows * 4 + 2, pp, mask=rmask)
                tl.store(StateOut + rows * 4 + 3, tp, mask=rmask)
        tau_k = tl.where(k_on, pk, 0)
        tau = tl.where(p_on, pp, tau_k)
        if MODE == 1:
            on = k_on if PRODUCE <= 3 else p_on
            prefix = pk if PRODUCE <= 3 else pp
            if tl.max(on.to(tl.int32), 0) > 0:
                hist = tl.zeros([BLOCK_B * NB], dtype=tl.int32)
                for c in range(start, stop, BLOCK_V):
                    cols = c + lanes
                    msk = on[:, None] & (cols < stop)
                    z = _scale(tl.load(x_rows + cols, mask=msk, other=float("-inf")), t_eff[:, None], USE_T)
                    u = _ukey(z)
                    if PRODUCE <= 3:
                        d, pre = _digit(u, PRODUCE - 1)
                        hist += _hist_add(d, msk & (pre == prefix[:, None]), BLOCK_B, BLOCK_V)
                    else:
                        d, pre = _digit(u, PRODUCE - 4)
                        w = _mass(z, m[:, None])
                        sel = msk & (u >= tau_k[:, None]) & (pre == prefix[:, None]) & (w > 0)
                        tl.atomic_add(HistOut + rows[:, None] * NB + d, w, mask=sel, sem="relaxed")
                if PRODUCE <= 3:
                    _hist_flush(HistOut, row0, B, hist, BLOCK_B)
                if COUNT_LOADS:
                    tl.atomic_add(Loads + rows, zero + (stop - start), mask=on, sem="relaxed")
        elif MODE == 2:
            if tl.max(active.to(tl.int32), 0) > 0:
                for c in range(start, stop, BLOCK_V):
                    cols = c + lanes
                    msk = active[:, None] & (cols < stop)
                    z = _scale(tl.load(x_rows + cols, mask=msk, other=float("-inf")), t_eff[:, None], USE_T)
                    f = msk & (_ukey(z) >= tau[:, None])
                    if USE_MP:
                        f = f & (tl.exp2((z - m[:, None]) * 1.4426950408889634) >= mp[:, None])
                    w = tl.where(f, _mass(z, m[:, None]), 0)
                    part = tl.sum(tl.reshape(w, (BLOCK_B, SUB, BLOCK_V // SUB)), 2)
                    idx = c // CHUNK + tl.arange(0, SUB)[None, :]
                    tl.store(ChunkSum + rows[:, None] * NCH + idx, part, mask=active[:, None] & (idx < NCH))
                if COUNT_LOADS:
                    tl.atomic_add(Loads + rows, zero + (stop - start), mask=active, sem="relaxed")
        else:
            if sl == 0:
                tl.store(Status + rows, status.to(tl.int64), mask=rmask)
            ok = active[:, None]
            for c in range(start, stop, BLOCK_V):
                cols = c + lanes
                msk = rmask[:, None] & (cols < stop)
                x = tl.load(x_rows + cols, mask=msk & ok, other=float("-inf"))
                z = _scale(x, t_eff[:, None], USE_T)
                f = _ukey(z) >= tau[:, None]
                if USE_MP:
                    f = f & (tl.exp2((z - m[:, None]) * 1.4426950408889634) >= mp[:, None])
                y = tl.where(ok, tl.where(f, x, float("-inf")), float("nan"))
                tl.store(Out + rows[:, None] * stride_o + cols, y.to(Out.dtype.element_ty), mask=msk)
            if COUNT_LOADS:
                tl.atomic_add(Loads + rows, zero + (stop - start), mask=active, sem="relaxed")


@triton.jit
def _sampling_draw_kernel(
    X, stride_x, V, B,
    Temp, TopK, TopP, MinP, t_val, k_val, p_val, mp_val,
    SMax, SArg, SBad, NS,
    State,  # (B, 4) int64 final selection state (written by the sum pass)
    ChunkSum, NCH,
    Seed,  # int64 [seed, offset] of the Philox stream
    Tokens, Logprobs,  # (B,) int64 token or status; (B,) fp32 log-prob (WRITE_LOGPROBS)
    Loads,
    HAS_T: tl.constexpr, HAS_K: tl.constexpr, HAS_P: tl.constexpr, HAS_MP: tl.constexpr,
    USE_T: tl.constexpr, USE_K: tl.constexpr, USE_P: tl.constexpr, USE_MP: tl.constexpr, ALL_GREEDY: tl.constexpr,
    WRITE_LOGPROBS: tl.constexpr, NS_P2: tl.constexpr, NCH_P2: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr, COUNT_LOADS: tl.constexpr,
):
    """S_F = sum_c ChunkSum[row, c]; t = min(floor(u S_F), S_F - 1), u = 53 Philox bits / 2^53 of
    counter (0, row, offset), key seed; the chunk c* holding t; token = the first index in c* whose
    running F-mass (after the chunks before c*) exceeds t, or the first argmax when T = 0;
    logprob = (z_tok - m) - ln(2^-40 S_F); the status where it is < 0."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    rows = tl.where(rmask, rows, 0)
    T, k, p, mp = _rows(Temp, TopK, TopP, MinP, t_val, k_val, p_val, mp_val, rows, rmask, HAS_T, HAS_K, HAS_P, HAS_MP)
    m, am, status, t_eff, greedy = _row_stats(SMax, SArg, SBad, rows, rmask, NS, T, k, p, mp, NS_P2)
    tok = am
    s_f = tl.zeros([BLOCK_B], tl.int64) + 1
    if not ALL_GREEDY:
        active = rmask & (status == 0) & (greedy == 0)
        ch = tl.arange(0, NCH_P2)[None, :]
        cm = active[:, None] & (ch < NCH)
        sums = tl.load(ChunkSum + rows[:, None] * NCH + ch, mask=cm, other=0)
        s_f = tl.where(active, tl.sum(sums, 1), 1)
        seed = tl.load(Seed)
        off = tl.load(Seed + 1)
        zero = tl.zeros([BLOCK_B], dtype=tl.uint32)
        r0, r1, r2, r3 = _philox(zero, rows.to(tl.uint32), zero + (off & 0xFFFFFFFF).to(tl.uint32),
                                 zero + ((off >> 32) & 0xFFFFFFFF).to(tl.uint32),
                                 (seed & 0xFFFFFFFF).to(tl.uint32), ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32))
        u53 = ((r0 >> 11).to(tl.int64) << 32) | r1.to(tl.int64)
        t = tl.floor(u53.to(tl.float64) * 1.1102230246251565e-16 * s_f.to(tl.float64)).to(tl.int64)
        t = tl.minimum(t, s_f - 1)
        incl = tl.cumsum(sums, 1)
        cstar = tl.min(tl.where((incl > t[:, None]) & cm, ch, INT32_MAX), 1)
        cstar = tl.where(active, cstar, 0)
        base = tl.sum(tl.where(ch < cstar[:, None], sums, 0), 1)
        tau = tl.zeros([BLOCK_B], tl.int64)
        if USE_K:
            tau = tl.where(k < V, tl.load(State + rows * 4 + 0, mask=active, other=0), tau)
        if USE_P:
            tau = tl.where(p < 1.0, tl.load(State + rows * 4 + 2, mask=active, other=0), tau)
        cols = cstar[:, None] * CHUNK + tl.arange(0, BLOCK_C)[None, :]
        msk = active[:, None] & (cols < V) & (cols < (cstar[:, None] + 1) * CHUNK)
        z = _scale(tl.load(X + rows[:, None] * stride_x + cols, mask=msk, other=float("-inf")), t_eff[:, None], USE_T)
        f = msk & (_ukey(z) >= tau[:, None])
        if USE_MP:
            f = f & (tl.exp2((z - m[:, None]) * 1.4426950408889634) >= mp[:, None])
        w = tl.where(f, _mass(z, m[:, None]), 0)
        hit = (tl.cumsum(w, 1) + base[:, None] > t[:, None]) & msk
        drawn = tl.min(tl.where(hit, cols, INT32_MAX), 1).to(tl.int64)
        tok = tl.where(greedy, am, drawn)
        if COUNT_LOADS:
            tl.atomic_add(Loads + rows, tl.sum(msk.to(tl.int64), 1), mask=active, sem="relaxed")
    tl.store(Tokens + rows, tl.where(status < 0, status.to(tl.int64), tok), mask=rmask)
    if WRITE_LOGPROBS:
        safe = tl.where((tok >= 0) & (tok < V) & (status == 0), tok, 0)
        zt = _scale(tl.load(X + rows * stride_x + safe, mask=rmask, other=0.0), t_eff, True)
        lse = tl.log(tl.maximum(s_f, 1).to(tl.float64) * 9.094947017729282e-13).to(tl.float32)
        lp = tl.where(greedy, 0.0, (zt - m) - lse)
        tl.store(Logprobs + rows, tl.where(status < 0, float("nan"), lp), mask=rmask)


def _block_v(V: int, device: torch.device) -> int:
    """Elements a program loads per step: 2048 on the GPU (8 a thread at 8 warps: one 16-byte load
    of 16-bit logits), big steps under the interpreter (its cost is per operation)."""
    if device.type == "cuda" and not interpreter_on():
        return min(triton.next_power_of_2(max(V, 16)), 2048)
    return min(triton.next_power_of_2(max(V, 16)), 65536)


def _block_b(B: int, block_v: int, device: torch.device) -> int:
    """Rows a program: one on the GPU (a 2048-bin histogram a row must fit on chip), many under
    the interpreter for short rows (a program costs per operation, not per element)."""
    if device.type == "cuda" and not interpreter_on():
        return 1
    return max(1, min(triton.next_power_of_2(B), 262144 // block_v, 512))


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _slices(B: int, V: int, block_v: int, device: torch.device, num_slices) -> tuple[int, int]:
    """(slice length, slices a row): one slice when the batch fills the GPU, else up to
    min(ceil(2 SMs / B), ceil(V / 4096), 32); each slice a whole number of BLOCK_V steps."""
    if num_slices is None:
        num_slices = 1
        if device.type == "cuda" and not interpreter_on():
            num_slices = max(1, min(-(-2 * _sm_count(device) // B), -(-V // 4096), 32))
    elif isinstance(num_slices, bool) or not isinstance(num_slices, int) or num_slices < 1:
        raise ValueError(f"fastlm.triton.sampling: num_slices must be an int >= 1 or None, got {num_slices!r}")
    sl = -(-max(1, -(-V // num_slices)) // block_v) * block_v
    return sl, -(-V // sl)


def _params(B: int, V: int, temperature, top_k, top_p, min_p):
    """Kernel arguments for the four parameters: (pointer or None, scalar) each, and the flags."""
    def split(v, default):
        if isinstance(v, torch.Tensor):
            return v, default, True
        return None, (default if v is None else v), False

    T, t_val, has_t = split(temperature, 1.0)
    K, k_val, has_k = split(top_k, V)
    P, p_val, has_p = split(top_p, 1.0)
    MP, mp_val, has_mp = split(min_p, 0.0)
    flags = dict(
        HAS_T=has_t, HAS_K=has_k, HAS_P=has_p, HAS_MP=has_mp,
        USE_T=has_t or t_val not in (0.0, 1.0), USE_K=has_k or k_val < V, USE_P=has_p or p_val < 1.0, USE_MP=has_mp or mp_val > 0.0,
    )
    return (T, K, P, MP), (float(t_val), int(min(k_val, 2**62)), float(p_val), float(mp_val)), flags


def _sequence(flags: dict, vals: tuple, sample: bool):
    """The launches of one call as (MODE, CONSUME, PRODUCE, the histogram consumed before), the
    histograms used, the last one consumed and whether every row is greedy."""
    all_greedy = sample and not flags["HAS_T"] and vals[0] == 0.0
    use_k = flags["USE_K"] and not all_greedy
    use_p = flags["USE_P"] and not all_greedy
    hists = [1, 2, 3] * use_k + [4, 5, 6] * use_p
    seq = [(0, 0, 1 if use_k else 0, 0)]
    done, prev = 0, (1 if use_k else 0)
    for h in hists[1:] if use_k else hists:
        seq.append((1, prev, h, done))
        done, prev = prev, h
    if not sample:
        seq.append((3, prev, 0, done))
    elif not all_greedy:
        seq.append((2, prev, 0, done))
    return seq, hists, prev, all_greedy


def _meta(flags: dict, mode: int, consume: int, produce: int, sample: bool, ns: int, block_b: int, block_v: int,
          count_loads: bool, device) -> dict:
    """The constexprs and warps of one pass launch."""
    warps = 8 if block_v >= 2048 and device.type == "cuda" and not interpreter_on() else 4
    return dict(flags, MODE=mode, CONSUME=consume, PRODUCE=produce, FILTER_ROWS=not sample,
                NS_P2=triton.next_power_of_2(ns), BLOCK_B=block_b, BLOCK_V=block_v, SUB=max(1, block_v // CHUNK_ELEMS),
                COUNT_LOADS=count_loads, num_warps=warps)


def _draw_meta(flags: dict, all_greedy: bool, logprobs: bool, ns: int, block_b: int, V: int, count_loads: bool) -> dict:
    return dict(flags, ALL_GREEDY=all_greedy, WRITE_LOGPROBS=logprobs, NS_P2=triton.next_power_of_2(ns), BLOCK_B=block_b,
                NCH_P2=triton.next_power_of_2(-(-V // CHUNK_ELEMS)), BLOCK_C=min(CHUNK_ELEMS, triton.next_power_of_2(max(V, 16))),
                COUNT_LOADS=count_loads, num_warps=4)


def _run(logits, params, out, status, seed, tokens, logprobs, loads, num_slices, sample: bool) -> None:
    """The pass sequence of one call (``_sequence``): stats, top-k radix (2), top-p radix (3), then
    the chunk sums and the draw, or the filter's write."""
    B, V = logits.shape
    dev = logits.device
    ptrs, vals, flags = params
    block_v = _block_v(V, dev)
    if block_v < min(V, CHUNK_ELEMS) or block_v % min(block_v, CHUNK_ELEMS):
        raise ValueError(f"fastlm.triton.sampling: a step of {block_v} elements must cover the row or whole 2048-element chunks")
    sl, ns = _slices(B, V, block_v, dev, num_slices)
    block_b = _block_b(B, block_v, dev)
    nch = -(-V // CHUNK_ELEMS)
    seq, hists, last, all_greedy = _sequence(flags, vals, sample)
    hist = torch.zeros((max(1, len(hists)), B, 2048), device=dev, dtype=torch.int64)
    state = torch.zeros((7, B, 4), device=dev, dtype=torch.int64)
    smax = torch.empty((B, ns), device=dev, dtype=torch.float32)
    sarg = torch.empty((B, ns), device=dev, dtype=torch.int32)
    sbad = torch.empty((B, ns), device=dev, dtype=torch.int32)
    chunk = torch.empty((B, nch) if sample else (1, 1), device=dev, dtype=torch.int64)
    for mode, consume, produce, before in seq:
        _sampling_pass_kernel[(triton.cdiv(B, block_b), ns)](
            logits, logits.stride(0), V, sl, *ptrs, *vals, smax, sarg, sbad, ns,
            hist[hists.index(consume)] if consume else hist[0], hist[hists.index(produce)] if produce else hist[0], B,
            state[before], state[consume], chunk, nch, out, 0 if out is None else out.stride(0), status, loads,
            **_meta(flags, mode, consume, produce, sample, ns, block_b, block_v, loads is not None, dev),
        )
    if sample:
        _sampling_draw_kernel[(triton.cdiv(B, block_b),)](
            logits, logits.stride(0), V, B, *ptrs, *vals, smax, sarg, sbad, ns, state[last], chunk, nch,
            seed, tokens, logprobs, loads, **_draw_meta(flags, all_greedy, logprobs is not None, ns, block_b, V, loads is not None),
        )


def sample(logits, temperature, top_k, top_p, min_p, seed, tokens, logprobs, *, loads=None, num_slices=None) -> None:
    """Sample one token per row into caller-given outputs. logits (B, V) with unit column stride;
    each parameter a Python number, None (off) or a (B,) tensor; seed int64 [seed, offset] on the
    logits' device; tokens (B,) int64 (the token, or the row status < 0); logprobs (B,) fp32 or None.
    loads: a zeroed (B,) int64 tensor that receives the logits elements each row loaded (a test's
    pass count); num_slices: programs a row (None: enough to cover the GPU)."""
    B, V = logits.shape
    if B == 0:
        return
    _run(logits, _params(B, V, temperature, top_k, top_p, min_p), None, None, seed, tokens, logprobs, loads, num_slices, True)


def top_k_top_p_filter(logits, top_k, top_p, min_p, out, status, *, loads=None, num_slices=None) -> None:
    """Write the masked logits (-inf outside the support; a NaN row where the status < 0) into out
    (B, V) and the row status (0 ok) into status (B,) int64."""
    B, V = logits.shape
    if B == 0:
        return
    _run(logits, _params(B, V, None, top_k, top_p, min_p), out, status, None, None, None, loads, num_slices, False)
