"""The CUDA backward's VARLEN and OPTIONS paths (csrc/attention_bwd.cu) on the host build.

Packed sequences: dq, dk, dv of each sequence equal (bit for bit) the dense CUDA backward run on
that sequence alone, and the float64 reference gradients by the tolerance rule (truth: autograd
through fastlm.reference.attention in float64 on each sequence alone; baseline: the same in the
kernel's dtype; GRAD_FACTOR_ATTENTION). Options (softcap, ALiBi, dropout recomputed from the seed):
dense and packed against autograd through the reference with the same options and seed. The
forward's out and lse come from the reference (fp32, out rounded to the dtype), so these tests do
not depend on the CUDA forward. Each test checks the CUDA kernels ran (the emulated device's
launch counts) and that the Triton backward did not.
"""

from __future__ import annotations

import pytest
import torch

from fastlm.cuda import attention as cattn
from fastlm.reference import attention as ref
from fastlm.testing import GRAD_FACTOR_ATTENTION, assert_all_written, assert_close, poison_like

HQ, HKV = 4, 2
SEED = torch.tensor([0x1234_5678_9ABC, 7], dtype=torch.int64)


@pytest.fixture
def launches(C_host, monkeypatch):
    """The number of dK/dV and dQ kernel launches of a call; a Triton backward fails the test."""
    from fastlm.triton import attention as tattn

    def no_triton(*args, **kwargs):
        raise AssertionError("the Triton backward ran instead of the CUDA one")

    monkeypatch.setattr(tattn, "attention_bwd", no_triton)
    monkeypatch.setattr(tattn, "attention_varlen_bwd", no_triton)

    def count(kind):
        return sum(n for name, n in C_host.emulation_launch_counts().items() if name.startswith(f"attention_bwd_{kind}_kernel"))

    return count


def _cu(lens):
    return torch.tensor([0, *torch.tensor(lens, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int32)


def _packed(lq, lk, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    return r(sum(lq), HQ, d), r(sum(lk), HKV, d), r(sum(lk), HKV, d), r(sum(lq), HQ, d), torch.randn(HQ, sum(lq), generator=g)


def _window_args(window):
    return window if window is not None else (-1, -1)


def _varlen_bwd(q, k, v, do, dlse, lq, lk, causal, window, extra=0, **opts):
    """The CUDA varlen backward on NaN-poisoned outputs, from the reference forward's out and lse."""
    cq, ck = _cu(lq), _cu(lk)
    out, lse = ref.attention_varlen(q, k, v, cq, ck, causal=causal, window=window, return_lse=True, **opts)
    out, lse = out.to(q.dtype), lse.float()
    dq, dk, dv = poison_like(q), poison_like(k), poison_like(v)
    assert cattn.varlen_bwd_runs_cuda(do, q, k, v, out, dq, dk, dv, cq, max(lq) + extra, max(lk) + extra)
    cattn.attention_varlen_bwd(do, dlse, q, k, v, out, lse, cq, ck, max(lq) + extra, max(lk) + extra, causal, q.shape[-1] ** -0.5,
                               *_window_args(window), dq, dk, dv, **opts)
    for name, t in (("dq", dq), ("dk", dk), ("dv", dv)):
        assert_all_written(t, name)
    return dq, dk, dv


def _reference_grads(q, k, v, do, dlse, lq, lk, causal, window, **opts):
    """Autograd through the reference on the packed batch (attention on each sequence alone)."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = ref.attention_varlen(*leaves, _cu(lq), _cu(lk), causal=causal, window=window, return_lse=True, **opts)
    outs = [(out, do.to(out.dtype))] + ([(lse, dlse.to(lse.dtype))] if dlse is not None else [])
    grads = torch.autograd.grad([o for o, _ in outs], leaves, [g for _, g in outs], allow_unused=True, materialize_grads=True)
    return grads


def _check_reference(got, q, k, v, do, dlse, lq, lk, causal, window, **opts):
    base = _reference_grads(q, k, v, do, dlse, lq, lk, causal, window, **opts)
    truth = _reference_grads(q.double(), k.double(), v.double(), do.double(), None if dlse is None else dlse.double(), lq, lk,
                             causal, window, **opts)
    for name, g, t, b in zip(("dq", "dk", "dv"), got, truth, base, strict=True):
        assert_close(g, t, b, name=f"varlen {name}", factor=GRAD_FACTOR_ATTENTION, dtype=q.dtype)


def _dense_alone(q, k, v, do, dlse, lq, lk, causal, window):
    """The dense CUDA backward on each sequence alone, packed again (same reference forward)."""
    cq, ck = _cu(lq).tolist(), _cu(lk).tolist()
    res = [torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)]
    for b in range(len(lq)):
        sq, sk = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        qb, kb, vb, dob = (t[s].transpose(0, 1)[None] for t, s in ((q, sq), (k, sk), (v, sk), (do, sq)))
        if lq[b] == 0:
            continue  # no queries: dk = dv = 0, as the zeros above
        if lk[b]:
            out, lse = ref.attention(qb, kb, vb, causal=causal, window=window, return_lse=True)
            out, lse = out.to(q.dtype), lse.float()
        else:
            out, lse = torch.zeros_like(qb), torch.full(qb.shape[:3], float("-inf"))
        grads = [poison_like(t) for t in (qb, kb, vb)]
        dl = dlse[:, sq][None] if dlse is not None else None
        cattn.attention_bwd(dob, dl, qb, kb, vb, out, lse, causal, q.shape[-1] ** -0.5, *_window_args(window), *grads)
        for r, g, s in zip(res, grads, (sq, sk, sk), strict=True):
            r[s] = g[0].transpose(0, 1)
    return res


LENGTHS = {  # (query lengths, key lengths): 0 and 1 on both sides, Sq != Sk both ways, more than one 64-row block
    "mixed": ([0, 1, 37, 70, 5, 2], [3, 1, 80, 20, 0, 2]),
    "long": ([130, 1, 0], [66, 140, 9]),
}

GRID = [  # (lengths, head dim, dtype, causal, window, dlse)
    ("mixed", 64, torch.float16, False, None, True),
    ("mixed", 64, torch.bfloat16, True, None, False),
    ("mixed", 128, torch.float16, True, (9, -1), True),
    ("mixed", 128, torch.bfloat16, False, (6, 3), True),
    ("long", 64, torch.float16, True, (20, -1), False),
    ("long", 128, torch.bfloat16, False, None, True),
]


@pytest.mark.parametrize("lengths,d,dtype,causal,window,with_dlse", GRID, ids=lambda x: str(x).replace("torch.", ""))
def test_each_sequence_equals_the_dense_backward_alone(lengths, d, dtype, causal, window, with_dlse, launches):
    lq, lk = LENGTHS[lengths]
    q, k, v, do, dlse = _packed(lq, lk, d, dtype, seed=d + len(lq))
    dlse = dlse if with_dlse else None
    originals = [t.clone() for t in (q, k, v, do)]
    before = launches("dkdv"), launches("dq")
    got = _varlen_bwd(q, k, v, do, dlse, lq, lk, causal, window)
    assert (launches("dkdv"), launches("dq")) == (before[0] + 1, before[1] + 1)
    for orig, t in zip(originals, (q, k, v, do), strict=True):
        assert torch.equal(orig, t), "an input was modified"
    for name, g, want in zip(("dq", "dk", "dv"), got, _dense_alone(q, k, v, do, dlse, lq, lk, causal, window), strict=True):
        assert torch.equal(g, want), f"{name} differs from the dense backward on the sequence alone"
    _check_reference(got, q, k, v, do, dlse, lq, lk, causal, window)
    cq = _cu(lq)
    for b in range(len(lq)):
        ks = slice(int(_cu(lk)[b]), int(_cu(lk)[b + 1]))
        if lq[b] == 0:  # keys of a sequence with no queries: exactly zero
            assert torch.equal(got[1][ks], torch.zeros_like(got[1][ks])) and torch.equal(got[2][ks], torch.zeros_like(got[2][ks]))
        if lk[b] == 0:  # queries that see no key: exactly zero
            qs = slice(int(cq[b]), int(cq[b + 1]))
            assert torch.equal(got[0][qs], torch.zeros_like(got[0][qs]))


def test_longer_max_seqlen_changes_nothing(launches):
    """The grids cover max_seqlen blocks of every sequence; blocks past a sequence's end store nothing."""
    lq, lk = [20, 0, 70], [33, 4, 65]
    q, k, v, do, dlse = _packed(lq, lk, 64, torch.float16, seed=5)
    a = _varlen_bwd(q, k, v, do, dlse, lq, lk, True, None)
    b = _varlen_bwd(q, k, v, do, dlse, lq, lk, True, None, extra=70)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def test_no_queries_anywhere_zeroes_dk_dv(launches):
    lq, lk = [0, 0], [5, 9]
    q, k, v, do, _ = _packed(lq, lk, 64, torch.float16, seed=6)
    dq, dk, dv = poison_like(q), poison_like(k), poison_like(v)
    cattn.attention_varlen_bwd(do, None, q, k, v, torch.empty_like(q), torch.empty(HQ, 0), _cu(lq), _cu(lk), 0, 9, False, 0.1,
                               -1, -1, dq, dk, dv)
    assert torch.equal(dk, torch.zeros_like(dk)) and torch.equal(dv, torch.zeros_like(dv))


def test_two_schedule_seeds_are_bit_identical(C_host, launches):
    lq, lk = [70, 3, 40], [90, 0, 41]
    q, k, v, do, dlse = _packed(lq, lk, 128, torch.float16, seed=7)
    old = C_host.emulation_seed()
    try:
        results = []
        for s in (3, 4242):
            C_host.emulation_set_seed(s)
            results.append(_varlen_bwd(q, k, v, do, dlse, lq, lk, True, (25, -1), dropout_p=0.2, seed=SEED, softcap=4.0))
    finally:
        C_host.emulation_set_seed(old)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_bad_lse_shape_and_unsupported_fall_back():
    lq, lk = [3, 5], [4, 5]
    q, k, v, do, _ = _packed(lq, lk, 64, torch.float16, seed=8)
    grads = (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v))
    with pytest.raises(ValueError, match=r"lse and dlse must have shape \(4, 8\)"):
        cattn.attention_varlen_bwd(do, None, q, k, v, q.clone(), torch.zeros(HQ, 7), _cu(lq), _cu(lk), 5, 5, False, 0.1, -1, -1,
                                   *grads)
    cattn.attention_varlen_bwd(do, None, q, k, v, q.clone(), torch.zeros(HQ, 8), _cu(lq), _cu(lk), 5, 5, False, 0.1, -1, -1, *grads)
    q80 = torch.randn(8, HQ, 80).half()
    assert not cattn.varlen_bwd_runs_cuda(q80, q80, q80[:9], q80[:9], q80, q80, q80[:9], q80[:9], _cu(lq), 5, 5)
    assert cattn.varlen_bwd_runs_cuda(do, q, k, v, q, q, k, v, _cu(lq), 5, 5)


# ---- options: softcap, ALiBi, dropout --------------------------------------------------------------


def _slopes(shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) * 0.5 + 0.05


OPTIONS = {
    "softcap": lambda b: dict(softcap=2.5),
    "alibi": lambda b: dict(alibi_slopes=_slopes(HQ)),
    "alibi-batch": lambda b: dict(alibi_slopes=_slopes((b, HQ))),
    "dropout": lambda b: dict(dropout_p=0.3, seed=SEED),
    "all": lambda b: dict(softcap=1.7, alibi_slopes=_slopes((b, HQ)), dropout_p=0.2, seed=SEED),
}

OPTION_GRID = [  # (option, head dim, dtype, causal, window)
    ("softcap", 64, torch.float16, True, None),
    ("alibi", 128, torch.bfloat16, False, (7, 2)),
    ("alibi-batch", 64, torch.bfloat16, True, (12, -1)),
    ("dropout", 128, torch.float16, False, None),
    ("all", 64, torch.float16, True, None),
    ("all", 128, torch.bfloat16, False, (10, 5)),
]


@pytest.mark.parametrize("option,d,dtype,causal,window", OPTION_GRID, ids=lambda x: str(x).replace("torch.", ""))
def test_varlen_options_match_the_reference_gradients(option, d, dtype, causal, window, launches):
    lq, lk = [0, 1, 45, 70], [3, 1, 60, 33]
    q, k, v, do, dlse = _packed(lq, lk, d, dtype, seed=d + 1)
    opts = OPTIONS[option](len(lq))
    before = launches("dq")
    got = _varlen_bwd(q, k, v, do, dlse, lq, lk, causal, window, **opts)
    assert launches("dq") == before + 1
    _check_reference(got, q, k, v, do, dlse, lq, lk, causal, window, **opts)


def _dense_bwd(q, k, v, do, dlse, causal, window, **opts):
    out, lse = ref.attention(q, k, v, causal=causal, window=window, return_lse=True, **opts)
    out, lse = out.to(q.dtype), lse.float()
    grads = [poison_like(t) for t in (q, k, v)]
    assert cattn.bwd_runs_cuda(do, q, k, v, out, *grads)
    cattn.attention_bwd(do, dlse, q, k, v, out, lse, causal, q.shape[-1] ** -0.5, *_window_args(window), *grads, **opts)
    for name, t in zip(("dq", "dk", "dv"), grads, strict=True):
        assert_all_written(t, name)
    return grads


def _dense_reference(q, k, v, do, dlse, causal, window, **opts):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = ref.attention(*leaves, causal=causal, window=window, return_lse=True, **opts)
    return torch.autograd.grad([out, lse], leaves, [do.to(out.dtype), dlse.to(lse.dtype)])


@pytest.mark.parametrize("option,d,dtype,causal,window", OPTION_GRID, ids=lambda x: str(x).replace("torch.", ""))
def test_dense_options_match_the_reference_gradients(option, d, dtype, causal, window, launches):
    g = torch.Generator().manual_seed(d)
    B, Sq, Sk = 2, 50, 70
    q, do = (torch.randn(B, HQ, Sq, d, generator=g).to(dtype) for _ in range(2))
    k, v = (torch.randn(B, HKV, Sk, d, generator=g).to(dtype) for _ in range(2))
    dlse = torch.randn(B, HQ, Sq, generator=g)
    opts = OPTIONS[option](B)
    before = launches("dkdv")
    got = _dense_bwd(q, k, v, do, dlse, causal, window, **opts)
    assert launches("dkdv") == before + 1
    base = _dense_reference(q, k, v, do, dlse, causal, window, **opts)
    truth = _dense_reference(q.double(), k.double(), v.double(), do.double(), dlse.double(), causal, window, **opts)
    for name, x, t, b in zip(("dq", "dk", "dv"), got, truth, base, strict=True):
        assert_close(x, t, b, name=f"attention {option} {name}", factor=GRAD_FACTOR_ATTENTION, dtype=dtype)


def test_dropout_zero_p_and_no_options_are_bit_identical(launches):
    """dropout_p = 0 with a seed, softcap 0 and no slopes take the kernels without OPTIONS: the same bits."""
    g = torch.Generator().manual_seed(3)
    q, do = (torch.randn(1, HQ, 40, 64, generator=g).half() for _ in range(2))
    k, v = (torch.randn(1, HKV, 40, 64, generator=g).half() for _ in range(2))
    dlse = torch.randn(1, HQ, 40, generator=g)
    a = _dense_bwd(q, k, v, do, dlse, True, None)
    b = _dense_bwd(q, k, v, do, dlse, True, None, dropout_p=0.0, seed=SEED, softcap=0.0)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def test_dropout_without_seed_is_an_error():
    g = torch.Generator().manual_seed(4)
    q, do = (torch.randn(1, HQ, 8, 64, generator=g).half() for _ in range(2))
    k, v = (torch.randn(1, HKV, 8, 64, generator=g).half() for _ in range(2))
    out, lse = torch.zeros_like(q), torch.zeros(1, HQ, 8)
    grads = [torch.empty_like(t) for t in (q, k, v)]
    with pytest.raises(ValueError, match="dropout_p > 0 needs seed"):
        cattn.attention_bwd(do, None, q, k, v, out, lse, False, 0.1, -1, -1, *grads, dropout_p=0.1)
    cattn.attention_bwd(do, None, q, k, v, out, lse, False, 0.1, -1, -1, *grads, dropout_p=0.1, seed=SEED)
