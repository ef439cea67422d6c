"""Cases for rotary (angles from integer positions) and apply_rotary_pos_emb (Hugging Face's table form).

Each case checks q, k and their gradients against the float64 reference by the tolerance rule, and
that q and k are untouched out of place (or are the returned tensors, rotated, in place).
"""

from __future__ import annotations

import zlib

import torch

from fastlm import ops
from fastlm.cases import Case
from fastlm.reference import rotary as ref
from fastlm.testing import assert_close

DTYPES_CPU = ("float32", "float16")  # bf16 arithmetic is wrong in the Triton interpreter: GPU only
DTYPES_GPU = ("float32", "float16", "bfloat16")

# (B, Hq, Hk, S, D, rotary_dim, interleaved, positions, layout, inplace)
_ROTARY = [
    (1, 1, 1, 1, 16, None, False, "offset", "bhsd", False),
    (3, 4, 4, 7, 80, None, False, "seq", "bshd", False),
    (3, 3, 1, 97, 96, None, True, "batch", "bhsd", False),
    (1, 3, 1, 97, 128, None, False, "batch", "strided", False),
    (3, 8, 2, 7, 128, 64, False, "offset", "bshd", False),
    (1, 3, 1, 97, 80, 32, True, "seq", "strided", False),
    (3, 2, 2, 7, 96, 48, False, "scalar", "bhsd", False),
    (3, 4, 2, 7, 16, None, True, "offset", "bhsd", True),
    (1, 3, 1, 97, 80, 64, False, "batch", "bshd", True),
    (3, 4, 1, 7, 128, 96, True, "seq", "strided", True),
]
# positions up to 131072 and beyond: no precision cliff
_LARGE = [
    (3, 4, 2, 7, 128, None, False, "batch", "bhsd", False),
    (1, 2, 2, 97, 96, 64, True, "offset", "bshd", False),
]
# (B, Hq, Hk, S, D, R, cos batch: "B" | "1" | "2d", unsqueeze_dim, table dtype: "same" | "fp32", cos grad)
_TABLE = [
    (1, 1, 1, 1, 16, 16, "B", 1, "same", False),
    (3, 4, 2, 7, 80, 80, "B", 1, "same", True),
    (3, 2, 1, 97, 96, 96, "1", 2, "fp32", False),
    (1, 4, 1, 97, 128, 64, "2d", 1, "same", False),
    (3, 3, 3, 7, 128, 128, "B", 2, "fp32", True),
]


def cases(device: str, full: bool = False) -> list[Case]:
    dtypes = DTYPES_GPU if device == "cuda" else DTYPES_CPU
    rot = list(_ROTARY)
    table = list(_TABLE)
    if device == "cuda":
        rot += [(2, 32, 8, 1023, 128, None, False, "batch", "bshd", False), (4, 16, 16, 1025, 64, None, True, "seq", "bhsd", True)]
        table += [(2, 32, 8, 1023, 128, 128, "B", 1, "same", False)]
        if full:
            rot += [(1, 32, 8, 8192, 128, None, False, "offset", "bhsd", False)]
    out = []
    for dtype in dtypes:
        for spec in rot:
            out.append(Case("rotary", _rot_params(spec, dtype, large=False), device))
        for spec in _LARGE:
            out.append(Case("rotary", _rot_params(spec, dtype, large=True), device))
        for B, hq, hk, S, D, R, cb, u, tdt, cg in table:
            out.append(Case("apply_rotary_pos_emb", dict(B=B, hq=hq, hk=hk, S=S, D=D, R=R, cos_batch=cb, unsqueeze_dim=u,
                                                         table_dtype=tdt, cos_grad=cg, dtype=dtype), device))
    return out


def _rot_params(spec, dtype, large):
    B, hq, hk, S, D, rd, inter, pos, layout, inplace = spec
    return dict(B=B, hq=hq, hk=hk, S=S, D=D, rotary_dim=rd, interleaved=inter, positions=pos, layout=layout,
                inplace=inplace, large=large, dtype=dtype)


def _qk(B, H, S, D, layout, dtype, dev, g):
    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device=dev, dtype=dtype)

    if layout == "bshd":
        return rand(B, S, H, D).transpose(1, 2)
    if layout == "strided":
        return rand(B, H, 2 * S, D + 5)[:, :, ::2, 3 : 3 + D]
    return rand(B, H, S, D)


def _grad_like(x, layout, g):
    """A random upstream gradient; a non-contiguous one (head-dim stride 2) for the strided layout."""
    if layout == "strided":
        return torch.randn(*x.shape, 2, generator=g).to(device=x.device, dtype=x.dtype)[..., 1]
    return torch.randn(*x.shape, generator=g).to(device=x.device, dtype=x.dtype)


def _positions(kind, B, S, large, dev, g):
    hi = 1 << 20 if large else 4096
    if kind == "offset":
        return 131072 - S // 2 if large else 5
    if kind == "scalar":
        return torch.tensor(17, device=dev)
    if kind == "seq":
        return torch.randint(0, hi, (S,), generator=g).to(dev)
    pos = torch.randint(0, hi, (B, S), generator=g)
    if large:
        pos[:, 0] = 131072
    return pos.to(dev)


def _run_rotary(p, q, k, dq, dk, positions, backend, inplace):
    """{q, k, dq, dk} of one call (reference if backend is None); inputs are not modified unless inplace."""
    leaves = [q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()]
    kw = dict(theta=10000.0, rotary_dim=p["rotary_dim"], interleaved=p["interleaved"])
    if backend is None:
        qo, ko = ref.rotary(leaves[0], leaves[1], positions, **kw)
    elif inplace:
        qi, ki = leaves[0].clone(), leaves[1].clone()
        qo, ko = ops.rotary(qi, ki, positions, inplace=True, backend=backend, **kw)
        if qo is not qi or ko is not ki:
            raise AssertionError("rotary(inplace=True) must return q and k themselves")
    else:
        qo, ko = ops.rotary(leaves[0], leaves[1], positions, backend=backend, **kw)
    torch.autograd.backward([qo, ko], [dq, dk])
    return dict(q=qo.detach(), k=ko.detach(), dq=leaves[0].grad, dk=leaves[1].grad)


def _check_rotary(case: Case, backend: str, g) -> dict[str, float]:
    p = case.params
    dt, dev = getattr(torch, p["dtype"]), case.device
    q = _qk(p["B"], p["hq"], p["S"], p["D"], p["layout"], dt, dev, g)
    k = _qk(p["B"], p["hk"], p["S"], p["D"], p["layout"], dt, dev, g)
    dq, dk = _grad_like(q, p["layout"], g), _grad_like(k, p["layout"], g)
    positions = _positions(p["positions"], p["B"], p["S"], p["large"], dev, g)
    originals = [q.clone(), k.clone()]
    got = _run_rotary(p, q, k, dq, dk, positions, backend, p["inplace"])
    if not (torch.equal(originals[0], q) and torch.equal(originals[1], k)):
        raise AssertionError("rotary: an input was modified")
    if not p["inplace"] and p["layout"] != "strided" and got["q"].stride() != q.stride():
        raise AssertionError(f"rotary: output strides {got['q'].stride()} != input strides {q.stride()}")
    base = _run_rotary(p, q, k, dq, dk, positions, None, False)
    truth = _run_rotary(p, q.double(), k.double(), dq.double(), dk.double(), positions, None, False)
    return {name: assert_close(got[name], truth[name], base[name], name=f"rotary {name}") for name in truth}


def _run_table(p, q, k, cos, sin, dq, dk, backend):
    leaves = dict(q=q, k=k, cos=cos, sin=sin)
    leaves = {n: t.detach().clone().requires_grad_(n in ("q", "k") or p["cos_grad"]) for n, t in leaves.items()}
    args = (leaves["q"], leaves["k"], leaves["cos"], leaves["sin"], p["unsqueeze_dim"])
    qo, ko = ops.apply_rotary_pos_emb(*args, backend=backend) if backend else ref.apply_rotary_pos_emb(*args)
    torch.autograd.backward([qo, ko], [dq, dk])
    out = dict(q=qo.detach(), k=ko.detach(), dq=leaves["q"].grad, dk=leaves["k"].grad)
    if p["cos_grad"]:
        out.update(dcos=leaves["cos"].grad, dsin=leaves["sin"].grad)
    return out


def _check_table(case: Case, backend: str, g) -> dict[str, float]:
    p = case.params
    dt, dev = getattr(torch, p["dtype"]), case.device
    tdt = dt if p["table_dtype"] == "same" else torch.float32
    layout = "bhsd" if p["unsqueeze_dim"] == 1 else "bshd"
    q = _qk(p["B"], p["hq"], p["S"], p["D"], layout, dt, dev, g)
    k = _qk(p["B"], p["hk"], p["S"], p["D"], layout, dt, dev, g)
    if p["unsqueeze_dim"] == 2:  # q, k are (B, S, H, D) tensors
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    tshape = {"B": (p["B"], p["S"], p["R"]), "1": (1, p["S"], p["R"]), "2d": (p["S"], p["R"])}[p["cos_batch"]]
    cos = torch.randn(*tshape, generator=g).to(dev, tdt)
    sin = torch.randn(*tshape, generator=g).to(dev, tdt)
    dq, dk = torch.randn(q.shape, generator=g).to(dev, dt), torch.randn(k.shape, generator=g).to(dev, dt)
    originals = [t.clone() for t in (q, k, cos, sin)]
    got = _run_table(p, q, k, cos, sin, dq, dk, backend)
    if not all(torch.equal(a, b) for a, b in zip(originals, (q, k, cos, sin), strict=True)):
        raise AssertionError("apply_rotary_pos_emb: an input was modified")
    base = _run_table(p, q, k, cos, sin, dq, dk, None)
    f64 = [t.double() for t in (q, k, cos, sin, dq, dk)]
    truth = _run_table(p, *f64, None)
    return {n: assert_close(got[n], truth[n], base[n], name=f"apply_rotary_pos_emb {n}") for n in truth}


def check(case: Case, backend: str) -> dict[str, float]:
    g = torch.Generator().manual_seed(zlib.crc32(f"{case.op}-{case.id}".encode()))
    if case.op == "rotary":
        return _check_rotary(case, backend, g)
    return _check_table(case, backend, g)
