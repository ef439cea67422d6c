"""Benchmark entry rotary: RoPE on q and k in one launch, fwd, bwd and full, in GB/s against copy bandwidth.

Bytes (performance.md): read and write q and k once (+ the positions); the backward the same for
the gradients. Llama-style heads: Hq = 32, Hk = 8 (GQA), D = 128, B = 4, so q and k together hold
5 Mi elements per 1k positions, beyond L2 from S = 2048. Implementations: torch eager (the
reference: fp32 cos/sin from the positions, HF's rotation), torch.compile of it, fastlm's angle
form per backend, fastlm's table form (apply_rotary_pos_emb with fp32 cos/sin tables prepared
outside the timing, so it also reads the tables), and Liger-Kernel's rope if installed (tables too).
"""

from __future__ import annotations

import torch

from fastlm import ops
from fastlm.bench.registry import Case, Entry, fastlm_impls, register
from fastlm.reference import rotary as ref

SIZES = {
    "default": [1024, 2048, 4096, 8192, 16384],
    "large": [1024, 2048, 4096, 8192, 16384, 32768],
    "quick": [7, 33],
}


def _cases(dtype, mode, sizes, device, quick):
    dt = getattr(torch, dtype)
    ss = sizes if isinstance(sizes, list) else SIZES["quick" if quick else (sizes or "default")]
    B, HQ, HK, D = (1, 4, 2, 64) if quick else (4, 32, 8, 128)
    out = []
    for S in ss:
        elems = B * (HQ + HK) * S * D
        one = 2 * elems * dt.itemsize + S * 8  # read + write q and k, read the positions
        nbytes = {"fwd": one, "bwd": one, "full": 2 * one}[mode]

        def make(S=S):
            g = torch.Generator(device=device).manual_seed(S)
            q = torch.randn(B, HQ, S, D, device=device, dtype=dt, generator=g)
            k = torch.randn(B, HK, S, D, device=device, dtype=dt, generator=g)
            dq = torch.randn(B, HQ, S, D, device=device, dtype=dt, generator=g)
            dk = torch.randn(B, HK, S, D, device=device, dtype=dt, generator=g)
            pos = torch.arange(S, device=device)
            return dict(q=q, k=k, dq=dq, dk=dk, pos=pos)

        out.append(Case(f"B={B} Hq={HQ} Hk={HK} S={S} D={D}", S, make, bytes=nbytes, params=dict(B=B, HQ=HQ, HK=HK, S=S, D=D)))
    return out


def _prepare(fn, mode):
    """fn(q, k, inputs) -> (q_out, k_out), wrapped into the timed closure for the mode."""

    def prepare(inp):
        q, k, dq, dk = inp["q"], inp["k"], inp["dq"], inp["dk"]
        if mode == "fwd":
            return lambda: fn(q, k, inp)
        leaves = [q.detach().requires_grad_(), k.detach().requires_grad_()]
        if mode == "bwd":
            outs = fn(*leaves, inp)
            return lambda: torch.autograd.grad(outs, leaves, (dq, dk), retain_graph=True)
        return lambda: (lambda o: (*o, *torch.autograd.grad(o, leaves, (dq, dk))))(fn(*leaves, inp))

    return prepare


def _tables(inp, dtype=torch.float32):
    """HF-style (1, S, D) cos/sin tables, built once per input set (outside the timed closure)."""
    if "cos" not in inp:
        a = ref.angles(inp["pos"], inp["q"].shape[-1], 10000.0, torch.float64)
        emb = torch.cat((a, a), dim=-1)[None]
        inp["cos"], inp["sin"] = emb.cos().to(dtype), emb.sin().to(dtype)
    return inp["cos"], inp["sin"]


def _with_tables(fn):
    def prepare_with_tables(mode):
        inner = _prepare(fn, mode)

        def prepare(inp):
            _tables(inp)
            return inner(inp)

        return prepare

    return prepare_with_tables


def _liger():
    try:
        from liger_kernel.transformers.rope import liger_rotary_pos_emb
    except Exception:
        return {}
    return {"liger": _with_tables(lambda q, k, inp: liger_rotary_pos_emb(q, k, inp["cos"].to(q.dtype), inp["sin"].to(q.dtype)))}


def _impls(mode, device, backends):
    reference = lambda q, k, inp: ref.rotary(q, k, inp["pos"])
    compiled = torch.compile(ref.rotary, dynamic=False)
    d = {"torch-eager": _prepare(reference, mode), "torch-compile": _prepare(lambda q, k, inp: compiled(q, k, inp["pos"]), mode)}
    d.update(fastlm_impls(backends, lambda b: _prepare(lambda q, k, inp: ops.rotary(q, k, inp["pos"], backend=b), mode)))
    for b in backends:
        if b != "torch":
            table = _with_tables(lambda q, k, inp, b=b: ops.apply_rotary_pos_emb(q, k, inp["cos"], inp["sin"], backend=b))
            d[f"fastlm-{b}-table"] = table(mode)
    d.update({name: make(mode) for name, make in _liger().items()})
    return d


def _truth(inp, mode):
    f64 = {k: (v.double() if v.is_floating_point() else v) for k, v in inp.items()}
    return _prepare(lambda q, k, i: ref.rotary(q, k, i["pos"]), mode)(f64)()


register(Entry("rotary", "bandwidth", ("fwd", "bwd", "full"), _cases, _impls, _truth,
               description="rotary position embedding of q and k (Hq=32, Hk=8, D=128), angles from positions"))
