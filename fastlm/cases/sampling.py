"""Cases for sample and top_k_top_p_filter.

The tolerance rule does not fit integer tokens or a support mask, so those are compared exactly
with the sort-based reference run on the same seed (on the CPU, where both use the same fp32
exp2, bit for bit; on a GPU, whose exp2 may differ from torch's in the last bit, a token or mask
entry may differ only at a threshold, checked against a support loosened by 1e-5 in p and min_p).
The log-probs follow the rule: truth is the float64 log-softmax over the same support.
"""

from __future__ import annotations

import math
import zlib

import torch

from fastlm import ops
from fastlm.cases import Case
from fastlm.reference import sampling as ref
from fastlm.testing import assert_close

PARAMS = {
    "plain": dict(),
    "topk": dict(temperature=0.7, top_k=5),
    "topp": dict(top_p=0.9),
    "minp": dict(min_p=0.05),
    "all": dict(temperature=1.3, top_k=50, top_p=0.8, min_p=0.02),
    "greedy": dict(temperature=0.0, top_k=3),
    "rows": "per-row",
}


def cases(device: str, full: bool = False) -> list[Case]:
    dtypes = ("float32", "float16", "bfloat16") if device == "cuda" else ("float32", "float16")
    grid = [((1, 7), "normal1"), ((5, 7), "ties"), ((3, 97), "normal5"), ((4, 1000), "halfinf"),
            ((2, 1025), "normal1"), ((6, 1000), "ties")]
    big = [((3, 50257), "normal1")]
    if device == "cuda":
        big += [((8, 128256), "normal5"), ((64, 32000), "normal1"), ((2, 262144), "halfinf")]
        if full:
            big += [((1024, 50257), "normal1")]
    out = []
    for op in ("sample", "top_k_top_p_filter"):
        for (shape, dist) in grid:
            for name in PARAMS:
                if op == "top_k_top_p_filter" and name == "greedy":
                    continue
                for dtype in (dtypes if name == "all" else dtypes[:1]):
                    out.append(Case(op, dict(shape=shape, dist=dist, params=name, dtype=dtype), device))
        for (shape, dist) in big:
            for name in ("all", "rows"):
                out.append(Case(op, dict(shape=shape, dist=dist, params=name, dtype="float32"), device))
        out.append(Case(op, dict(shape=(5, 300), dist="normal1", params="all", dtype="float32", strided=True), device))
    return out


def logits(shape, dist: str, dtype, device, generator: torch.Generator) -> torch.Tensor:
    """Test logits: N(0,1) ("normal1"), N(0,5) ("normal5"), N(0,1) with half the vocabulary at
    -inf ("halfinf"), or integers with many ties ("ties")."""
    B, V = shape
    x = torch.randn(B, V, generator=generator)
    if dist == "normal5":
        x = x * 5
    elif dist == "halfinf":
        idx = torch.rand(B, V, generator=generator).argsort(dim=1)[:, : V // 2]
        x = x.scatter(1, idx, -math.inf)
    elif dist == "ties":
        x = torch.round(x * 2)
    return x.to(dtype=dtype).to(device)


def row_params(name: str, B: int, V: int, device, generator: torch.Generator) -> dict:
    if PARAMS[name] != "per-row":
        return dict(PARAMS[name])
    T = torch.rand(B, generator=generator) * 1.5
    T[::4] = 0.0
    k = torch.randint(1, V + 5, (B,), generator=generator)
    p = torch.rand(B, generator=generator) * 0.9 + 0.1
    p[1::3] = 1.0
    mp = torch.rand(B, generator=generator) * 0.2
    mp[2::3] = 0.0
    return dict(temperature=T.to(device), top_k=k.to(device), top_p=p.to(device), min_p=mp.to(device))


def _loose_keep(x: torch.Tensor, kw: dict, temperature) -> torch.Tensor:
    """The reference support with top_p and min_p loosened by 1e-5 (for GPU comparisons)."""
    lk = dict(kw)
    if lk.get("top_p") is not None:
        lk["top_p"] = torch.clamp(torch.as_tensor(lk["top_p"], dtype=torch.float32, device=x.device) * (1 + 1e-5), max=1.0).expand(x.shape[0])
    if lk.get("min_p") is not None:
        lk["min_p"] = (torch.as_tensor(lk["min_p"], dtype=torch.float32, device=x.device) * (1 - 1e-5)).expand(x.shape[0])
    z, _, k, p, mp, _, _ = ref.prepare(x, temperature, lk.get("top_k"), lk.get("top_p"), lk.get("min_p"))
    return ref.support(z, k, p, mp)[0]


def _exact(device) -> bool:
    return torch.device(device).type == "cpu"


def check(case: Case, backend: str) -> dict[str, float]:
    P = case.params
    g = torch.Generator().manual_seed(zlib.crc32(case.id.encode()))
    B, V = P["shape"]
    dtype = getattr(torch, P["dtype"])
    if P.get("strided"):
        x = logits((B, 2 * V), P["dist"], dtype, case.device, g)[:, ::2]
    else:
        x = logits((B, V), P["dist"], dtype, case.device, g)
    kw = row_params(P["params"], B, V, case.device, g)
    x0 = x.clone()
    if case.op == "top_k_top_p_filter":
        kw.pop("temperature", None)
        got = ops.top_k_top_p_filter(x, **kw, backend=backend)
        want, _ = ref.top_k_top_p_filter(x, kw.get("top_k"), kw.get("top_p"), kw.get("min_p"))
        if not torch.equal(x, x0):
            raise AssertionError("top_k_top_p_filter: the input was modified in place")
        if got.dtype != x.dtype or got.shape != x.shape:
            raise AssertionError(f"top_k_top_p_filter: got {got.dtype} {tuple(got.shape)}, want {x.dtype} {tuple(x.shape)}")
        diff = (got != want) & ~(torch.isnan(got) & torch.isnan(want))
        if _exact(case.device):
            if diff.any():
                raise AssertionError(f"top_k_top_p_filter: {int(diff.sum())} entries differ from the reference")
        else:
            loose = _loose_keep(x, kw, 1.0)
            kept_ok = torch.where(torch.isfinite(got), loose | torch.isneginf(x), torch.ones_like(loose))
            if not kept_ok.all() or (torch.isfinite(want) & ~torch.isfinite(got)).sum() > max(1, V // 1000):
                raise AssertionError(f"top_k_top_p_filter: {int(diff.sum())} entries differ beyond the threshold")
        return {"out": float(diff.float().mean())}
    seed = torch.tensor([zlib.crc32(case.id.encode()) * 7919, 12345], dtype=torch.int64, device=case.device)
    tok, lp = ops.sample(x, **kw, seed=seed, return_logprobs=True, backend=backend)
    if not torch.equal(x, x0):
        raise AssertionError("sample: the input was modified in place")
    T = kw.get("temperature", 1.0)
    rt, rl = ref.sample(x, T, kw.get("top_k"), kw.get("top_p"), kw.get("min_p"), seed=seed)
    if tok.dtype != torch.int64 or tok.shape != (B,) or lp.dtype != torch.float32 or lp.shape != (B,):
        raise AssertionError(f"sample: got tokens {tok.dtype} {tuple(tok.shape)}, logprobs {lp.dtype} {tuple(lp.shape)}")
    z, Tt, k, p, mp, _, greedy = ref.prepare(x, T, kw.get("top_k"), kw.get("top_p"), kw.get("min_p"))
    keep = ref.support(z, k, p, mp)[0]
    keep = torch.where(greedy[:, None], torch.nn.functional.one_hot(rt, V).bool(), keep)
    mismatch = tok != rt
    if _exact(case.device):
        if mismatch.any():
            raise AssertionError(f"sample: tokens {tok[mismatch].tolist()} != reference {rt[mismatch].tolist()} (same seed)")
    else:
        loose = _loose_keep(x, kw, T) | keep
        if not loose.gather(1, tok[:, None]).all() or int(mismatch.sum()) > max(1, B // 50):
            raise AssertionError(f"sample: {int(mismatch.sum())} of {B} tokens differ from the reference beyond the threshold")
    same = ~mismatch
    truth = ref.filtered_log_softmax64(x, keep, Tt).gather(1, rt[:, None])[:, 0]
    truth = torch.where(greedy, torch.zeros_like(truth), truth)
    ratio = assert_close(lp[same], truth[same], rl[same], name="sample logprobs", atol=1e-5)
    return {"tokens": float(mismatch.float().mean()), "logprobs": ratio}
