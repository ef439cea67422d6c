import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, HAS_GPU, kernel_backends

import fastlm
from fastlm import cases
from fastlm.ops._common import launcher
from fastlm.reference import attention as ref
from fastlm.testing import GRAD_FACTOR_ATTENTION, assert_all_written, assert_close, poison_like

BACKENDS = kernel_backends()


@pytest.fixture(autouse=True)
def _no_autotune(monkeypatch):
    """One config per kernel variant (the first of its table): keeps the GPU suite's compile count
    down; test_every_config_gpu covers the other configs."""
    monkeypatch.setenv("FASTLM_AUTOTUNE", "0")


def _rand(*shape, dtype=torch.float32, requires_grad=False):
    return torch.randn(*shape, device=DEVICE, dtype=dtype, requires_grad=requires_grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", cases.cases("attention", DEVICE), ids=lambda c: c.id)
def test_attention_matches_reference(case, backend):
    cases.check(case, backend)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "case", [c for c in cases.cases("attention", "cuda", full=True) if c not in cases.cases("attention", "cuda")], ids=lambda c: c.id
)
def test_attention_large_gpu(case, backend):
    cases.check(case, backend)


# ---- launchers: every output element written -------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal,window,sq,sk", [(False, (-1, -1), 37, 53), (True, (-1, -1), 53, 37), (True, (4, -1), 40, 40)])
def test_launchers_write_every_output(backend, causal, window, sq, sk):
    """NaN-poisoned out, lse, dq, dk, dv: every element written (rows that see no key: 0 and -inf)."""
    mod = launcher(backend, "attention")
    dt = torch.float16 if backend == "cuda" else torch.float32
    B, Hq, Hkv, D = 2, 4, 2, 64 if backend == "cuda" else 40
    q, k, v = _rand(B, Hq, sq, D, dtype=dt), _rand(B, Hkv, sk, D, dtype=dt), _rand(B, Hkv, sk, D, dtype=dt)
    out = poison_like(q)
    lse = torch.full((B, Hq, sq), float("nan"), device=DEVICE)
    mod.attention_fwd(q, k, v, causal, 0.3, window[0], window[1], out, lse)
    assert_all_written(out, "out")
    assert not torch.isnan(lse).any(), "lse: some elements never written"
    do = torch.randn_like(q)
    dq, dk, dv = poison_like(q), poison_like(k), poison_like(v)
    mod.attention_bwd(do, None, q, k, v, out, lse, causal, 0.3, window[0], window[1], dq, dk, dv, True)
    for name, t in dict(dq=dq, dk=dk, dv=dv).items():
        assert_all_written(t, name)


def test_rows_that_see_no_key_give_zeros():
    """Causal with Sq > Sk (bottom-right): the first Sq - Sk rows see no key: out 0, lse -inf,
    finite gradients, on every backend including the reference."""
    for backend in ["torch"] + BACKENDS:
        q, k, v = _rand(1, 2, 9, 16, requires_grad=True), _rand(1, 2, 4, 16, requires_grad=True), _rand(1, 2, 4, 16, requires_grad=True)
        out, lse = fastlm.ops.attention(q, k, v, causal=True, return_lse=True, backend=backend)
        assert torch.equal(out[:, :, :5], torch.zeros_like(out[:, :, :5])), backend
        assert torch.isneginf(lse[:, :, :5]).all() and torch.isfinite(lse[:, :, 5:]).all(), backend
        (out * torch.randn_like(out)).sum().backward()
        for t in (q, k, v):
            assert torch.isfinite(t.grad).all(), backend
        assert torch.equal(q.grad[:, :, :5], torch.zeros_like(q.grad[:, :, :5])), backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_size(backend):
    for B, sq, sk in ((0, 5, 5), (2, 0, 5), (2, 5, 0)):
        q, k, v = _rand(B, 2, sq, 16, requires_grad=True), _rand(B, 1, sk, 16, requires_grad=True), _rand(B, 1, sk, 16, requires_grad=True)
        out, lse = fastlm.ops.attention(q, k, v, causal=True, return_lse=True, backend=backend)
        assert out.shape == q.shape and lse.shape == (B, 2, sq)
        assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
        out.sum().backward()
        assert q.grad.shape == q.shape and torch.equal(q.grad, torch.zeros_like(q))
        assert torch.equal(k.grad, torch.zeros_like(k)) and torch.equal(v.grad, torch.zeros_like(v))


@pytest.mark.parametrize("backend", BACKENDS)
def test_explicit_scale_and_lse_gradient(backend):
    """A non-default scale, and gradients flowing through the returned LSE alone."""
    q, k, v = _rand(1, 2, 33, 32, requires_grad=True), _rand(1, 2, 21, 32, requires_grad=True), _rand(1, 2, 21, 32, requires_grad=True)
    g = torch.randn(1, 2, 33, device=DEVICE)

    def run(fn, *ts):
        ts = [t.detach().clone().requires_grad_() for t in ts]
        out, lse = fn(*ts)
        (lse * g.to(lse.dtype)).sum().backward()
        return [out, lse] + [t.grad for t in ts]

    got = run(lambda a, b, c: fastlm.ops.attention(a, b, c, scale=0.7, return_lse=True, backend=backend), q, k, v)
    base = run(lambda a, b, c: ref.attention(a, b, c, scale=0.7, return_lse=True), q, k, v)
    truth = run(lambda a, b, c: ref.attention(a, b, c, scale=0.7, return_lse=True), q.double(), k.double(), v.double())
    for i, name in enumerate(("out", "lse", "dq", "dk")):
        assert_close(got[i], truth[i], base[i], name=name, factor=GRAD_FACTOR_ATTENTION if i >= 2 else 2.0, dtype=q.dtype)
    assert torch.equal(got[4], torch.zeros_like(got[4]))  # LSE does not depend on v


# ---- the SDPA drop-in ---------------------------------------------------------------------------


def _sdpa_pair(backend, q, k, v, **kw):
    """(fastlm result + grads, torch result + grads) on the same inputs and the same upstream grad."""
    res = []
    for fn in (lambda *a: fastlm.ops.scaled_dot_product_attention(*a, **kw, backend=backend), lambda *a: F.scaled_dot_product_attention(*a, **kw)):
        ts = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = fn(*ts)
        gen = torch.Generator(device=DEVICE).manual_seed(1)
        out.backward(torch.randn(out.shape, generator=gen, device=DEVICE, dtype=out.dtype))
        res.append([out] + [t.grad for t in ts])
    return res


@pytest.mark.parametrize("backend", ["torch"] + BACKENDS)
@pytest.mark.parametrize("sq,sk", [(17, 17), (5, 23), (23, 5), (1, 9), (9, 1)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_sdpa_same_results_as_torch(backend, sq, sk, is_causal):
    """is_causal with Sq != Sk follows torch (top-left), forward and all gradients."""
    q, k, v = _rand(2, 4, sq, 32), _rand(2, 4, sk, 32), _rand(2, 4, sk, 32)
    ours, theirs = _sdpa_pair(backend, q, k, v, is_causal=is_causal)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sdpa_gqa_scale_and_dtypes(backend):
    q, k, v = _rand(1, 6, 19, 64), _rand(1, 2, 30, 64), _rand(1, 2, 30, 64)
    ours, theirs = _sdpa_pair(backend, q, k, v, is_causal=True, scale=0.2, enable_gqa=True)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b)
    # fp16 on the kernels against torch's fp16 (math on CPU): both within the rule of the fp64 truth
    qh, kh, vh = q.half(), k.half(), v.half()
    got = fastlm.ops.scaled_dot_product_attention(qh, kh, vh, is_causal=True, enable_gqa=True, backend=backend)
    torch_h = F.scaled_dot_product_attention(qh.float(), kh.float(), vh.float(), is_causal=True, enable_gqa=True).half()
    truth = F.scaled_dot_product_attention(qh.double(), kh.double(), vh.double(), is_causal=True, enable_gqa=True)
    assert_close(got, truth, torch_h)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sdpa_falls_back_to_torch_exactly_when_documented(backend, monkeypatch):
    """Kernel-served calls never touch torch's function; every other combination is torch's own."""
    calls = []
    real = F.scaled_dot_product_attention

    def spy(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    q, k, v = _rand(1, 2, 8, 16), _rand(1, 2, 8, 16), _rand(1, 2, 8, 16)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    fastlm.ops.scaled_dot_product_attention(q, k, v, is_causal=True, backend=backend)
    fastlm.ops.scaled_dot_product_attention(q, k[:, :1], v[:, :1], enable_gqa=True, backend=backend)
    fastlm.ops.scaled_dot_product_attention(q, k, v, dropout_p=0.5, backend=backend)  # the kernels' dropout (issue 17)
    assert calls == []
    mask = torch.rand(8, 8, device=DEVICE) > 0.3
    mask[:, 0] = True
    fallbacks = [
        dict(args=(q, k, v), kw=dict(attn_mask=mask)),
        dict(args=(q, k, v), kw=dict(attn_mask=torch.randn(8, 8, device=DEVICE))),
        dict(args=(q[0], k[0], v[0]), kw={}),  # 3-D
        dict(args=(q.double(), k.double(), v.double()), kw={}),
        dict(args=(q[..., :12], k[..., :12], v[..., :12]), kw={}),  # head dim 12
        dict(args=(q, k, _rand(1, 2, 8, 24)), kw={}),  # value head dim differs
        dict(args=(q, k[:, :, :0], v[:, :, :0]), kw={}),  # no keys
    ]
    for fb in fallbacks:
        torch.manual_seed(3)
        got = fastlm.ops.scaled_dot_product_attention(*fb["args"], **fb["kw"], backend=backend)
        torch.manual_seed(3)
        want = real(*fb["args"], **fb["kw"])
        torch.testing.assert_close(got, want, equal_nan=True)
    assert len(calls) == len(fallbacks)
    q4 = _rand(1, 4, 8, 16)
    with pytest.raises(RuntimeError, match="size of tensor a"):  # Hq != Hkv without enable_gqa: torch's own error
        fastlm.ops.scaled_dot_product_attention(q4, k, v, backend=backend)
    torch.testing.assert_close(  # Hkv = 1 without enable_gqa: torch broadcasts, so do we (through torch)
        fastlm.ops.scaled_dot_product_attention(q4, k[:, :1], v[:, :1], backend=backend), real(q4, k[:, :1], v[:, :1])
    )


class _TinyBlock(torch.nn.Module):
    """A pre-norm transformer block written against an SDPA function."""

    def __init__(self, sdpa, dim=64, heads=4, kv_heads=2):
        super().__init__()
        self.sdpa, self.heads, self.kv_heads = sdpa, heads, kv_heads
        self.norm = torch.nn.LayerNorm(dim)
        self.q = torch.nn.Linear(dim, dim)
        self.kv = torch.nn.Linear(dim, 2 * dim * kv_heads // heads)
        self.proj = torch.nn.Linear(dim, dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(), torch.nn.Linear(4 * dim, dim))

    def forward(self, x):
        B, S, C = x.shape
        h = self.norm(x)
        q = self.q(h).view(B, S, self.heads, -1).transpose(1, 2)
        k, v = self.kv(h).view(B, S, 2, self.kv_heads, -1).unbind(2)
        y = self.sdpa(q, k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, S, C))
        return x + self.mlp(x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sdpa_in_a_small_torch_model(backend):
    torch_model = torch.nn.Sequential(*[_TinyBlock(F.scaled_dot_product_attention) for _ in range(2)]).to(DEVICE)
    ours = torch.nn.Sequential(
        *[_TinyBlock(lambda *a, **kw: fastlm.ops.scaled_dot_product_attention(*a, **kw, backend=backend)) for _ in range(2)]
    ).to(DEVICE)
    ours.load_state_dict(torch_model.state_dict())
    x = torch.randn(2, 23, 64, device=DEVICE)
    a, b = torch_model(x), ours(x)
    torch.testing.assert_close(b, a)
    g = torch.randn_like(a)
    a.backward(g)
    b.backward(g)
    for (name, p1), p2 in zip(torch_model.named_parameters(), ours.parameters(), strict=True):
        torch.testing.assert_close(p2.grad, p1.grad, msg=name)


# ---- bad input: each error beside a passing positive control -------------------------------------


def test_errors_shapes():
    q, k, v = _rand(2, 4, 8, 16), _rand(2, 2, 8, 16), _rand(2, 2, 8, 16)
    fastlm.ops.attention(q, k, v)
    with pytest.raises(ValueError, match=r"k shape \[2, 2, 8, 16\] != v shape \[2, 2, 9, 16\]"):
        fastlm.ops.attention(q, k, _rand(2, 2, 9, 16))
    with pytest.raises(ValueError, match=r"batch size of k \(1\) != batch size of q \(2\)"):
        fastlm.ops.attention(q, k[:1], v[:1])
    with pytest.raises(ValueError, match=r"head dim of k \(24\) != head dim of q \(16\)"):
        fastlm.ops.attention(q, _rand(2, 2, 8, 24), _rand(2, 2, 8, 24))
    with pytest.raises(ValueError, match=r"must be 4-D \(batch, heads, seq, head_dim\), got shape \[4, 8, 16\]"):
        fastlm.ops.attention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match=r"query heads \(4\) must be a multiple of key/value heads \(3\)"):
        fastlm.ops.attention(q, _rand(2, 3, 8, 16), _rand(2, 3, 8, 16))


def test_errors_head_dim():
    for d in (8, 16, 80, 256):
        fastlm.ops.attention(_rand(1, 1, 3, d), _rand(1, 1, 3, d), _rand(1, 1, 3, d))
    for d in (12, 20, 264, 4):
        with pytest.raises(ValueError, match=f"head dim must be a multiple of 8 between 8 and 256, got {d}"):
            fastlm.ops.attention(_rand(1, 1, 3, d), _rand(1, 1, 3, d), _rand(1, 1, 3, d))


def test_errors_dtype_device_and_options():
    q, k, v = _rand(1, 2, 8, 16), _rand(1, 2, 8, 16), _rand(1, 2, 8, 16)
    fastlm.ops.attention(q, k, v, window=(3, 0), scale=0.5)
    with pytest.raises(TypeError, match="k dtype float16 != q dtype float32"):
        fastlm.ops.attention(q, k.half(), v)
    with pytest.raises(TypeError, match="q must have dtype"):
        fastlm.ops.attention(q.int(), k.int(), v.int())
    with pytest.raises(TypeError, match="v must be a torch.Tensor"):
        fastlm.ops.attention(q, k, v.tolist())
    with pytest.raises(ValueError, match="k is on meta but q is on"):
        fastlm.ops.attention(q, k.to("meta"), v)
    with pytest.raises(ValueError, match="window must be None or a pair"):
        fastlm.ops.attention(q, k, v, window=(-2, 0))
    with pytest.raises(ValueError, match="window must be None or a pair"):
        fastlm.ops.attention(q, k, v, window=4)
    with pytest.raises(ValueError, match="scale must be a finite number"):
        fastlm.ops.attention(q, k, v, scale=float("nan"))
    with pytest.raises(TypeError, match="causal must be a bool"):
        fastlm.ops.attention(q, k, v, causal="yes")
    fastlm.ops.attention(q.double(), k.double(), v.double(), backend="torch")
    if BACKENDS:
        with pytest.raises(TypeError, match="supports float32, float16 and bfloat16"):
            fastlm.ops.attention(q.double(), k.double(), v.double(), backend=BACKENDS[0])
    if not HAS_GPU and fastlm.cuda.load_error("cpu"):
        with pytest.raises(fastlm.BackendUnavailableError, match="backend 'cuda' is unavailable"):
            fastlm.ops.attention(q, k, v, backend="cuda")


# ---- torch integration ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    q = _rand(1, 4, 20, 16, requires_grad=True)
    k = _rand(1, 2, 13, 16, requires_grad=True)
    v = _rand(1, 2, 13, 16, requires_grad=True)
    for causal, wl, wr in ((False, -1, -1), (True, 5, -1)):
        torch.library.opcheck(torch.ops.fastlm.attention_fwd.default, (q, k, v, causal, 0.25, wl, wr, True, backend))
    out, lse = torch.ops.fastlm.attention_fwd(q.detach(), k.detach(), v.detach(), True, 0.25, -1, -1, True, backend)
    do = torch.randn_like(out)
    for dlse in (None, torch.randn_like(lse)):
        torch.library.opcheck(
            torch.ops.fastlm.attention_bwd.default,
            (do, dlse, q.detach(), k.detach(), v.detach(), out, lse, True, 0.25, -1, -1, True, backend),
            test_utils=("test_schema", "test_faketensor"),
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    def f(q, k, v):
        out, lse = fastlm.ops.attention(q, k, v, causal=True, window=(8, -1), return_lse=True, backend=backend)
        y = fastlm.ops.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, backend=backend)
        return out * 2 + y, lse

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if DEVICE == "cpu" else "inductor")
    q, k, v = _rand(1, 4, 24, 32, requires_grad=True), _rand(1, 2, 24, 32, requires_grad=True), _rand(1, 2, 24, 32, requires_grad=True)
    out, lse = compiled(q, k, v)
    want, want_lse = f(q, k, v)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(lse, want_lse)
    g = torch.randn_like(out)
    got_grads = torch.autograd.grad(out, (q, k, v), g)
    want_grads = torch.autograd.grad(want, (q, k, v), g)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b)


# ---- GPU only -------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_backward_deterministic_gpu(backend, dtype):
    """50 backward passes with deterministic=True are bit-identical (GQA, causal, odd lengths)."""
    q, k, v = _rand(2, 8, 1000, 128, dtype=dtype), _rand(2, 2, 1000, 128, dtype=dtype), _rand(2, 2, 1000, 128, dtype=dtype)
    do = torch.randn_like(q)
    first = None
    for _ in range(50):
        ts = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        fastlm.ops.attention(*ts, causal=True, deterministic=True, backend=backend).backward(do)
        grads = [t.grad for t in ts]
        if first is None:
            first = grads
        else:
            for a, b in zip(first, grads, strict=True):
                assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_race_stress_gpu(backend):
    """Batch 60, many repeats: every repeat equals the first bit for bit, and the first matches the
    reference (a race shows up as a repeat that differs)."""
    dt = torch.bfloat16
    q, k, v = _rand(60, 4, 130, 64, dtype=dt), _rand(60, 2, 257, 64, dtype=dt), _rand(60, 2, 257, 64, dtype=dt)
    do = torch.randn_like(q)
    ts = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out0 = fastlm.ops.attention(*ts, causal=True, backend=backend)
    out0.backward(do)
    g0 = [t.grad for t in ts]
    base = ref.attention(q, k, v, causal=True)
    truth = ref.attention(q.float(), k.float(), v.float(), causal=True)
    assert_close(out0, truth, base)
    for _ in range(20):
        ts = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = fastlm.ops.attention(*ts, causal=True, backend=backend)
        out.backward(do)
        assert torch.equal(out, out0)
        for a, t in zip(g0, ts, strict=True):
            assert torch.equal(a, t.grad)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["fwd", "dkdv", "dq"])
def test_every_config_gpu(kernel, monkeypatch):
    """Each autotune candidate computes the same result (the tests otherwise run the first one)."""
    import fastlm.triton.attention as T

    table = T._TABLES[kernel][False]
    original = T.default_config
    for bd, configs in table.items():
        d = {64: 64, 128: 96, 256: 256}[bd]
        q, k, v = _rand(1, 4, 300, d, dtype=torch.float16), _rand(1, 2, 333, d, dtype=torch.float16), _rand(1, 2, 333, d, dtype=torch.float16)
        do = torch.randn_like(q)
        truth = [t.double().requires_grad_() for t in (q, k, v)]
        t_out = ref.attention(*truth, causal=True)
        t_out.backward(do.double())
        base = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        b_out = ref.attention(*base, causal=True)
        b_out.backward(do)
        for bm, bn, w, s in configs:
            cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)
            monkeypatch.setattr(T, "default_config", lambda kind_, bd_, fp32=False, _c=cfg: _c if kind_ == kernel else original(kind_, bd_, fp32))
            ts = [t.detach().clone().requires_grad_() for t in (q, k, v)]
            try:
                out = fastlm.ops.attention(*ts, causal=True, backend="triton")
                out.backward(do)
            except Exception as exc:  # noqa: BLE001 - a config that does not fit this GPU is skipped by the autotuner too
                if "OutOfResources" in type(exc).__name__ or "out of resource" in str(exc):
                    continue
                raise
            assert_close(out, t_out, b_out, name=f"out {cfg}")
            for t, tt, bt, n in zip(ts, truth, base, "qkv", strict=True):
                assert_close(t.grad, tt.grad, bt.grad, name=f"d{n} {cfg}", factor=GRAD_FACTOR_ATTENTION)



# ---- module ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch"] + BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_module_matches_torch_multihead_attention(backend, causal):
    """With num_kv_heads == num_heads, torch.nn.MultiheadAttention's state_dict loads as is and the
    outputs and all parameter gradients match it."""
    E, H, S = 64, 4, 19
    mha = torch.nn.MultiheadAttention(E, H, batch_first=True).to(DEVICE)
    ours = fastlm.nn.MultiheadSelfAttention(E, H, causal=causal, backend=backend).to(DEVICE)
    assert ours.state_dict().keys() == mha.state_dict().keys()
    with torch.no_grad():
        for p in mha.parameters():
            p.normal_(0, 0.2)
    ours.load_state_dict(mha.state_dict())
    x = torch.randn(3, S, E, device=DEVICE)
    g = torch.randn(3, S, E, device=DEVICE)
    mask = torch.ones(S, S, dtype=torch.bool, device=DEVICE).triu(1) if causal else None
    mha64 = copy.deepcopy(mha).double()
    results = []
    for fn, xx in ((ours, x), (lambda t: mha(t, t, t, attn_mask=mask, need_weights=False)[0], x),
                   (lambda t: mha64(t, t, t, attn_mask=mask, need_weights=False)[0], x.double())):
        y = fn(xx)
        y.backward(g.to(y.dtype))
        results.append(y)
    assert_close(results[0], results[2], results[1], name="out")
    for (name, p_torch), p_ours, p64 in zip(mha.named_parameters(), ours.parameters(), mha64.parameters(), strict=True):
        assert_close(p_ours.grad, p64.grad, p_torch.grad, name=name, factor=GRAD_FACTOR_ATTENTION)


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_gqa_window_no_bias(backend):
    E, H, Hkv, S = 96, 6, 2, 23
    m = fastlm.nn.MultiheadSelfAttention(E, H, num_kv_heads=Hkv, bias=False, window=(5, -1), backend=backend).to(DEVICE)
    assert set(m.state_dict()) == {"in_proj_weight", "out_proj.weight"}
    assert m.in_proj_weight.shape == ((H + 2 * Hkv) * 16, E)
    x = torch.randn(2, S, E, device=DEVICE)
    got = m(x)
    qkv = x @ m.in_proj_weight.T
    q, k, v = qkv.split((H * 16, Hkv * 16, Hkv * 16), -1)
    q, k, v = (t.view(2, S, -1, 16).transpose(1, 2) for t in (q, k, v))
    y = ref.attention(q, k, v, causal=True, window=(5, -1))
    torch.testing.assert_close(got, y.transpose(1, 2).reshape(2, S, E) @ m.out_proj.weight.T)
    with pytest.raises(ValueError, match=r"num_heads \(6\) must be a multiple of num_kv_heads \(4\)"):
        fastlm.nn.MultiheadSelfAttention(E, H, num_kv_heads=4)
    with pytest.raises(ValueError, match=r"embed_dim \(96\) must be divisible by num_heads \(5\)"):
        fastlm.nn.MultiheadSelfAttention(E, 5)


def test_autotune_key_has_a_sequence_bucket_regression():
    """The autotuner was keyed on head dim and mask flags only, so a config tuned at 512 tokens served
    16k-token calls; it is now keyed on a power-of-two bucket of max(Sq, Sk) too."""
    import fastlm.triton.attention as T

    for tuned in (T._fwd_tuned, T._dkdv_tuned, T._dq_tuned):
        assert "SEQ_BUCKET" in tuned.keys
    assert [T.seq_bucket(s, s) for s in (1, 128, 129, 4000, 4096, 100000)] == [128, 128, 256, 4096, 4096, 16384]
    assert T.seq_bucket(1, 3000) == T.seq_bucket(3000, 1) == 4096
