"""Cases for sinusoidal_position_encoding (the table) and embed_sinusoidal (token embedding + table,
with the weight gradient in both accumulation modes).

Outputs and the weight gradient are checked against the float64 reference by the tolerance rule;
inputs must come back untouched.
"""

from __future__ import annotations

import zlib

import torch

from fastlm import ops
from fastlm.cases import Case
from fastlm.reference import sinusoidal as ref
from fastlm.testing import assert_close

DTYPES_CPU = ("float32", "float16")  # bf16 arithmetic is wrong in the Triton interpreter: GPU only
DTYPES_GPU = ("float32", "float16", "bfloat16")

# (positions shape, dim, large positions)
_TABLE = [((1,), 1, False), ((7,), 16, False), ((3, 97), 80, False), ((97,), 97, False), ((2, 5), 512, False),
          ((3, 7), 128, True)]
# (V, D, ids shape, positions: none | offset | seq | full, scale, deterministic, layout, large positions)
_EMBED = [
    (11, 16, (1,), "none", None, False, "contig", False),
    (11, 80, (3, 97), "none", "sqrt", False, "contig", False),
    (11, 80, (3, 97), "full", None, True, "contig", False),
    (1000, 96, (7,), "offset", 2.5, True, "contig", False),
    (13, 33, (3, 7), "seq", None, True, "strided", False),
    (50, 128, (2, 3, 7), "full", "sqrt", False, "strided", False),
    (20, 64, (2, 7), "full", None, False, "contig", True),
]


def cases(device: str, full: bool = False) -> list[Case]:
    dtypes = DTYPES_GPU if device == "cuda" else DTYPES_CPU
    table, embed = list(_TABLE), list(_EMBED)
    if device == "cuda":
        table += [((8, 1023), 1024, False)]
        embed += [(50257, 768, (8, 1024), "none", "sqrt", False, "contig", False),
                  (50257, 768, (8, 1024), "none", "sqrt", True, "contig", False)]
        if full:
            embed += [(32000, 4096, (4, 2048), "full", None, True, "contig", True)]
    out = []
    for dtype in dtypes:
        for shape, dim, large in table:
            out.append(Case("sinusoidal_position_encoding", dict(shape=shape, dim=dim, large=large, dtype=dtype), device))
        for V, D, shape, pos, scale, det, layout, large in embed:
            out.append(Case("embed_sinusoidal", dict(V=V, D=D, shape=shape, positions=pos, scale=scale, deterministic=det,
                                                     layout=layout, large=large, dtype=dtype), device))
    return out


def _positions(shape, large, dev, g):
    hi = 1 << 20 if large else 10000
    pos = torch.randint(0, hi, shape, generator=g)
    if large:
        pos.view(-1)[0] = 131072
    return pos.to(dev)


def _check_table(case: Case, backend: str, g) -> dict[str, float]:
    p = case.params
    dt = getattr(torch, p["dtype"])
    pos = _positions(p["shape"], p["large"], case.device, g)
    orig = pos.clone()
    got = ops.sinusoidal_position_encoding(pos, p["dim"], base=10000.0, dtype=dt, backend=backend)
    if not torch.equal(orig, pos):
        raise AssertionError("sinusoidal_position_encoding: positions were modified")
    base = ref.sinusoidal_position_encoding(pos, p["dim"], 10000.0, dt)
    truth = ref.sinusoidal_position_encoding(pos, p["dim"], 10000.0, torch.float64)
    return {"pe": assert_close(got, truth, base, name="sinusoidal_position_encoding")}


def _run_embed(p, ids, w, positions, dout, backend):
    leaf = w.detach().clone().requires_grad_()
    scale = p["D"] ** 0.5 if p["scale"] == "sqrt" else p["scale"]
    if backend is None:
        out = ref.embed_sinusoidal(ids, leaf, positions, scale, 10000.0)
    else:
        out = ops.embed_sinusoidal(ids, leaf, positions=positions, scale=scale, deterministic=p["deterministic"],
                                   backend=backend)
    out.backward(dout)
    return dict(out=out.detach(), dweight=leaf.grad)


def _check_embed(case: Case, backend: str, g) -> dict[str, float]:
    p = case.params
    dt, dev = getattr(torch, p["dtype"]), case.device
    V, D, shape = p["V"], p["D"], p["shape"]
    ids = torch.randint(0, V, shape, generator=g).to(dev)
    if p["layout"] == "strided":
        w = torch.randn(D, V, generator=g).to(dev, dt).t()
        dout = torch.randn(*shape, D, 2, generator=g).to(dev, dt)[..., 0]
    else:
        w = torch.randn(V, D, generator=g).to(dev, dt)
        dout = torch.randn(*shape, D, generator=g).to(dev, dt)
    positions = {"none": None, "offset": 7, "seq": _positions(shape[-1:], p["large"], dev, g),
                 "full": _positions(shape, p["large"], dev, g)}[p["positions"]]
    originals = [ids.clone(), w.clone()]
    got = _run_embed(p, ids, w, positions, dout, backend)
    if not (torch.equal(originals[0], ids) and torch.equal(originals[1], w)):
        raise AssertionError("embed_sinusoidal: an input was modified")
    base = _run_embed(p, ids, w, positions, dout, None)
    truth = _run_embed(p, ids, w.double(), positions, dout.double(), None)
    return {n: assert_close(got[n], truth[n], base[n], name=f"embed_sinusoidal {n}") for n in truth}


def check(case: Case, backend: str) -> dict[str, float]:
    g = torch.Generator().manual_seed(zlib.crc32(f"{case.op}-{case.id}".encode()))
    if case.op == "sinusoidal_position_encoding":
        return _check_table(case, backend, g)
    return _check_embed(case, backend, g)
