"""Token sampling in plain PyTorch (sort-based): the oracle for the kernels and the CPU fallback.

Every backend computes exactly this definition (docs: README "Sampling"). Per row b of logits x
(B, V), with parameters T, k, p, min_p:

1. ``z = fp32(x) / T`` (``T = 0``: greedy, the first index of ``max x``; log-prob 0).
   ``m = max z``; ``e = exp2((z - m) * LOG2E)`` in fp32 (so the top token has e = 1);
   ``mass = trunc(e * 2**40)`` as int64: exact integer masses, summed in any order with the
   same result on every backend. The price: a token with e < 2**-40 has probability 0, and the
   draw is at most V * 2**-40 (2.4e-7 at V = 262144) away from softmax in total variation.
2. top-k: keep ``z >= `` the k-th largest z (ties at the threshold all kept, as Hugging Face's
   ``scores < kth`` filter); k >= V keeps all.
3. top-p (p < 1): over the top-k survivors K with S = sum_K mass, keep token i iff the mass of
   the K-tokens with z strictly greater than z_i is < p * S (compared as
   ``M_gt < ceil(fp64(p) * fp64(S))``); the smallest set of top tokens holding mass >= p, with
   every token tied at the threshold kept. p = 1 keeps all.
4. min-p: keep ``e >= min_p`` (``prob >= min_p * max prob``, as Hugging Face).
5. Sample from the survivors F with probability ``mass / S_F``, ``S_F = sum_F mass``, by inverse
   CDF in index order: the first i in F whose running sum of mass exceeds
   ``min(floor(u53 * 2**-53 * fp64(S_F)), S_F - 1)``; u53 = ``(r0 >> 11) << 32 | r1`` from words
   r0, r1 of Philox4x32-10(counter = (0, b, offset_lo, offset_hi), key = (seed_lo, seed_hi)).
   Integer prefix sums: the same token on every backend whenever the masses agree.
   The log-prob is ``(z_tok - m) - fp32(ln(fp64(S_F) * 2**-40))``.

Row status (written as the token with ``check=False``): 0 ok, -1 a NaN or +inf (after temperature
scaling), -2 every logit -inf, -3 temperature not finite or < 0, -4 top_k < 1, -5 top_p outside
(0, 1], -6 min_p outside [0, 1]. The first failing check gives the code.
"""

from __future__ import annotations

import math

import torch

LOG2E = 1.4426950408889634
MASS_BITS = 40
OK, BAD_LOGITS, ALL_NEG_INF, BAD_TEMPERATURE, BAD_TOP_K, BAD_TOP_P, BAD_MIN_P = 0, -1, -2, -3, -4, -5, -6
STATUS_MESSAGES = {
    BAD_LOGITS: "contains NaN or +inf (after temperature scaling)",
    ALL_NEG_INF: "is all -inf",
    BAD_TEMPERATURE: "has a temperature that is not a finite number >= 0",
    BAD_TOP_K: "has top_k < 1",
    BAD_TOP_P: "has top_p outside (0, 1]",
    BAD_MIN_P: "has min_p outside [0, 1]",
}

_M32 = 0xFFFFFFFF
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of a * b for a 32-bit constant a and int64 tensor b in [0, 2**32)."""
    t = a * (b & 0xFFFF)
    u = a * (b >> 16)
    low = t + ((u & 0xFFFF) << 16)
    return ((u >> 16) + (low >> 32)) & _M32, low & _M32


def philox4x32(c0, c1, c2, c3, k0, k1, rounds: int = 10):
    """Philox4x32-10 (Salmon et al. 2011) on int64 tensors holding uint32 values; returns 4 words."""
    for _ in range(rounds):
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + PHILOX_W0) & _M32
        k1 = (k1 + PHILOX_W1) & _M32
    return c0, c1, c2, c3


def uniform53(seed: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """u53 (len(rows),) int64 in [0, 2**53): (r0 >> 11) << 32 | r1 of Philox((0, row, offset), seed)."""
    seed = seed.to(torch.int64)
    s, off = seed[0], seed[1]
    r = rows.to(torch.int64)
    zero = torch.zeros_like(r)
    r0, r1, _, _ = philox4x32(zero, r, (off & _M32) + zero, ((off >> 32) & _M32) + zero, s & _M32, (s >> 32) & _M32)
    return ((r0 >> 11) << 32) | r1


def float_key(z: torch.Tensor) -> torch.Tensor:
    """Signed int32 key, monotone in the fp32 value (zeros must be +0.0)."""
    b = z.view(torch.int32)
    return b ^ ((b >> 31) & 0x7FFFFFFF)


def _row_param(v, B: int, device, dtype) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v.to(device=device, dtype=dtype).reshape(B)
    return torch.full((B,), v, device=device, dtype=dtype)


def prepare(x: torch.Tensor, temperature, top_k, top_p, min_p):
    """Per-row parameter tensors and the scaled logits z (B, V) fp32, the status (B,) int64 and greedy mask."""
    B, V = x.shape
    dev = x.device
    T = _row_param(1.0 if temperature is None else temperature, B, dev, torch.float32)
    k = _row_param(V if top_k is None else top_k, B, dev, torch.int64)
    p = _row_param(1.0 if top_p is None else top_p, B, dev, torch.float32)
    mp = _row_param(0.0 if min_p is None else min_p, B, dev, torch.float32)
    greedy = T == 0
    t_ok = torch.isfinite(T) & (T >= 0)
    t_eff = torch.where(greedy | ~t_ok, torch.ones_like(T), T)
    z = x.to(torch.float32) / t_eff[:, None]
    z = torch.where(z == 0, torch.zeros_like(z), z)
    status = torch.zeros(B, dtype=torch.int64, device=dev)
    checks = [
        (BAD_MIN_P, ~((mp >= 0) & (mp <= 1))),
        (BAD_TOP_P, ~((p > 0) & (p <= 1))),
        (BAD_TOP_K, k < 1),
        (BAD_TEMPERATURE, ~t_ok),
        (ALL_NEG_INF, (z == -math.inf).all(dim=1) if V else torch.ones(B, dtype=torch.bool, device=dev)),
        (BAD_LOGITS, (torch.isnan(z) | (z == math.inf)).any(dim=1)),
    ]
    for code, bad in checks:
        status = torch.where(bad, torch.full_like(status, code), status)
    return z, T, k, p, mp, status, greedy


def support(z: torch.Tensor, k: torch.Tensor, p: torch.Tensor, mp: torch.Tensor):
    """(keep (B, V) bool, e (B, V) fp32, mass (B, V) int64) for valid rows of z, by sorting."""
    B, V = z.shape
    zs = torch.where(torch.isnan(z), torch.full_like(z, -math.inf), z)
    m = zs.max(dim=1, keepdim=True).values
    m = torch.where(m == -math.inf, torch.zeros_like(m), m)
    e = torch.exp2((zs - m) * torch.tensor(LOG2E, dtype=torch.float32))
    mass = (e * float(2**MASS_BITS)).to(torch.int64)
    sv, si = torch.sort(zs, dim=1, descending=True, stable=True)
    kk = k.clamp(1, V) - 1
    kth = sv.gather(1, kk[:, None])
    keep_k = zs >= kth
    # top-p over the top-k survivors; ties share the mass of the tokens strictly above them
    ms = torch.where(keep_k, mass, torch.zeros_like(mass)).gather(1, si)
    excl = ms.cumsum(dim=1) - ms
    idx = torch.arange(V, device=z.device).expand(B, V)
    start = torch.ones_like(sv, dtype=torch.bool)
    start[:, 1:] = sv[:, 1:] != sv[:, :-1]
    first = torch.where(start, idx, torch.zeros_like(idx)).cummax(dim=1).values
    m_gt = excl.gather(1, first)
    s_k = ms.sum(dim=1, keepdim=True)
    target = torch.ceil(p.double()[:, None] * s_k.double()).to(torch.int64)
    keep_sorted = m_gt < target
    keep_p = torch.empty_like(keep_sorted).scatter_(1, si, keep_sorted) | (p[:, None] >= 1)
    keep_m = e >= mp[:, None]
    return keep_k & keep_p & keep_m, e, mass


def top_k_top_p_filter(x: torch.Tensor, top_k=None, top_p=None, min_p=None):
    """(masked logits in x's dtype, status (B,) int64): -inf outside the support; NaN rows where status < 0."""
    z, _, k, p, mp, status, _ = prepare(x, 1.0, top_k, top_p, min_p)
    keep, _, _ = support(z, k, p, mp)
    out = torch.where(keep, x, torch.full_like(x, -math.inf))
    out = torch.where((status < 0)[:, None], torch.full_like(x, math.nan), out)
    return out, status


def sample(x: torch.Tensor, temperature=1.0, top_k=None, top_p=None, min_p=None, seed=None):
    """(tokens (B,) int64, logprobs (B,) fp32); seed: int64 tensor [seed, offset]. Negative tokens: row status."""
    B, V = x.shape
    z, T, k, p, mp, status, greedy = prepare(x, temperature, top_k, top_p, min_p)
    keep, e, mass = support(z, k, p, mp)
    rows = torch.arange(B, device=x.device)
    mf = torch.where(keep, mass, torch.zeros_like(mass))
    s_f = mf.sum(dim=1)
    u = uniform53(seed.to(x.device), rows).double() * 2.0**-53
    target = torch.minimum(torch.floor(u * s_f.double()).to(torch.int64), s_f - 1)
    tok = (mf.cumsum(dim=1) > target[:, None]).to(torch.int8).argmax(dim=1)
    zg = torch.where(torch.isnan(z), torch.full_like(z, -math.inf), z)
    tok = torch.where(greedy, zg.argmax(dim=1), tok)
    m = zg.max(dim=1).values
    zt = z.gather(1, tok[:, None])[:, 0]
    lse = torch.log(s_f.double() * 2.0**-MASS_BITS).to(torch.float32)
    lp = (zt - m) - lse
    lp = torch.where(greedy, torch.zeros_like(lp), lp)
    bad = status < 0
    return torch.where(bad, status, tok), torch.where(bad, torch.full_like(lp, math.nan), lp)


def filtered_log_softmax64(x: torch.Tensor, keep: torch.Tensor, temperature) -> torch.Tensor:
    """Truth for the log-probs: log-softmax in float64 over a given support (rows of x scaled by T)."""
    B, _ = x.shape
    T = _row_param(temperature, B, x.device, torch.float64)
    z = x.double() / torch.where(T == 0, torch.ones_like(T), T)[:, None]
    return torch.log_softmax(torch.where(keep, z, torch.full_like(z, -math.inf)), dim=1)
