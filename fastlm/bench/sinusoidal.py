"""Benchmark entry sinusoidal: token embedding gather + scale + sinusoidal encoding, fwd, bwd and full,
in GB/s against copy bandwidth.

Bytes (performance.md's rule, each input read once and each output written once): forward = the
ids + the gathered weight rows (N x D) + the output (N x D); backward = the ids + dout (N x D) +
the dense weight gradient (V x D, zero rows included, as torch's embedding backward writes it).
GPT-2-like vocabulary V = 50257, widths D = 768 .. 4096, B = 8 sequences of S = 2^22 / D tokens.
Implementations: torch eager (nn.functional.embedding * scale + a precomputed fp32 table, as models
do it), torch.compile of it, fastlm per backend with atomic (default) and deterministic gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastlm import ops
from fastlm.bench.registry import Case, Entry, fastlm_impls, register
from fastlm.reference import sinusoidal as ref

SIZES = {"default": [768, 1024, 2048, 4096], "large": [768, 1024, 2048, 4096, 8192], "quick": [16, 48]}
V = 50257


def _cases(dtype, mode, sizes, device, quick):
    dt = getattr(torch, dtype)
    ds = sizes if isinstance(sizes, list) else SIZES["quick" if quick else (sizes or "default")]
    out = []
    for D in ds:
        B, S, vocab = (2, 7, 100) if quick else (8, max(1, 2**22 // D), V)
        N, e = B * S, dt.itemsize
        fwd = N * 8 + 2 * N * D * e
        bwd = N * 8 + N * D * e + vocab * D * e
        nbytes = {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}[mode]

        def make(B=B, S=S, D=D, vocab=vocab):
            g = torch.Generator(device=device).manual_seed(D)
            w = torch.randn(vocab, D, device=device, dtype=dt, generator=g)
            ids = torch.randint(0, vocab, (B, S), device=device, generator=g)
            dout = torch.randn(B, S, D, device=device, dtype=dt, generator=g)
            return dict(w=w, ids=ids, dout=dout, scale=D**0.5)

        out.append(Case(f"V={vocab} D={D} B={B} S={S}", D, make, bytes=nbytes, params=dict(V=vocab, D=D, B=B, S=S)))
    return out


def _prepare(fn, mode):
    """fn(ids, weight, inputs) -> out, wrapped into the timed closure for the mode."""

    def prepare(inp):
        ids, w, dout = inp["ids"], inp["w"], inp["dout"]
        if mode == "fwd":
            return lambda: fn(ids, w, inp)
        leaf = w.detach().requires_grad_()
        if mode == "bwd":
            y = fn(ids, leaf, inp)
            return lambda: torch.autograd.grad(y, leaf, dout, retain_graph=True)
        return lambda: (lambda y: (y, *torch.autograd.grad(y, leaf, dout)))(fn(ids, leaf, inp))

    return prepare


def _table(inp):
    """The fp32 (S, D) table a model keeps as a buffer, built once (outside the timed closure)."""
    if "pe" not in inp:
        S, D = inp["ids"].shape[-1], inp["w"].shape[1]
        inp["pe"] = ref.sinusoidal_position_encoding(torch.arange(S, device=inp["ids"].device), D, 10000.0, torch.float32)
    return inp["pe"]


def _eager(ids, w, inp):
    return (F.embedding(ids, w).float() * inp["scale"] + _table(inp)).to(w.dtype)


def _impls(mode, device, backends):
    compiled = torch.compile(_eager, dynamic=False)

    def eager_prep(fn):
        inner = _prepare(fn, mode)
        return lambda inp: (_table(inp), inner(inp))[1]

    d = {"torch-eager": eager_prep(_eager), "torch-compile": eager_prep(compiled)}
    d.update(fastlm_impls(backends, lambda b: _prepare(
        lambda ids, w, inp: ops.embed_sinusoidal(ids, w, scale=inp["scale"], check=False, deterministic=False, backend=b), mode)))
    for b in backends:
        if b != "torch":
            d[f"fastlm-{b}-deterministic"] = _prepare(
                lambda ids, w, inp, b=b: ops.embed_sinusoidal(ids, w, scale=inp["scale"], check=False, deterministic=True, backend=b), mode)
    return d


def _truth(inp, mode):
    f64 = dict(inp, w=inp["w"].double(), dout=inp["dout"].double())
    return _prepare(lambda ids, w, i: ref.embed_sinusoidal(ids, w, None, i["scale"]), mode)(f64)()


register(Entry("sinusoidal", "bandwidth", ("fwd", "bwd", "full"), _cases, _impls, _truth,
               description="token embedding gather * sqrt(D) + sinusoidal position encoding (V=50257)"))
