"""Token sampling (temperature, top-k, top-p, min-p) and the top-k/top-p filter in Triton.

One program owns BLOCK_B rows (many for a small vocabulary, one for a large one) and walks each
row in BLOCK_V chunks; nothing is sorted. The thresholds are found exactly, by a search on the
fp32 value: z is mapped to a signed int32 key that is monotone in the value, and each pass counts
(top-k) or sums the integer masses (top-p) of the elements at or above NPIV pivots spread evenly
over the key interval still open, shrinking it (NPIV + 1)-fold; NPASS passes close any 32-bit
interval, and a pass is skipped once every row's interval is closed. Masses are int64 fixed
point (e * 2**40), so every sum and prefix sum is exact and every backend takes the same
decisions. The token is drawn by inverse CDF over those integer masses with one 53-bit uniform per
row from Philox4x32-10. The trade-off: 3 + 2 * NPASS passes over the logits in the worst case
(top-k and top-p on), in exchange for no sort, no scratch memory, no host sync and bit-exact
agreement with the reference.
The definition being computed is in fastlm/reference/sampling.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastlm.backend import interpreter_on

INT32_MAX: tl.constexpr = tl.constexpr(2147483647)


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
def _key(z):
    """Signed int32 key monotone in the fp32 value z (z has no NaN and no -0.0)."""
    b = z.to(tl.int32, bitcast=True)
    return b ^ ((b >> 31) & 0x7FFFFFFF)


@triton.jit
def _load_z(X, xoff, cols, msk, t_eff, USE_T: tl.constexpr):
    """The chunk's scaled logits z = fp32(x) / T, IEEE-rounded like the reference and csrc (a plain
    `/` compiles to approximate division), -inf where masked, -0.0 made +0.0."""
    x = tl.load(X + xoff[:, None] + cols[None, :], mask=msk, other=float("-inf"))
    return _scale(x, t_eff, USE_T)


@triton.jit
def _scale(x, t_eff, USE_T: tl.constexpr):
    z = x.to(tl.float32)
    if USE_T:
        z = tl.math.div_rn(z, t_eff[:, None])
    return tl.where(z == 0.0, 0.0, z)


@triton.jit
def _div_small(x, d: tl.constexpr):
    """x // d for int64 0 <= x < 2^50 and a small constant d, as floor(x / d + 1 / (2d)) in fp64:
    exact (x / d is at least 1/d from the next integer), and no int64 division, which compiles to a
    subroutine call."""
    inv = tl.full([], 1.0 / d, tl.float64)  # a Python float alone would enter as fp32
    half = tl.full([], 0.5 / d, tl.float64)
    return tl.floor(x.to(tl.float64) * inv + half).to(tl.int64)


@triton.jit
def _search(X, xoff, rmask, t_eff, m, lo, hi, target, V, WEIGHTED: tl.constexpr, USE_T: tl.constexpr,
            BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr, NPIV: tl.constexpr, NPASS: tl.constexpr):
    """The largest key t in [lo, hi) with W(t) >= target, W(t) = count (or, WEIGHTED, the int64
    mass) of the row's elements with key >= t; needs W(lo) >= target > W(hi). Returns lo."""
    jj = (tl.arange(0, NPIV) + 1).to(tl.int64)
    for _ in range(NPASS):
        if tl.max(hi - lo, axis=0) > 1:
            piv = lo[:, None] + _div_small(((hi - lo)[:, None] * jj[None, :]), NPIV + 1)
            piv32 = piv.to(tl.int32)
            acc = tl.zeros([BLOCK_B, NPIV], dtype=tl.int64)
            for c in range(0, V, BLOCK_V):
                cols = c + tl.arange(0, BLOCK_V)
                msk = rmask[:, None] & (cols[None, :] < V)
                z = _load_z(X, xoff, cols, msk, t_eff, USE_T)
                ge = (_key(z)[:, None, :] >= piv32[:, :, None]) & msk[:, None, :]
                if WEIGHTED:
                    e = tl.exp2((z - m[:, None]) * 1.4426950408889634)
                    mass = (e * 1099511627776.0).to(tl.int64)
                    acc += tl.sum(tl.where(ge, mass[:, None, :], 0), axis=2)
                else:
                    acc += tl.sum(ge.to(tl.int64), axis=2)
            ok = acc >= target[:, None]
            lo = tl.maximum(lo, tl.max(tl.where(ok, piv, lo[:, None]), axis=1))
            hi = tl.minimum(hi, tl.min(tl.where(ok, hi[:, None], piv), axis=1))
    return lo


@triton.jit
def _sampling_kernel(
    X, stride_x, B, V,  # logits (B, V): row stride, unit column stride
    Temp, TopK, TopP, MinP,  # (B,) per-row parameters, read when HAS_T/HAS_K/HAS_P/HAS_MP
    t_val, k_val, p_val, mp_val,  # the scalar parameters otherwise
    Seed,  # int64 [seed, offset] of the Philox stream (SAMPLE)
    Tokens,  # (B,) int64: the token, or the row status (< 0); FILTER: the status (0 ok)
    Logprobs,  # (B,) fp32 log-prob of the token under the filtered distribution (WRITE_LOGPROBS)
    Out, stride_o,  # (B, V) filtered logits, x's dtype (FILTER)
    HAS_T: tl.constexpr, HAS_K: tl.constexpr, HAS_P: tl.constexpr, HAS_MP: tl.constexpr,
    USE_T: tl.constexpr, USE_K: tl.constexpr, USE_P: tl.constexpr, USE_MP: tl.constexpr, ALL_GREEDY: tl.constexpr,
    SAMPLE: tl.constexpr, WRITE_LOGPROBS: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr, NPIV: tl.constexpr, NPASS: tl.constexpr,
):
    """z = fp32(x) / T, m = max z, e = exp2((z - m) log2 e), mass = trunc(e 2^40);
    tau_k = k-th largest key; tau_p = largest key t >= tau_k with sum_{key >= t} mass >= ceil(p S_k);
    F = {key >= tau_p, e >= min_p}, S_F = sum_F mass; token = the first index where the running
    sum over F of mass exceeds floor(u S_F), u = 53 Philox bits / 2^53, or argmax x when T = 0;
    logprob = (z_tok - m) - ln(2^-40 S_F)."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    xoff = tl.where(rmask, rows, 0).to(tl.int64) * stride_x
    if HAS_T:
        T = tl.load(Temp + rows, mask=rmask, other=1.0).to(tl.float32)
    else:
        T = tl.zeros([BLOCK_B], dtype=tl.float32) + t_val
    if HAS_K:
        k = tl.load(TopK + rows, mask=rmask, other=1).to(tl.int64)
    else:
        k = tl.zeros([BLOCK_B], dtype=tl.int64) + k_val
    if HAS_P:
        p = tl.load(TopP + rows, mask=rmask, other=1.0).to(tl.float32)
    else:
        p = tl.zeros([BLOCK_B], dtype=tl.float32) + p_val
    if HAS_MP:
        mp = tl.load(MinP + rows, mask=rmask, other=0.0).to(tl.float32)
    else:
        mp = tl.zeros([BLOCK_B], dtype=tl.float32) + mp_val
    greedy = T == 0.0
    t_ok = (T >= 0.0) & (T <= 3.4028234663852886e38)
    t_eff = tl.where(greedy | (t_ok == 0), 1.0, T)

    # pass A: max (first index), smallest key, NaN/+inf
    m = tl.full([BLOCK_B], float("-inf"), tl.float32)
    am = tl.zeros([BLOCK_B], dtype=tl.int64)
    kmin = tl.full([BLOCK_B], INT32_MAX, tl.int32)
    bad = tl.zeros([BLOCK_B], dtype=tl.int32)
    for c in range(0, V, BLOCK_V):
        cols = c + tl.arange(0, BLOCK_V)
        msk = rmask[:, None] & (cols[None, :] < V)
        z = _load_z(X, xoff, cols, msk, t_eff, USE_T)
        nonfinite = ((z != z) | (z == float("inf"))) & msk
        bad = tl.maximum(bad, tl.max(nonfinite.to(tl.int32), axis=1))
        z = tl.where(z != z, float("-inf"), z)
        cm, ci = tl.max(z, axis=1, return_indices=True, return_indices_tie_break_left=True)
        upd = cm > m
        am = tl.where(upd, ci.to(tl.int64) + c, am)
        m = tl.where(upd, cm, m)
        kmin = tl.minimum(kmin, tl.min(tl.where(msk, _key(z), INT32_MAX), axis=1))

    status = tl.zeros([BLOCK_B], dtype=tl.int64)
    status = tl.where((mp >= 0.0) & (mp <= 1.0), status, -6)
    status = tl.where((p > 0.0) & (p <= 1.0), status, -5)
    status = tl.where(k >= 1, status, -4)
    status = tl.where(t_ok, status, -3)
    status = tl.where(m == float("-inf"), -2, status)
    status = tl.where(bad > 0, -1, status)
    active = (status == 0) & (greedy == 0)
    m = tl.where(status == 0, m, 0.0)
    kmax = _key(m)

    tau = kmin
    if not ALL_GREEDY:
        if USE_K:
            lo = kmin.to(tl.int64)
            hi = tl.where(active & (k < V), kmax.to(tl.int64) + 1, lo + 1)
            tau = _search(X, xoff, rmask, t_eff, m, lo, hi, k, V, False, USE_T, BLOCK_B, BLOCK_V, NPIV, NPASS).to(tl.int32)
        if USE_P:
            s_k = tl.zeros([BLOCK_B], dtype=tl.int64)
            for c in range(0, V, BLOCK_V):
                cols = c + tl.arange(0, BLOCK_V)
                msk = rmask[:, None] & (cols[None, :] < V)
                z = _load_z(X, xoff, cols, msk, t_eff, USE_T)
                mass = (tl.exp2((z - m[:, None]) * 1.4426950408889634) * 1099511627776.0).to(tl.int64)
                s_k += tl.sum(tl.where(msk & (_key(z) >= tau[:, None]), mass, 0), axis=1)
            target = tl.ceil(p.to(tl.float64) * s_k.to(tl.float64)).to(tl.int64)
            lo = tau.to(tl.int64)
            hi = tl.where(active & (p < 1.0), kmax.to(tl.int64) + 1, lo + 1)
            tau = _search(X, xoff, rmask, t_eff, m, lo, hi, target, V, True, USE_T, BLOCK_B, BLOCK_V, NPIV, NPASS).to(tl.int32)

    if SAMPLE:
        bi = tl.zeros([BLOCK_B], dtype=tl.int64)
        s_f = tl.zeros([BLOCK_B], dtype=tl.int64)
        if not ALL_GREEDY:
            for c in range(0, V, BLOCK_V):
                cols = c + tl.arange(0, BLOCK_V)
                msk = rmask[:, None] & (cols[None, :] < V)
                z = _load_z(X, xoff, cols, msk, t_eff, USE_T)
                e = tl.exp2((z - m[:, None]) * 1.4426950408889634)
                F = msk & (_key(z) >= tau[:, None]) & active[:, None]
                if USE_MP:
                    F = F & (e >= mp[:, None])
                s_f += tl.sum(tl.where(F, (e * 1099511627776.0).to(tl.int64), 0), axis=1)
            seed = tl.load(Seed)
            off = tl.load(Seed + 1)
            zero = tl.zeros([BLOCK_B], dtype=tl.uint32)
            r0, r1, r2, r3 = _philox(zero, rows.to(tl.uint32), zero + (off & 0xFFFFFFFF).to(tl.uint32),
                                     zero + ((off >> 32) & 0xFFFFFFFF).to(tl.uint32),
                                     (seed & 0xFFFFFFFF).to(tl.uint32), ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32))
            u53 = ((r0 >> 11).to(tl.int64) << 32) | r1.to(tl.int64)
            target = tl.floor(u53.to(tl.float64) * 1.1102230246251565e-16 * s_f.to(tl.float64)).to(tl.int64)
            target = tl.minimum(target, s_f - 1)
            run = tl.zeros([BLOCK_B], dtype=tl.int64)
            bi = tl.full([BLOCK_B], -1, tl.int64)
            for c in range(0, V, BLOCK_V):
                cols = c + tl.arange(0, BLOCK_V)
                msk = rmask[:, None] & (cols[None, :] < V)
                z = _load_z(X, xoff, cols, msk, t_eff, USE_T)
                e = tl.exp2((z - m[:, None]) * 1.4426950408889634)
                F = msk & (_key(z) >= tau[:, None]) & active[:, None]
                if USE_MP:
                    F = F & (e >= mp[:, None])
                mass = tl.where(F, (e * 1099511627776.0).to(tl.int64), 0)
                hit = (tl.cumsum(mass, axis=1) + run[:, None] > target[:, None]) & msk
                first = tl.min(tl.where(hit, cols, INT32_MAX), axis=1).to(tl.int64)
                bi = tl.where((bi < 0) & (first < INT32_MAX), first, bi)
                run += tl.sum(mass, axis=1)
            bi = tl.maximum(bi, 0)
        tok = tl.where(greedy, am, bi)
        tl.store(Tokens + rows, tl.where(status < 0, status, tok), mask=rmask)
        if WRITE_LOGPROBS:
            zt = tl.math.div_rn(tl.load(X + xoff + tok, mask=rmask, other=0.0).to(tl.float32), t_eff)
            zt = tl.where(zt == 0.0, 0.0, zt)
            lse = tl.log(tl.maximum(s_f, 1).to(tl.float64) * 9.094947017729282e-13).to(tl.float32)
            lp = tl.where(greedy, 0.0, (zt - m) - lse)
            tl.store(Logprobs + rows, tl.where(status < 0, float("nan"), lp), mask=rmask)
    else:
        tl.store(Tokens + rows, status, mask=rmask)
        ooff = rows.to(tl.int64) * stride_o
        for c in range(0, V, BLOCK_V):
            cols = c + tl.arange(0, BLOCK_V)
            msk = rmask[:, None] & (cols[None, :] < V)
            x = tl.load(X + xoff[:, None] + cols[None, :], mask=msk, other=float("-inf"))
            z = _scale(x, t_eff, USE_T)
            F = _key(z) >= tau[:, None]
            if USE_MP:
                F = F & (tl.exp2((z - m[:, None]) * 1.4426950408889634) >= mp[:, None])
            y = tl.where(F, x, float("-inf"))
            y = tl.where((status < 0)[:, None], float("nan"), y)
            tl.store(Out + ooff[:, None] + cols[None, :], y.to(Out.dtype.element_ty), mask=msk)


def _npass(npiv: int) -> int:
    """Passes that close any 32-bit key interval: the least n with (npiv + 1)**n >= 2**32."""
    n, w = 0, 1
    while w < 2**32:
        w *= npiv + 1
        n += 1
    return n


def _config(B: int, V: int, device: torch.device, sample: bool = True) -> dict:
    """Block sizes: on the GPU 2048 elements a chunk, at least 8 per thread (16-byte loads of 16-bit
    logits; 16 per thread for the filter, whose extra store pass spills at 8 warps on sm_80) and 4
    pivots a pass; under the interpreter big blocks (its cost is per operation, not per element)."""
    if device.type == "cuda" and not interpreter_on():
        block_v = min(triton.next_power_of_2(max(V, 4)), 2048)
        block_b = max(1, min(triton.next_power_of_2(B), 2048 // block_v))
        npiv, warps = 4, max(1, min(8 if sample else 4, block_b * block_v // 256))
    else:
        block_v = min(triton.next_power_of_2(max(V, 4)), 65536)
        block_b = max(1, min(triton.next_power_of_2(B), 262144 // block_v))
        npiv, warps = 4, 1
    return dict(BLOCK_B=block_b, BLOCK_V=block_v, NPIV=npiv, NPASS=_npass(npiv), num_warps=warps)


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
        ALL_GREEDY=(not has_t) and t_val == 0.0,
    )
    return (T, K, P, MP), (float(t_val), int(min(k_val, 2**62)), float(p_val), float(mp_val)), flags


def sample(logits, temperature, top_k, top_p, min_p, seed, tokens, logprobs) -> None:
    """Sample one token per row into caller-given outputs. logits (B, V) with unit column stride;
    each parameter a Python number, None (off) or a (B,) tensor; seed int64 [seed, offset] on the
    logits' device; tokens (B,) int64 (the token, or the row status < 0); logprobs (B,) fp32 or None."""
    B, V = logits.shape
    if B == 0:
        return
    ptrs, vals, flags = _params(B, V, temperature, top_k, top_p, min_p)
    cfg = _config(B, V, logits.device)
    _sampling_kernel[(triton.cdiv(B, cfg["BLOCK_B"]),)](
        logits, logits.stride(0), B, V, *ptrs, *vals, seed, tokens, logprobs, None, 0,
        **flags, SAMPLE=True, WRITE_LOGPROBS=logprobs is not None, **cfg,
    )


def top_k_top_p_filter(logits, top_k, top_p, min_p, out, status) -> None:
    """Write the masked logits (-inf outside the support; a NaN row where the status < 0) into out
    (B, V) and the row status (0 ok) into status (B,) int64."""
    B, V = logits.shape
    if B == 0:
        return
    ptrs, vals, flags = _params(B, V, None, top_k, top_p, min_p)
    cfg = _config(B, V, logits.device, sample=False)
    _sampling_kernel[(triton.cdiv(B, cfg["BLOCK_B"]),)](
        logits, logits.stride(0), B, V, *ptrs, *vals, None, status, None, out, out.stride(0),
        **flags, SAMPLE=False, WRITE_LOGPROBS=False, **cfg,
    )
