"""The rotary options of issue 17: the table form's ``interleaved`` and ``inplace``, and the packed
(``cu_seqlens``) form of ``rotary``, on every backend (cuda through the host tier on CPU tensors),
against the reference by the tolerance rule, outputs and gradients."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, kernel_backends

import fastlm
from fastlm.reference import rotary as ref
from fastlm.testing import assert_close

BACKENDS = kernel_backends() + ["torch"]


def _dtypes(backend):
    """fp32 and fp16 everywhere; bf16 on the cuda host tier and on a GPU (the Triton interpreter's
    bf16 arithmetic is not torch's, see the testing guide)."""
    out = [torch.float32, torch.float16]
    if backend != "triton" or DEVICE == "cuda":
        out.append(torch.bfloat16)
    return out


def _grid():
    return [pytest.param(b, dt, id=f"{b}-{str(dt).split('.')[-1]}") for b in BACKENDS for dt in _dtypes(b)]


def _run_table(q, k, cos, sin, dq, dk, u, backend, cos_grad=False, inplace=False):
    """{q, k, dq, dk (, dcos, dsin)} of apply_rotary_pos_emb(interleaved=True); reference when backend is None."""
    leaves = [t.detach().clone().requires_grad_(i < 2 or cos_grad) for i, t in enumerate((q, k, cos, sin))]
    if backend is None:
        qo, ko = ref.apply_rotary_pos_emb(*leaves, u, True)
    elif inplace:
        qi, ki = leaves[0].clone(), leaves[1].clone()
        qo, ko = fastlm.ops.apply_rotary_pos_emb(qi, ki, leaves[2], leaves[3], u, interleaved=True, inplace=True,
                                                 backend=backend)
        assert qo is qi and ko is ki
    else:
        qo, ko = fastlm.ops.apply_rotary_pos_emb(*leaves, u, interleaved=True, backend=backend)
    torch.autograd.backward([qo, ko], [dq, dk])
    out = dict(q=qo.detach(), k=ko.detach(), dq=leaves[0].grad, dk=leaves[1].grad)
    if cos_grad:
        out.update(dcos=leaves[2].grad, dsin=leaves[3].grad)
    return out


def _table_inputs(B, hq, hk, S, D, R, u, dt, cos_shape, g, tdt=None):
    shape = (lambda h: (B, h, S, D)) if u == 1 else (lambda h: (B, S, h, D))
    q, k = (torch.randn(shape(h), generator=g).to(DEVICE, dt) for h in (hq, hk))
    cos, sin = (torch.randn(cos_shape, generator=g).to(DEVICE, tdt or dt) for _ in range(2))
    dq, dk = torch.randn(q.shape, generator=g).to(DEVICE, dt), torch.randn(k.shape, generator=g).to(DEVICE, dt)
    return q, k, cos, sin, dq, dk


@pytest.mark.parametrize("backend,dtype", _grid())
def test_table_interleaved_matches_reference(backend, dtype):
    """Interleaved table form, outputs and q/k/cos/sin gradients: full and partial rotary, GQA head
    counts, batch and broadcast tables, (B, H, S, D) and (B, S, H, D), fp32 tables for 16-bit q."""
    g = torch.Generator().manual_seed(17)
    for B, hq, hk, S, D, R, u, cshape, cos_grad, tdt in (
        (2, 3, 1, 7, 64, 64, 1, (2, 7, 64), True, None),
        (1, 4, 2, 5, 80, 48, 2, (5, 48), False, None),
        (2, 2, 1, 9, 32, 16, 1, (1, 9, 16), True, torch.float32),
    ):
        inputs = _table_inputs(B, hq, hk, S, D, R, u, dtype, cshape, g, tdt)
        q, k, cos, sin = inputs[:4]
        originals = [t.clone() for t in (q, k, cos, sin)]
        got = _run_table(*inputs, u, backend, cos_grad)
        assert all(torch.equal(a, b) for a, b in zip(originals, (q, k, cos, sin), strict=True))
        base = _run_table(*inputs, u, None, cos_grad)
        truth = _run_table(*(t.double() for t in inputs), u, None, cos_grad)
        for n in truth:
            assert_close(got[n], truth[n], base[n], name=f"interleaved table {n} D={D} R={R}")


def test_interleaved_table_of_angles_is_the_interleaved_rotary():
    """The reference's interleaved table form with each pair's cos/sin repeated (GPT-J's tables)
    equals rotary(interleaved=True) to float64 rounding: the two forms mean the same pairing."""
    q, k = torch.randn(2, 3, 6, 40, dtype=torch.float64), torch.randn(2, 1, 6, 40, dtype=torch.float64)
    pos = torch.randint(0, 1000, (2, 6))
    a = ref.angles(pos, 32, 10000.0, torch.float64).repeat_interleave(2, dim=-1)
    got = ref.apply_rotary_pos_emb(q, k, a.cos(), a.sin(), 1, True)
    want = ref.rotary(q, k, pos, 10000.0, 32, True)
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend,dtype", _grid())
@pytest.mark.parametrize("interleaved", [False, True])
def test_table_inplace_writes_inputs_and_equals_out_of_place(backend, dtype, interleaved):
    """inplace=True writes q and k (also through the (B, S, H, D) transposed view), returns them,
    equals the out-of-place result exactly, and its q/k gradients equal the out-of-place ones."""
    g = torch.Generator().manual_seed(3)
    for u, R in ((1, 32), (2, 16)):
        q, k, cos, sin, dq, dk = _table_inputs(2, 3, 1, 6, 32, R, u, dtype, (2, 6, R), g)
        want = fastlm.ops.apply_rotary_pos_emb(q, k, cos, sin, u, interleaved=interleaved, backend=backend)
        qi, ki = q.clone(), k.clone()
        with torch.no_grad():
            got = fastlm.ops.apply_rotary_pos_emb(qi, ki, cos, sin, u, interleaved=interleaved, inplace=True,
                                                  backend=backend)
        assert got[0] is qi and got[1] is ki
        assert torch.equal(qi, want[0]) and torch.equal(ki, want[1])
        grads = []
        for inplace in (False, True):
            leaves = [q.clone().requires_grad_(), k.clone().requires_grad_()]
            x, y = (leaves[0].clone(), leaves[1].clone()) if inplace else leaves
            qo, ko = fastlm.ops.apply_rotary_pos_emb(x, y, cos, sin, u, interleaved=interleaved, inplace=inplace,
                                                     backend=backend)
            torch.autograd.backward([qo, ko], [dq, dk])
            grads.append((qo.detach(), ko.detach(), leaves[0].grad, leaves[1].grad))
        for a, b in zip(*grads, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_table_inplace_refuses_table_gradients(backend):
    q, k = torch.randn(1, 2, 4, 16, device=DEVICE), torch.randn(1, 2, 4, 16, device=DEVICE)
    cos, sin = torch.randn(4, 16, device=DEVICE), torch.randn(4, 16, device=DEVICE)
    fastlm.ops.apply_rotary_pos_emb(q, k, cos, sin, inplace=True, backend=backend)
    with pytest.raises(ValueError, match="inplace=True gives no gradient for cos and sin"):
        fastlm.ops.apply_rotary_pos_emb(q, k, cos.requires_grad_(), sin, inplace=True, backend=backend)
    with pytest.raises(ValueError, match="inplace=True needs q and k in separate memory"):
        fastlm.ops.apply_rotary_pos_emb(q, q, cos.detach(), sin, inplace=True, backend=backend)
    with pytest.raises(TypeError, match="interleaved and inplace must be bools"):
        fastlm.ops.apply_rotary_pos_emb(q, k, cos.detach(), sin, interleaved=1, backend=backend)


# ---- packed (cu_seqlens) form ----------------------------------------------------------------------


def _run_packed(q, k, dq, dk, cu, offsets, kw, backend, inplace=False):
    leaves = [q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()]
    if backend is None:
        qo, ko = ref.rotary_packed(leaves[0], leaves[1], cu, offsets, **kw)
    else:
        x, y = (leaves[0].clone(), leaves[1].clone()) if inplace else leaves
        qo, ko = fastlm.ops.rotary(x, y, offsets, cu_seqlens=cu, inplace=inplace, backend=backend, **kw)
        if inplace:
            assert qo is x and ko is y
    torch.autograd.backward([qo, ko], [dq, dk])
    return dict(q=qo.detach(), k=ko.detach(), dq=leaves[0].grad, dk=leaves[1].grad)


@pytest.mark.parametrize("backend,dtype", _grid())
def test_packed_equals_rotary_per_sequence(backend, dtype):
    """Sequences of lengths 0, 1, 5, 0, 3 (and 13 alone), positions from 0 or from an int or
    per-sequence offset, half split and interleaved, partial rotary, q and k with different head
    counts: outputs and gradients against rotary on each sequence alone; inplace equals out of place."""
    g = torch.Generator().manual_seed(5)
    for lens, hq, hk, D, R, inter, offsets in (
        ([0, 1, 5, 0, 3], 4, 2, 64, 64, False, 0),
        ([0, 1, 5, 0, 3], 3, 1, 32, 16, True, torch.tensor([7, 0, 100000, 3, 9])),
        ([13], 2, 2, 80, 48, False, 11),
    ):
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
        offsets = offsets.to(DEVICE) if isinstance(offsets, torch.Tensor) else offsets
        T = sum(lens)
        q, k = (torch.randn(T, h, D, generator=g).to(DEVICE, dtype) for h in (hq, hk))
        dq, dk = torch.randn(q.shape, generator=g).to(DEVICE, dtype), torch.randn(k.shape, generator=g).to(DEVICE, dtype)
        kw = dict(theta=10000.0, rotary_dim=R, interleaved=inter)
        originals = (q.clone(), k.clone())
        got = _run_packed(q, k, dq, dk, cu, offsets, kw, backend)
        assert torch.equal(originals[0], q) and torch.equal(originals[1], k)
        assert got["q"].shape == q.shape and got["k"].shape == k.shape
        base = _run_packed(q, k, dq, dk, cu, offsets, kw, None)
        truth = _run_packed(q.double(), k.double(), dq.double(), dk.double(), cu, offsets, kw, None)
        for n in truth:
            assert_close(got[n], truth[n], base[n], name=f"packed {n} lens={lens}")
        inplace = _run_packed(q, k, dq, dk, cu, offsets, kw, backend, inplace=True)
        for n in got:
            assert torch.equal(inplace[n], got[n]), n


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_empty_batch(backend):
    q, k = torch.randn(0, 2, 16, device=DEVICE), torch.randn(0, 1, 16, device=DEVICE)
    for cu in (torch.zeros(1, dtype=torch.int32), torch.zeros(3, dtype=torch.int32)):
        qo, ko = fastlm.ops.rotary(q, k, 0, cu_seqlens=cu.to(DEVICE), backend=backend)
        assert qo.shape == q.shape and ko.shape == k.shape


def test_packed_errors():
    q, k = torch.randn(6, 2, 16, device=DEVICE), torch.randn(6, 1, 16, device=DEVICE)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32, device=DEVICE)
    fastlm.ops.rotary(q, k, 0, cu_seqlens=cu)
    fastlm.ops.rotary(q, k, torch.tensor([3, 4], device=DEVICE), cu_seqlens=cu)
    bad = [
        (TypeError, "cu_seqlens must be int32, got torch.int64", dict(cu_seqlens=cu.long())),
        (ValueError, r"cu_seqlens must be 1-D of length batch \+ 1 >= 1, got shape \[1, 3\]", dict(cu_seqlens=cu[None])),
        (ValueError, "cu_seqlens of length 1 holds no sequence but q has 6 rows", dict(cu_seqlens=cu[:1])),
        (ValueError, "cu_seqlens must start at 0, got 1", dict(cu_seqlens=cu + 1)),
        (ValueError, "cu_seqlens must be non-decreasing, got 4 then 2 at index 1",
         dict(cu_seqlens=torch.tensor([0, 4, 2, 6], dtype=torch.int32, device=DEVICE))),
        (ValueError, r"cu_seqlens\[-1\] must equal the rows of q and k \(6\), got 5",
         dict(cu_seqlens=torch.tensor([0, 2, 5], dtype=torch.int32, device=DEVICE))),
        (ValueError, r"positions must be an int or 0-d tensor offset or a \(B,\) = \(2,\) tensor",
         dict(cu_seqlens=cu, positions=torch.arange(6, device=DEVICE))),
        (TypeError, "positions must be an int offset or an integer tensor", dict(cu_seqlens=cu, positions=1.5)),
    ]
    for exc, match, kw in bad:
        positions = kw.pop("positions", 0)
        with pytest.raises(exc, match=match):
            fastlm.ops.rotary(q, k, positions, **kw)
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="cu_seqlens is on meta but q is on cpu"):
            fastlm.ops.rotary(q, k, 0, cu_seqlens=torch.zeros(3, dtype=torch.int32, device="meta"))
    with pytest.raises(ValueError, match=r"with cu_seqlens, q and k must be 3-D \(total, heads, head_dim\)"):
        fastlm.ops.rotary(q[None], k[None], 0, cu_seqlens=cu)
    with pytest.raises(ValueError, match="must agree in total and head_dim"):
        fastlm.ops.rotary(q, k[:5], 0, cu_seqlens=cu)


# ---- the CUDA vector path serves the new forms --------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cuda_vector_path_serves_new_forms(C_host, dtype):
    """The aligned interleaved table form and the packed form's (1, H, T, D) view take the 16-byte
    path; the interleaved table vector path is bit-identical to the any-stride path (d stride 2)."""
    from fastlm.cuda import rotary as crot

    q, k = torch.randn(2, 4, 5, 64, dtype=dtype), torch.randn(2, 2, 5, 64, dtype=dtype)
    for tdt in (dtype, torch.float32):
        cos, sin = torch.randn(2, 5, 64, dtype=tdt), torch.randn(2, 5, 64, dtype=tdt)
        qo, ko = torch.empty_like(q), torch.empty_like(k)
        assert crot.vector_path(q, k, qo, ko, 64, True, cos, sin)
        crot.rotary_table_fwd(q, k, cos, sin, qo, ko, True)
        qs, ks = (torch.empty(*t.shape[:-1], 128, dtype=dtype)[..., ::2] for t in (q, k))
        qs.copy_(q)
        ks.copy_(k)
        q2, k2 = torch.empty_like(q), torch.empty_like(k)
        assert not crot.vector_path(qs, ks, q2, k2, 64, True, cos, sin)
        crot.rotary_table_fwd(qs, ks, cos, sin, q2, k2, True)
        assert torch.equal(qo, q2) and torch.equal(ko, k2)
    qp, kp = torch.randn(9, 4, 64, dtype=dtype), torch.randn(9, 2, 64, dtype=dtype)
    q4, k4 = qp.transpose(0, 1)[None], kp.transpose(0, 1)[None]
    assert crot.vector_path(q4, k4, torch.empty_like(q4), torch.empty_like(k4), 64, True)
    assert crot.vector_path(q4, k4, q4, k4, 32, False)


# ---- torch.library ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", kernel_backends())
def test_opcheck_new_ops(backend):
    q = torch.randn(2, 3, 5, 24, device=DEVICE, requires_grad=True)
    k = torch.randn(2, 1, 5, 24, device=DEVICE, requires_grad=True)
    cos = torch.randn(1, 5, 16, device=DEVICE, requires_grad=True)
    sin = torch.randn(1, 5, 16, device=DEVICE, requires_grad=True)
    quick = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.fastlm.rotary_table_fwd.default, (q, k, cos, sin, backend, True))
    torch.library.opcheck(torch.ops.fastlm.rotary_table_bwd.default, (q.detach(), k.detach(), cos.detach(), sin.detach(), backend, True),
                          test_utils=quick)
    qd, kd, cd, sd = (t.detach().clone() for t in (q, k, cos, sin))
    torch.library.opcheck(torch.ops.fastlm.rotary_table_inplace.default, (qd, kd, cd, sd, backend, True))
    torch.library.opcheck(torch.ops.fastlm.rotary_table_inplace_one.default, (qd, kd, "q", "k", cd, sd, backend, False))


@pytest.mark.parametrize("backend", kernel_backends())
def test_torch_compile_fullgraph_new_forms(backend):
    def f(q, k, cos, sin, qp, kp, cu):
        qa, ka = fastlm.ops.apply_rotary_pos_emb(q * 2.0, k * 2.0, cos, sin, interleaved=True, inplace=True, backend=backend)
        qb, kb = fastlm.ops.rotary(qp, kp, 3, cu_seqlens=cu, backend=backend)
        return qa.sum() + ka.sum() + (qb * qb).sum() + kb.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if DEVICE == "cpu" else "inductor")
    leaves = [torch.randn(2, 3, 5, 32, device=DEVICE), torch.randn(2, 1, 5, 32, device=DEVICE),
              torch.randn(6, 2, 16, device=DEVICE), torch.randn(6, 1, 16, device=DEVICE)]
    cos, sin = torch.randn(5, 32, device=DEVICE), torch.randn(5, 32, device=DEVICE)
    cu = torch.tensor([0, 1, 1, 6], dtype=torch.int32, device=DEVICE)
    results = []
    for fn in (compiled, f):
        ls = [t.clone().requires_grad_() for t in leaves]
        out = fn(ls[0], ls[1], cos, sin, ls[2], ls[3], cu)
        out.backward()
        results.append([out.detach()] + [t.grad for t in ls])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rotary_embedding_module_passes_the_new_options(backend):
    """fastlm.nn.RotaryEmbedding forwards interleaved, inplace and cu_seqlens to fastlm.ops.rotary."""
    g = torch.Generator().manual_seed(9)
    m = fastlm.nn.RotaryEmbedding(16, theta=500.0, interleaved=True, backend=backend)
    cu = torch.tensor([0, 3, 3, 7], dtype=torch.int32, device=DEVICE)
    q, k = torch.randn(7, 4, 32, generator=g).to(DEVICE), torch.randn(7, 2, 32, generator=g).to(DEVICE)
    want = fastlm.ops.rotary(q, k, 5, theta=500.0, rotary_dim=16, interleaved=True, cu_seqlens=cu, backend="torch")
    got = m(q, k, 5, cu_seqlens=cu)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    qi, ki = q.clone(), k.clone()
    out = m(qi, ki, 5, cu_seqlens=cu, inplace=True)
    assert out[0] is qi and out[1] is ki
    assert torch.equal(qi, got[0]) and torch.equal(ki, got[1])
    with pytest.raises(ValueError, match="cu_seqlens"):
        m(q, k, 5, cu_seqlens=torch.tensor([0, 3, 9], dtype=torch.int32, device=DEVICE))
