"""Benchmark entry sampling: temperature 0.8, top-k 50 and top-p 0.9, one token per row.

Bytes (performance.md): the logits read once (B * V * itemsize). Against torch's sort-based path as
Hugging Face runs it (TopK then TopP logits warpers, softmax, multinomial), eager and under
torch.compile, and FlashInfer's top_k_top_p_sampling_from_logits when it is installed. Tokens are
random, so the tolerance rule cannot compare them: every implementation is run once in prepare
(untimed) and its tokens are checked there (fastlm's: in the exact support of the sort-based
reference, and equal to the reference's tokens on CPU; the peers': valid ids), then the timed
closure returns nothing. fastlm runs with check=False and a fixed device seed: no host sync.
"""

from __future__ import annotations

import math

import torch

from fastlm import ops
from fastlm.bench.registry import Case, Entry, fastlm_impls, register
from fastlm.reference import sampling as ref

TEMPERATURE, TOP_K, TOP_P = 0.8, 50, 0.9
SIZES = {
    "default": [(b, v) for v in (32000, 50257, 128256) for b in (1, 32, 128, 256)],
    "large": [(b, v) for v in (32000, 50257, 128256, 262144) for b in (1, 32, 128, 256, 1024)],
    "quick": [(2, 1000), (3, 4099)],
}


def _cases(dtype, mode, sizes, device, quick):
    dt = getattr(torch, dtype)
    shapes = sizes if isinstance(sizes, list) else SIZES["quick" if quick else (sizes or "default")]
    out = []
    for shape in shapes:
        B, V = shape if isinstance(shape, (tuple, list)) else (shape, 128256)

        def make(B=B, V=V):
            g = torch.Generator(device=device).manual_seed(B * 7 + V)
            x = torch.randn(B, V, device=device, dtype=torch.float32, generator=g) * 3
            return dict(x=x.to(dt), seed=torch.tensor([1234, 0], dtype=torch.int64, device=device))

        out.append(Case(f"B={B} V={V}", B, make, bytes=B * V * dt.itemsize, params=dict(B=B, V=V)))
    return out


def hf_sample(x: torch.Tensor) -> torch.Tensor:
    """Hugging Face's path: TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, then
    softmax and multinomial (transformers' code, inlined so transformers is not needed)."""
    scores = x.float() / TEMPERATURE
    kth = torch.topk(scores, min(TOP_K, scores.shape[-1]))[0][..., -1, None]
    scores = scores.masked_fill(scores < kth, -math.inf)
    sorted_logits, sorted_idx = torch.sort(scores, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cum <= (1 - TOP_P)
    remove[..., -1:] = False
    scores = scores.masked_fill(remove.scatter(1, sorted_idx, remove), -math.inf)
    return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)


def _check_fastlm(x, seed, tokens):
    z, _, k, p, mp, status, _ = ref.prepare(x, TEMPERATURE, TOP_K, TOP_P, None)
    keep = ref.support(z, k, p, mp)[0]
    if (status != 0).any() or not keep.gather(1, tokens[:, None]).all():
        raise AssertionError("a token outside the exact top-k/top-p support of the reference")
    if x.device.type == "cpu":
        want = ref.sample(x, TEMPERATURE, TOP_K, TOP_P, None, seed=seed)[0]
        if not torch.equal(tokens, want):
            raise AssertionError("tokens differ from the reference's for the same seed")


def _prepare(fn, strict):
    def prepare(inp):
        x, seed = inp["x"], inp["seed"]
        tokens = fn(x, seed)
        if tokens.shape != (x.shape[0],) or not ((tokens >= 0) & (tokens < x.shape[1])).all():
            raise AssertionError("invalid token ids")
        if strict:
            _check_fastlm(x, seed, tokens)

        def run():
            fn(x, seed)

        return run

    return prepare


def _peers():
    peers = {}
    try:
        import flashinfer.sampling as fis

        def flashinfer(x, seed):
            return fis.top_k_top_p_sampling_from_logits(x.float() / TEMPERATURE, TOP_K, TOP_P).long()

        peers["flashinfer"] = flashinfer
    except Exception:
        pass
    return peers


def _impls(mode, device, backends):
    d = {
        "torch-eager": _prepare(lambda x, seed: hf_sample(x), False),
        "torch-compile": _prepare(torch.compile(lambda x, seed: hf_sample(x), dynamic=False), False),
    }
    d.update(fastlm_impls(backends, lambda b: _prepare(
        lambda x, seed: ops.sample(x, temperature=TEMPERATURE, top_k=TOP_K, top_p=TOP_P, seed=seed, check=False, backend=b),
        True)))
    d.update({k: _prepare(v, False) for k, v in _peers().items()})
    return d


def _truth(inp, mode):
    return None  # tokens are validated in prepare (see the module doc)


register(Entry("sampling", "bandwidth", ("fwd",), _cases, _impls, _truth, dtypes=("bfloat16", "float32"),
               description=f"temperature {TEMPERATURE}, top-k {TOP_K}, top-p {TOP_P}: one token per row"))
