"""The CUDA attention backward (csrc/attention_bwd.cu) through fastlm._C_host on CPU tensors:
preprocess (delta, lse2), dK/dV (one block per 64 keys of a key/value head, looping over the GQA
group) and dQ (one block per 64 queries). Gradients are checked against the float64 reference
under the tolerance rule (fastlm.cases), with NaN-poisoned outputs where the launcher is called
directly."""

from __future__ import annotations

import pytest
import torch

from fastlm import cases, ops
from fastlm.cases import Case
from fastlm.cases import attention as attention_cases
from fastlm.cuda import attention as cattn
from fastlm.reference import attention as ref
from fastlm.testing import assert_all_written, poison_like

pytestmark = pytest.mark.usefixtures("C_host")


def _case(**kw) -> Case:
    p = dict(B=1, Hq=2, Hkv=2, Sq=97, Sk=97, D=64, dtype="float16", causal=False, window=None, layout="contiguous", dlse=False)
    p.update(kw)
    return Case("attention", p, "cpu")


@pytest.fixture
def bwd_calls(monkeypatch):
    """Counts the CUDA backward launches; a Triton backward fails the test."""
    calls = []
    real = cattn._attention_bwd_cuda

    def spy(*args):
        calls.append(args[2].shape)
        return real(*args)

    def no_triton(*args, **kwargs):
        raise AssertionError("the Triton backward ran instead of the CUDA one")

    monkeypatch.setattr(cattn, "_attention_bwd_cuda", spy)
    from fastlm.triton import attention as tattn

    monkeypatch.setattr(tattn, "attention_bwd", no_triton)
    return calls


_GRID_CUDA = [c for c in cases.cases("attention", "cpu") if c.params["dtype"] == "float16" and c.params["D"] in (64, 128)]


@pytest.mark.parametrize("case", _GRID_CUDA, ids=lambda c: c.id)
def test_shared_grid_runs_the_cuda_backward(case, bwd_calls):
    """The fp16 head-dim 64/128 cases of the shared grid (tests/test_attention.py) reach these
    kernels, so the grid tests them rather than Triton."""
    p = case.params
    g = torch.Generator().manual_seed(0)
    q, k, v, do, dlse = attention_cases._attention_inputs(case, g)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = ops.attention(*leaves, causal=p["causal"], window=p["window"], return_lse=True, backend="cuda")
    torch.autograd.backward([out, lse] if dlse is not None else [out], [do, dlse] if dlse is not None else [do])
    assert len(bwd_calls) == 1
    assert all(torch.isfinite(t.grad).all() for t in leaves)


@pytest.mark.parametrize(
    "kw",
    [
        dict(Sq=97, Sk=130, window=(8, -1)),
        dict(Sq=130, Sk=97, window=(-1, 4)),
        dict(Sq=64, Sk=150, window=(5, 3), dtype="bfloat16"),
        dict(Sq=120, Sk=120, window=(16, 0), D=128),
        dict(Sq=100, Sk=60, window=(7, -1), causal=True),
        dict(Sq=150, Sk=40, window=(0, 0), causal=True, D=128),  # the first 110 rows see no key
        dict(Sq=90, Sk=90, window=(0, 40), causal=True, dtype="bfloat16"),  # causal caps the right side at 0
    ],
    ids=lambda kw: "-".join(f"{k}{v}" for k, v in kw.items()),
)
def test_windows(kw, bwd_calls):
    cases.check(_case(**kw), "cuda")
    assert bwd_calls


@pytest.mark.parametrize(
    "kw",
    [
        dict(Hq=4, Hkv=1, Sq=70, Sk=100, causal=True),
        dict(B=2, Hq=4, Hkv=1, Sq=65, Sk=65, D=128, dtype="bfloat16"),
        dict(Hq=4, Hkv=2, Sq=1, Sk=150, causal=True, D=128),
        dict(Hq=2, Hkv=1, Sq=150, Sk=1, causal=True),
        dict(Sq=1, Sk=1, D=128, dlse=True),
        dict(Hq=4, Hkv=2, Sq=80, Sk=120, window=(20, -1), dlse=True, dtype="bfloat16"),
        dict(B=2, Hq=4, Hkv=2, Sq=65, Sk=97, D=128, causal=True, layout="bshd"),
        dict(B=2, Hq=2, Hkv=1, Sq=97, Sk=65, D=64, layout="bshd", dlse=True),
    ],
    ids=lambda kw: "-".join(f"{k}{v}" for k, v in kw.items()),
)
def test_gqa_lengths_dlse_layouts(kw, bwd_calls):
    cases.check(_case(**kw), "cuda")
    assert bwd_calls


def _inputs(B, Hq, Hkv, Sq, Sk, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Sq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Sk, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Sk, D, generator=g).to(dtype)
    do = torch.randn(B, Hq, Sq, D, generator=g).to(dtype)
    return q, k, v, do


def _backward(q, k, v, do, causal, window, dlse=None):
    scale = q.shape[-1] ** -0.5
    if k.shape[2]:
        out, lse = ref.attention(q, k, v, causal=causal, window=window, return_lse=True)
        out, lse = out.to(q.dtype), lse.float()
    else:
        out, lse = torch.zeros_like(q), torch.full(q.shape[:3], float("-inf"))
    dq, dk, dv = poison_like(q), poison_like(k), poison_like(v)
    assert cattn.bwd_runs_cuda(do, q, k, v, out, dq, dk, dv)
    wl, wr = window if window is not None else (-1, -1)
    cattn.attention_bwd(do, dlse, q, k, v, out, lse, causal, scale, wl, wr, dq, dk, dv)
    for name, t in (("dq", dq), ("dk", dk), ("dv", dv)):
        assert_all_written(t, name)
    return dq, dk, dv


def test_poisoned_outputs_written_and_unseen_zero():
    """Sq < Sk with window (0, 0): keys before Sk - Sq are seen by no query (dk = dv = 0 there);
    with Sq > Sk causal, the first Sq - Sk rows see no key (dq = 0 there)."""
    q, k, v, do = _inputs(1, 4, 2, 40, 150, 64, torch.float16, seed=3)
    dq, dk, dv = _backward(q, k, v, do, causal=False, window=(0, 0))
    assert torch.equal(dk[:, :, :110], torch.zeros_like(dk[:, :, :110]))
    assert torch.equal(dv[:, :, :110], torch.zeros_like(dv[:, :, :110]))
    assert dk[:, :, 110:].abs().sum() > 0 and dv[:, :, 110:].abs().sum() > 0
    q, k, v, do = _inputs(1, 2, 2, 150, 40, 128, torch.bfloat16, seed=4)
    dq, dk, dv = _backward(q, k, v, do, causal=True, window=None)
    assert torch.equal(dq[:, :, :110], torch.zeros_like(dq[:, :, :110]))
    assert dq[:, :, 110:].abs().sum() > 0


def test_empty_lengths():
    """Sk == 0: dq = 0 (every row sees nothing, lse = -inf); Sq == 0: dk = dv = 0."""
    q, k, v, do = _inputs(1, 2, 1, 33, 0, 64, torch.float16)
    dq, dk, dv = _backward(q, k, v, do, causal=False, window=None)
    assert torch.equal(dq, torch.zeros_like(dq))
    q, k, v, do = _inputs(1, 2, 1, 0, 50, 128, torch.float16)
    dq, dk, dv = poison_like(q), poison_like(k), poison_like(v)
    cattn.attention_bwd(do, None, q, k, v, torch.empty_like(q), torch.empty(1, 2, 0), True, 0.1, -1, -1, dq, dk, dv)
    assert torch.equal(dk, torch.zeros_like(dk)) and torch.equal(dv, torch.zeros_like(dv))


def test_two_schedule_seeds_are_bit_identical(C_host):
    q, k, v, do = _inputs(1, 4, 1, 100, 130, 128, torch.float16, seed=7)
    dlse = torch.randn(1, 4, 100)
    seed = C_host.emulation_seed()
    try:
        results = []
        for s in (5, 98765):
            C_host.emulation_set_seed(s)
            results.append(_backward(q, k, v, do, causal=True, window=(30, -1), dlse=dlse))
    finally:
        C_host.emulation_set_seed(seed)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_grids_and_workspace(C_host):
    assert C_host.attention_bwd_supported(64, 1) and C_host.attention_bwd_supported(128, 2)
    assert not C_host.attention_bwd_supported(80, 1) and not C_host.attention_bwd_supported(64, 0)
    # preprocess over 64-row padded blocks, dK/dV per 64 keys of a kv head, dQ per 64 queries
    assert C_host.attention_bwd_grids(2, 8, 2, 100, 130) == [[2 * 8 * 2, 1, 1], [2 * 2 * 3, 1, 1], [2 * 8 * 2, 1, 1]]
    assert C_host.attention_bwd_grids(1, 2, 1, 5, 0) == [[2, 1, 1], [2, 1, 1]]  # no dK/dV launch
    assert C_host.attention_bwd_grids(2**20, 2**10, 1, 2**12, 64) == []  # beyond 2^31 - 1 blocks
    assert C_host.attention_bwd_grids(1, 1, 1, 2**30 + 1, 64) == []  # (j - i) - lo stays within 32 bits
    assert C_host.attention_bwd_grids(1, 1, 1, 64, 2**30 + 1) == []
    assert C_host.attention_bwd_workspace_size(2, 3, 65) == 2 * 2 * 3 * 128
    assert C_host.attention_bwd_workspace_size(1, 1, -1) == -1


def test_unaligned_rows_fall_back_to_triton():
    """Rows that are not 16-byte aligned are not the CUDA kernels' (the Triton backward serves them)."""
    q, k, v, do = _inputs(1, 2, 2, 20, 20, 72, torch.float16)
    qs, ks, vs, dos = (t[..., 4:68] for t in (q, k, v, do))
    out = torch.empty_like(qs)
    assert not cattn.bwd_runs_cuda(dos, qs, ks, vs, out, torch.empty_like(qs), torch.empty_like(ks), torch.empty_like(vs))
    q, k, v, do = (t[..., :64].contiguous() for t in (q, k, v, do))
    assert cattn.bwd_runs_cuda(do, q, k, v, out, torch.empty_like(q), torch.empty_like(k), torch.empty_like(v))


def test_bad_lse_shape():
    q, k, v, do = _inputs(1, 2, 2, 20, 20, 64, torch.float16)
    out = torch.empty_like(q)
    grads = (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v))
    with pytest.raises(ValueError, match=r"lse and dlse must have shape \(1, 2, 20\)"):
        cattn.attention_bwd(do, None, q, k, v, out, torch.zeros(1, 2, 19), False, 0.1, -1, -1, *grads)
    with pytest.raises(ValueError, match=r"lse and dlse must have shape \(1, 2, 20\)"):
        cattn.attention_bwd(do, torch.zeros(2, 20), q, k, v, out, torch.zeros(1, 2, 20), False, 0.1, -1, -1, *grads)
    cattn.attention_bwd(do, torch.zeros(1, 2, 20), q, k, v, out, torch.zeros(1, 2, 20), False, 0.1, -1, -1, *grads)
