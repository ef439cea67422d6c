"""fastlm.ops.attention_varlen: each packed sequence equals fastlm.ops.attention on it alone.

Truth: fastlm.ops.attention (the torch reference) in float64 on each sequence alone; baseline: the
same in the kernel's dtype. Outputs and LSE by the factor-2 rule, dq, dk, dv by the attention
gradient factor (fastlm.testing). Lengths include 0 and 1, Sq != Sk per sequence both ways, rows
that see no key (causal with Sq > Sk), GQA 4:2, causal and windows, head dims 64 and 128 in fp32
and fp16 (bf16 only on the GPU: the interpreter's bf16 is wrong).
"""

import pytest
import torch
from conftest import DEVICE, kernel_backends

import fastlm
from fastlm.ops._common import launcher
from fastlm.testing import GRAD_FACTOR_ATTENTION, assert_all_written, assert_close, poison_like

BACKENDS = kernel_backends()
HQ, HKV = 4, 2


@pytest.fixture(autouse=True)
def _no_autotune(monkeypatch):
    monkeypatch.setenv("FASTLM_AUTOTUNE", "0")


def _cu(lens):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)


def _lengths(seed, n=5, hi=40):
    """Query and key lengths with a 0 and a 1 on each side, Sq != Sk, and a sequence with Sq > Sk."""
    g = torch.Generator().manual_seed(seed)
    lq = [0, 1, 23, 0] + torch.randint(2, hi, (n,), generator=g).tolist()
    lk = [3, 17, 1, 0] + torch.randint(2, hi, (n,), generator=g).tolist()
    return lq, lk


def _packed(lq, lk, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, dt=dtype: torch.randn(*s, generator=g).to(device=DEVICE, dtype=dt)  # noqa: E731
    return r(sum(lq), HQ, d), r(sum(lk), HKV, d), r(sum(lk), HKV, d), r(sum(lq), HQ, d), r(HQ, sum(lq), dt=torch.float32)


def _varlen(q, k, v, do, dlse, lq, lk, backend, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = fastlm.ops.attention_varlen(*leaves, _cu(lq), _cu(lk), max(lq, default=0), max(lk, default=0), return_lse=True, backend=backend, **kw)
    pairs = [(o, g) for o, g in ((out, do), (lse, dlse)) if o.requires_grad]  # the reference of an empty batch has none
    grads = [torch.zeros_like(t) for t in leaves]
    if pairs:
        grads = torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs], allow_unused=True, materialize_grads=True)
    return dict(out=out.detach(), lse=lse.detach(), dq=grads[0], dk=grads[1], dv=grads[2])


def _per_sequence(q, k, v, do, dlse, lq, lk, **kw):
    """fastlm.ops.attention (torch backend) on each sequence alone, results packed again."""
    f64 = q.dtype == torch.float64
    res = {n: [] for n in ("out", "lse", "dq", "dk", "dv")}
    cq, ck = _cu(lq).tolist(), _cu(lk).tolist()
    for b in range(len(lq)):
        sl_q, sl_k = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        leaves = [t[s].transpose(0, 1)[None].detach().clone().requires_grad_() for t, s in ((q, sl_q), (k, sl_k), (v, sl_k))]
        out, lse = fastlm.ops.attention(*leaves, return_lse=True, backend="torch", **kw)
        grads = [do[sl_q].transpose(0, 1)[None], dlse[:, sl_q][None].to(lse.dtype)]
        torch.autograd.backward([out, lse], grads)
        res["out"].append(out[0].transpose(0, 1).detach())
        res["lse"].append(lse[0].detach().to(torch.float64 if f64 else torch.float32))
        for name, t in zip(("dq", "dk", "dv"), leaves, strict=True):
            res[name].append(t.grad[0].transpose(0, 1))
    return {n: torch.cat(ts, 1 if n == "lse" else 0) for n, ts in res.items()}


def _check(got, q, k, v, do, dlse, lq, lk, **kw):
    base = _per_sequence(q, k, v, do, dlse, lq, lk, **kw)
    truth = _per_sequence(q.double(), k.double(), v.double(), do.double(), dlse.double(), lq, lk, **kw)
    for name in ("out", "lse", "dq", "dk", "dv"):
        factor = GRAD_FACTOR_ATTENTION if name.startswith("d") else 2.0
        assert_close(got[name], truth[name], base[name], name=f"attention_varlen {name}", factor=factor, dtype=q.dtype)


GRID = [  # (head dim, dtype, causal, window, seed)
    (64, torch.float32, False, None, 1),
    (64, torch.float16, True, None, 2),
    (128, torch.float16, False, (8, 3), 3),
    (128, torch.float32, True, (16, -1), 4),
]


@pytest.mark.parametrize("d,dtype,causal,window,seed", GRID, ids=lambda x: str(x).replace("torch.", ""))
def test_each_sequence_equals_attention_alone(d, dtype, causal, window, seed):
    """Output, LSE (with its own upstream gradient), dq, dk, dv of the Triton kernels on a packed
    batch against attention on each sequence alone; empty sequences give zero rows, LSE -inf and
    zero gradients."""
    lq, lk = _lengths(seed)
    q, k, v, do, dlse = _packed(lq, lk, d, dtype, seed)
    originals = [t.clone() for t in (q, k, v, do, dlse)]
    got = _varlen(q, k, v, do, dlse, lq, lk, "triton", causal=causal, window=window)
    for orig, t in zip(originals, (q, k, v, do, dlse), strict=True):
        assert torch.equal(orig, t), "an input was modified in place"
    _check(got, q, k, v, do, dlse, lq, lk, causal=causal, window=window)
    # sequence 0 has no queries: its 3 keys get exactly zero gradients
    assert torch.equal(got["dk"][:3], torch.zeros_like(got["dk"][:3])) and torch.equal(got["dv"][:3], torch.zeros_like(got["dv"][:3]))
    assert torch.isfinite(got["dq"]).all()


@pytest.mark.parametrize("causal,window", [(False, None), (True, (5, -1))])
def test_reference_is_attention_per_sequence(causal, window):
    """The torch backend equals fastlm.ops.attention per sequence bit for bit (it is that loop),
    and the Triton kernels match it by the rule (checked above against the same oracle)."""
    lq, lk = _lengths(7)
    q, k, v, do, dlse = _packed(lq, lk, 16, torch.float32, 7)
    got = _varlen(q, k, v, do, dlse, lq, lk, "torch", causal=causal, window=window)
    want = _per_sequence(q, k, v, do, dlse, lq, lk, causal=causal, window=window)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)


def test_production_tiles_and_cuda_backend():
    """The GPU default tiles (128-row query blocks, several sequences inside one block's span) give
    the same result; backend "cuda" on a case its kernels do not cover (fp32, head dim 16) runs the
    Triton kernels: identical bits."""
    from fastlm.triton._configs import gpu_configs

    lq, lk = [130, 0, 1, 67], [129, 5, 70, 0]
    q, k, v, do, dlse = _packed(lq, lk, 64, torch.float16, 11)
    with gpu_configs():
        got = _varlen(q, k, v, do, dlse, lq, lk, "triton", causal=True)
    _check(got, q, k, v, do, dlse, lq, lk, causal=True)
    if "cuda" in BACKENDS:
        lq, lk = [9, 0, 20], [4, 6, 20]
        q, k, v, do, dlse = _packed(lq, lk, 16, torch.float32, 12)
        a, b = (_varlen(q, k, v, do, dlse, lq, lk, be, causal=True) for be in ("triton", "cuda"))
        for name in a:
            assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("backend,D", [(b, d) for b in BACKENDS for d in (32, 64)])
def test_bf16_in_the_interpreter(backend, D):
    """bf16 on CPU tensors: the Triton kernels run on fp32 copies (the interpreter's bf16 is wrong);
    backend "cuda" runs its own bf16 kernels where they apply (D = 64) and the Triton ones on fp32
    copies elsewhere (D = 32)."""
    lq, lk = [7, 0, 12], [9, 4, 12]
    q, k, v, do, dlse = _packed(lq, lk, D, torch.bfloat16, 13)
    got = _varlen(q, k, v, do, dlse, lq, lk, backend, causal=True)
    assert got["out"].dtype == torch.bfloat16 and got["dq"].dtype == torch.bfloat16
    _check(got, q, k, v, do, dlse, lq, lk, causal=True)


@pytest.mark.parametrize("causal,window", [(False, None), (True, (4, -1))])
def test_launchers_write_every_output(causal, window):
    """NaN-poisoned out, lse, dq, dk, dv: every element written, and the grid over max_seqlen
    blocks stores nothing past a sequence (an over-long max_seqlen changes nothing)."""
    mod = launcher("triton", "attention")
    lq, lk = [37, 0, 1, 20], [5, 9, 30, 0]
    q, k, v, do, _ = _packed(lq, lk, 40, torch.float32, 5)
    cq, ck = _cu(lq), _cu(lk)
    wl, wr = window or (-1, -1)
    results = []
    for extra in (0, 50):
        out, lse = poison_like(q), torch.full((HQ, q.shape[0]), float("nan"), device=DEVICE)
        mod.attention_varlen_fwd(q, k, v, cq, ck, max(lq) + extra, max(lk) + extra, causal, 0.3, wl, wr, out, lse)
        assert_all_written(out, "out")
        assert not torch.isnan(lse).any(), "lse: some elements never written"
        dq, dk, dv = poison_like(q), poison_like(k), poison_like(v)
        mod.attention_varlen_bwd(do, None, q, k, v, out, lse, cq, ck, max(lq) + extra, max(lk) + extra, causal, 0.3, wl, wr,
                                 dq, dk, dv, True)
        for name, t in dict(dq=dq, dk=dk, dv=dv).items():
            assert_all_written(t, name)
        results.append((out, lse, dq, dk, dv))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["torch"] + BACKENDS)
def test_empty_batch_and_all_empty_sequences(backend):
    for lq, lk in (([], []), ([0, 0], [3, 0]), ([2, 3], [0, 0])):
        q, k, v, do, dlse = _packed(lq, lk, 16, torch.float32, 3)
        got = _varlen(q, k, v, do, dlse, lq, lk, backend, causal=True)
        assert got["out"].shape == q.shape and got["lse"].shape == (HQ, q.shape[0])
        assert torch.equal(got["out"], torch.zeros_like(q)) and torch.isneginf(got["lse"]).all()
        for name, t in (("dq", q), ("dk", k), ("dv", v)):
            assert torch.equal(got[name], torch.zeros_like(t)), name


# ---- bad input ------------------------------------------------------------------------------------


def _good():
    lq, lk = [3, 0, 5], [4, 2, 5]
    q, k, v, _, _ = _packed(lq, lk, 16, torch.float32, 0)
    return dict(q=q, k=k, v=v, cu_seqlens_q=_cu(lq), cu_seqlens_k=_cu(lk), max_seqlen_q=5, max_seqlen_k=5)


def _i32(*vals):
    return torch.tensor(vals, dtype=torch.int32, device=DEVICE)


BAD = [
    (dict(cu_seqlens_q=_i32(0, 3, 3, 8).long()), TypeError, "cu_seqlens_q must be int32, got int64"),
    (dict(cu_seqlens_k=_i32(0, 4, 6, 11).float()), TypeError, "cu_seqlens_k must be int32"),
    (dict(cu_seqlens_q=[0, 3, 3, 8]), TypeError, "cu_seqlens_q must be a torch.Tensor"),
    (dict(cu_seqlens_q=_i32(0, 3, 8)), ValueError, "cu_seqlens_q has length 3 but cu_seqlens_k has length 4"),
    (dict(cu_seqlens_q=_i32(0, 3, 3, 8)[None]), ValueError, "must be 1-D of length batch \\+ 1"),
    (dict(cu_seqlens_q=_i32(1, 3, 3, 8)), ValueError, "cu_seqlens_q must start at 0, got 1"),
    (dict(cu_seqlens_k=_i32(0, 7, 6, 11)), ValueError, "cu_seqlens_k must be non-decreasing, got 7 then 6 at index 1"),
    (dict(cu_seqlens_q=_i32(0, 3, 3, 7)), ValueError, "cu_seqlens_q\\[-1\\] must equal the rows of q \\(8\\), got 7"),
    (dict(cu_seqlens_k=_i32(0, 4, 6, 12)), ValueError, "cu_seqlens_k\\[-1\\] must equal the rows of k and v \\(11\\), got 12"),
    (dict(max_seqlen_q=4), ValueError, "sequence of length 5 > max_seqlen_q=4"),
    (dict(max_seqlen_k=4), ValueError, "sequence of length 5 > max_seqlen_k=4"),
    (dict(max_seqlen_q=5.0), TypeError, "max_seqlen_q must be an int"),
    (dict(max_seqlen_k=-1), ValueError, "max_seqlen_k must lie in"),
]


@pytest.mark.parametrize("change,exc,match", BAD, ids=lambda x: x if isinstance(x, str) else None)
def test_bad_cu_seqlens(change, exc, match):
    """Checked before any backend runs (the reference would read the same offsets)."""
    good = _good()
    fastlm.ops.attention_varlen(**good, backend="triton")  # the positive control
    for backend in ("triton", "torch"):
        with pytest.raises(exc, match=match):
            fastlm.ops.attention_varlen(**{**good, **change}, backend=backend)


def test_bad_tensors():
    good = _good()
    q, k, v = good["q"], good["k"], good["v"]
    cases = [
        (dict(q=q[None]), ValueError, "q must be 3-D \\(total_rows, heads, head_dim\\)"),
        (dict(k=k.half()), TypeError, "k dtype float16 != q dtype float32"),
        (dict(q=q.int()), TypeError, "q must have dtype"),
        (dict(v=v[:, :1]), ValueError, "k shape \\[11, 2, 16\\] != v shape \\[11, 1, 16\\]"),
        (dict(k=k[..., :8], v=v[..., :8]), ValueError, "head dim of k \\(8\\) != head dim of q \\(16\\)"),
        (dict(q=q[..., :12], k=k[..., :12], v=v[..., :12]), ValueError, "head dim must be a multiple of 8"),
        (dict(q=q[:, :3]), ValueError, "query heads \\(3\\) must be a multiple of key/value heads \\(2\\)"),
        (dict(cu_seqlens_q=good["cu_seqlens_q"].to("meta")), ValueError, "cu_seqlens_q is on meta but q is on"),
    ]
    for change, exc, match in cases:
        with pytest.raises(exc, match=match):
            fastlm.ops.attention_varlen(**{**good, **change}, backend="triton")
    with pytest.raises(TypeError, match="causal must be a bool"):
        fastlm.ops.attention_varlen(**good, causal=1)
    with pytest.raises(ValueError, match="window must be None or a pair"):
        fastlm.ops.attention_varlen(**good, window=(3,))
    with pytest.raises(TypeError, match="the triton backend supports float32, float16 and bfloat16"):
        fastlm.ops.attention_varlen(**{**good, "q": q.double(), "k": k.double(), "v": v.double()}, backend="triton")
    out = fastlm.ops.attention_varlen(**{**good, "q": q.double(), "k": k.double(), "v": v.double()}, backend="torch")
    assert out.dtype == torch.float64


# ---- torch integration ----------------------------------------------------------------------------


def test_opcheck():
    backend = "triton"  # backend "cuda" reaches the same launchers (test_production_tiles_and_cuda_backend)
    g = _good()
    q, k, v = (g[n].requires_grad_() for n in "qkv")
    cq, ck = g["cu_seqlens_q"], g["cu_seqlens_k"]
    torch.library.opcheck(torch.ops.fastlm.attention_varlen_fwd.default, (q, k, v, cq, ck, 5, 5, True, 0.25, 3, -1, True, backend))
    out, lse = torch.ops.fastlm.attention_varlen_fwd(q.detach(), k.detach(), v.detach(), cq, ck, 5, 5, False, 0.25, -1, -1, True, backend)
    for dlse in (None, torch.randn_like(lse)):
        torch.library.opcheck(
            torch.ops.fastlm.attention_varlen_bwd.default,
            (torch.randn_like(out), dlse, q.detach(), k.detach(), v.detach(), out, lse, cq, ck, 5, 5, False, 0.25, -1, -1, True, backend),
            test_utils=("test_schema", "test_faketensor"),
        )


def test_torch_compile_fullgraph():
    def f(q, k, v, cq, ck):
        return fastlm.ops.attention_varlen(q, k, v, cq, ck, 5, 5, causal=True, window=(3, -1), return_lse=True, backend="triton")

    g = _good()
    q, k, v = (g[n].requires_grad_() for n in "qkv")
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if DEVICE == "cpu" else "inductor")
    (out, lse), (want, want_lse) = compiled(q, k, v, g["cu_seqlens_q"], g["cu_seqlens_k"]), f(q, k, v, g["cu_seqlens_q"], g["cu_seqlens_k"])
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(lse, want_lse)
    go = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), go), torch.autograd.grad(want, (q, k, v), go), strict=True):
        torch.testing.assert_close(a, b)
