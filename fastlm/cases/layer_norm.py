"""Cases for layer_norm and rms_norm (plain and fused with a residual add)."""

from __future__ import annotations

import itertools
import zlib

import torch

from fastlm import ops
from fastlm.cases import Case
from fastlm.reference import layer_norm as ref
from fastlm.testing import assert_close

DTYPES_CPU = ("float32", "float16")  # bf16 arithmetic is wrong in the Triton interpreter: GPU only
DTYPES_GPU = ("float32", "float16", "bfloat16")


def cases(device: str, full: bool = False) -> list[Case]:
    dtypes = DTYPES_GPU if device == "cuda" else DTYPES_CPU
    shapes = [((1,), 1), ((3,), 7), ((2, 5), 97), ((17,), 123), ((4,), 1025), ((3,), 1500), ((2,), 20000)]
    if device == "cuda":
        shapes += [((260,), 3000), ((64,), 4096), ((7, 9), 8192), ((5,), 65536), ((3,), 70000)]
        if full:
            shapes += [((4096,), 1024), ((1024,), 16384)]
    out = []
    for op in ("layer_norm", "rms_norm"):
        for (lead, n), dtype in itertools.product(shapes, dtypes):
            for weight, residual in (("same", False), ("fp32", False), ("none", False), ("same", True)):
                for bias in ((True, False) if op == "layer_norm" and weight != "none" else (False,)):
                    out.append(Case(op, dict(lead=lead, n=n, dtype=dtype, weight=weight, bias=bias, residual=residual), device))
        # layouts: a strided input and a strided upstream gradient
        for dtype in dtypes:
            out.append(Case(op, dict(lead=(6,), n=97, dtype=dtype, weight="same", bias=op == "layer_norm", residual=False, strided=True), device))
            out.append(Case(op, dict(lead=(5,), n=123, dtype=dtype, weight="same", bias=False, residual=True, strided=True), device))
    return out


def _inputs(case: Case, generator: torch.Generator):
    p = case.params
    dtype = getattr(torch, p["dtype"])
    dev = case.device
    shape = (*p["lead"], p["n"])

    def rand(*s, dt=dtype, scale=1.0, shift=0.0):
        return (torch.randn(*s, generator=generator, dtype=torch.float32) * scale + shift).to(device=dev, dtype=dt)

    if p.get("strided"):
        x = rand(*p["lead"], 2 * p["n"] + 3, scale=2.0, shift=0.5)[..., 1 : 2 * p["n"] + 1 : 2]
    else:
        x = rand(*shape, scale=p.get("scale", 2.0), shift=p.get("shift", 0.5))
    wdt = {"same": dtype, "fp32": torch.float32}.get(p["weight"])
    w = rand(p["n"], dt=wdt, shift=1.0) if wdt is not None else None
    b = rand(p["n"], dt=wdt) if p["bias"] else None
    r = rand(*shape) if p["residual"] else None
    dy = rand(*shape)
    if p.get("strided"):
        dy = rand(*p["lead"], p["n"], 2).select(-1, 1)
    dh = rand(*shape) if p["residual"] else None
    return x, r, w, b, dy, dh


def _run(op, x, r, w, b, dy, dh, backend):
    """Outputs and gradients {name: tensor} of one call on one backend (reference if backend is None)."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in dict(x=x, residual=r, weight=w, bias=b).items() if v is not None}
    n = x.shape[-1]
    xs, rs, ws, bs = (leaves.get(k) for k in ("x", "residual", "weight", "bias"))
    if op == "layer_norm":
        if rs is not None:
            out = ops.add_layer_norm(xs, rs, ws, bs, 1e-5, backend=backend) if backend else ref.add_layer_norm(xs, rs, ws, bs, 1e-5)
        else:
            out = ops.layer_norm(xs, (n,), ws, bs, 1e-5, backend=backend) if backend else ref.layer_norm(xs, (n,), ws, bs, 1e-5)
    else:
        eps = 1e-6
        if rs is not None:
            out = ops.add_rms_norm(xs, rs, ws, eps, backend=backend) if backend else ref.add_rms_norm(xs, rs, ws, eps)
        else:
            out = ops.rms_norm(xs, (n,), ws, eps, backend=backend) if backend else ref.rms_norm(xs, (n,), ws, eps)
    outs = {"y": out[0], "h": out[1]} if rs is not None else {"y": out}
    grads_in = [dy] + ([dh] if rs is not None else [])
    torch.autograd.backward(list(outs.values()), grads_in)
    result = {k: v.detach() for k, v in outs.items()}
    result.update({f"d{k}": v.grad for k, v in leaves.items()})
    return result


def check(case: Case, backend: str) -> dict[str, float]:
    g = torch.Generator().manual_seed(zlib.crc32(f"{case.op}-{case.id}".encode()))
    x, r, w, b, dy, dh = _inputs(case, g)
    originals = [t.clone() for t in (x, r, w, b) if t is not None]
    got = _run(case.op, x, r, w, b, dy, dh, backend)
    for orig, t in zip(originals, [t for t in (x, r, w, b) if t is not None], strict=True):
        if not torch.equal(orig, t):
            raise AssertionError(f"{case.op}: an input was modified in place")
    base = _run(case.op, x, r, w, b, dy, dh, None)
    f64 = lambda t: t.double() if t is not None else None
    truth = _run(case.op, f64(x), f64(r), f64(w), f64(b), f64(dy), f64(dh), None)
    return {k: assert_close(got[k], truth[k], base[k], name=f"{case.op} {k}") for k in truth}
