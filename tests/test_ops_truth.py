"""Regression tests for issue 13, "Ops (nothing false)": every op's default call under
torch.compile(fullgraph=True), bf16 under the Triton interpreter, exact reference angles at large
positions, in-place rotary under autograd on (B, S, H, D) storage, and the bad-input edge cases."""

import math
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, kernel_backends

import fastlm
from fastlm import backend as _backend
from fastlm.reference import attention as ref_attn
from fastlm.reference import layer_norm as ref_ln
from fastlm.reference import rotary as ref_rot
from fastlm.reference import sinusoidal as ref_sin
from fastlm.testing import ATOL, FACTOR, GRAD_FACTOR_ATTENTION, assert_close, max_error
from fastlm.triton import layer_norm as tln

ops = fastlm.ops
KERNELS = kernel_backends()
ALL = ["torch", *KERNELS]
COMPILE = "aot_eager" if DEVICE == "cpu" else "inductor"


def _rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE, dtype=dtype)


# ---- torch.compile(fullgraph=True) of the default call ---------------------------------------------


def _compile_cases():
    x, r, w, b = _rand(3, 24), _rand(3, 24), _rand(24), _rand(24)
    q, k, v = _rand(1, 2, 5, 16), _rand(1, 1, 7, 16), _rand(1, 1, 7, 16)
    lens = torch.tensor([6], device=DEVICE, dtype=torch.int32)
    cos, sin = _rand(5, 16), _rand(5, 16)
    ids, emb = torch.randint(0, 10, (2, 5), device=DEVICE), _rand(10, 16)
    logits, seed = _rand(3, 20), torch.tensor([5, 6], device=DEVICE)
    xa = _rand(2, 5, 32)
    torch.manual_seed(1)
    modules = {
        "LayerNorm": fastlm.nn.LayerNorm(24).to(DEVICE),
        "RMSNorm": fastlm.nn.RMSNorm(24).to(DEVICE),
        "RotaryEmbedding": fastlm.nn.RotaryEmbedding(),
        "SinusoidalEmbedding": fastlm.nn.SinusoidalEmbedding(10, 16).to(DEVICE),
        "MultiheadSelfAttention": fastlm.nn.MultiheadSelfAttention(32, 2, 1).to(DEVICE),
    }
    return {
        "layer_norm": (lambda: ops.layer_norm(x, (24,), w, b)),
        "rms_norm": (lambda: ops.rms_norm(x, (24,), w)),
        "add_layer_norm": (lambda: ops.add_layer_norm(x, r, w, b)),
        "add_rms_norm": (lambda: ops.add_rms_norm(x, r, w)),
        "attention": (lambda: ops.attention(q, k, v, causal=True, return_lse=True)),
        "scaled_dot_product_attention": (lambda: ops.scaled_dot_product_attention(q, q, q, is_causal=True)),
        "decode_attention": (lambda: ops.decode_attention(q[:, :, :2], k, v, lens)),
        "rotary": (lambda: ops.rotary(q, k[:, :, :5], 3)),
        "rotary_inplace": (lambda: ops.rotary(q.clone(), k[:, :, :5].clone(), 3, inplace=True)),
        "apply_rotary_pos_emb": (lambda: ops.apply_rotary_pos_emb(q, k[:, :, :5], cos, sin)),
        "sinusoidal_position_encoding": (lambda: ops.sinusoidal_position_encoding(ids, 16)),
        "embed_sinusoidal": (lambda: ops.embed_sinusoidal(ids, emb)),
        "sample": (lambda: ops.sample(logits, top_k=4, top_p=0.9, seed=seed, return_logprobs=True)),
        "top_k_top_p_filter": (lambda: ops.top_k_top_p_filter(logits, top_k=4)),
        "sample_default_rng": (lambda: ops.sample(logits)),
        **{f"nn.{n}": (lambda m=m, n=n: _module_call(n, m, x, q, k, ids, xa)) for n, m in modules.items()},
    }


def _module_call(name, m, x, q, k, ids, xa):
    if name in ("LayerNorm", "RMSNorm"):
        return m(x)
    if name == "RotaryEmbedding":
        return m(q, k[:, :, :5], 2)
    if name == "SinusoidalEmbedding":
        return m(ids)
    return m(xa)


COMPILE_CASES = list(_compile_cases())


@pytest.mark.parametrize("case", COMPILE_CASES)
def test_default_call_compiles_fullgraph(case, monkeypatch):
    """Regression (ContextVar.get untraceable): no backend= argument, no use_backend; the compiled
    call equals the eager one."""
    monkeypatch.delenv("FASTLM_BACKEND", raising=False)
    torch._dynamo.reset()
    fn = _compile_cases()[case]
    compiled = torch.compile(fn, fullgraph=True, backend=COMPILE)
    torch.manual_seed(7)
    got = compiled()
    torch.manual_seed(7)
    want = fn()
    got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, equal_nan=True)


def test_compiled_graph_follows_use_backend(monkeypatch):
    """The use_backend stack is guarded: entering or leaving a context after compiling retraces."""
    monkeypatch.delenv("FASTLM_BACKEND", raising=False)
    calls = []
    real = tln.layer_norm_fwd
    monkeypatch.setattr(tln, "layer_norm_fwd", lambda *a: (calls.append(1), real(*a))[1])
    torch._dynamo.reset()
    f = torch.compile(lambda x: ops.layer_norm(x, (8,)), fullgraph=True, backend=COMPILE)
    x = _rand(2, 8)
    default = _backend.default_backend(x.device, "layer_norm")
    f(x)
    n_default = len(calls)
    assert n_default == (1 if default == "triton" else 0)
    with fastlm.use_backend("torch"):
        f(x)
    assert len(calls) == n_default
    with fastlm.use_backend("triton"):
        f(x)
    assert len(calls) == n_default + 1
    f(x)
    assert len(calls) == 2 * n_default + 1


def test_use_backend_is_per_thread():
    seen = []
    with fastlm.use_backend("torch"):
        t = threading.Thread(target=lambda: seen.append(fastlm.current_backend()))
        t.start()
        t.join()
        assert fastlm.current_backend() == "torch"
    assert seen == [None]


def test_compiled_sample_check_raises():
    """check=True under compile: the status read-back is kept in the graph (not dead code)."""
    torch._dynamo.reset()
    f = torch.compile(lambda x: (ops.sample(x, seed=torch.tensor([1, 2], device=DEVICE)),
                                 ops.top_k_top_p_filter(x, top_k=2)), fullgraph=True, backend=COMPILE)
    good = _rand(2, 8)
    f(good)
    bad = good.clone()
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match="row 1 of logits contains NaN"):
        f(bad)


# ---- bf16 (interpreter: computed in fp32, rounded) -------------------------------------------------


BF = torch.bfloat16


def _bf(*shape):
    return _rand(*shape).to(BF)


@pytest.mark.parametrize("backend", KERNELS)
def test_bf16_attention_and_grads(backend):
    q, k, v = _bf(1, 2, 9, 16), _bf(1, 1, 11, 16), _bf(1, 1, 11, 16)
    do = _bf(1, 2, 9, 16)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = ops.attention(*leaves, causal=True, backend=backend)
    grads = torch.autograd.grad(out, leaves, do)
    l64 = [t.double().requires_grad_() for t in (q, k, v)]
    truth = ref_attn.attention(*l64, causal=True)
    g64 = torch.autograd.grad(truth, l64, do.double())
    lbf = [t.clone().requires_grad_() for t in (q, k, v)]
    base = ref_attn.attention(*lbf, causal=True)
    gbf = torch.autograd.grad(base, lbf, do)
    assert_close(out, truth, base, name="out")
    for n, g, t, b in zip("qkv", grads, g64, gbf, strict=True):
        assert_close(g, t, b, name=f"d{n}", factor=GRAD_FACTOR_ATTENTION)


@pytest.mark.parametrize("backend", KERNELS)
def test_bf16_sdpa_and_decode(backend):
    q, k, v = _bf(1, 2, 6, 16), _bf(1, 2, 6, 16), _bf(1, 2, 6, 16)
    out = ops.scaled_dot_product_attention(q, k, v, is_causal=True, backend=backend)
    assert_close(out, F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True),
                 F.scaled_dot_product_attention(q, k, v, is_causal=True))
    kc, vc = _bf(2, 1, 12, 16), _bf(2, 1, 12, 16)
    lens = torch.tensor([12, 5], device=DEVICE, dtype=torch.int32)
    qd = _bf(2, 2, 3, 16)
    out = ops.decode_attention(qd, kc, vc, lens, backend=backend)
    assert_close(out, ref_attn.decode_attention(qd.double(), kc.double(), vc.double(), lens),
                 ref_attn.decode_attention(qd, kc, vc, lens))


@pytest.mark.parametrize("backend", KERNELS)
def test_bf16_norms(backend):
    x, r, w, b = _bf(5, 40), _bf(5, 40), _bf(40), _bf(40)
    for got, fn, args in (
        (ops.layer_norm(x, (40,), w, b, backend=backend), ref_ln.layer_norm, (x, (40,), w, b)),
        (ops.rms_norm(x, (40,), w, 1e-6, backend=backend), ref_ln.rms_norm, (x, (40,), w, 1e-6)),
    ):
        assert_close(got, fn(*[a.double() if torch.is_tensor(a) else a for a in args]), fn(*args))
    y, h = ops.add_rms_norm(x, r, w.float(), backend=backend)
    yb, hb = ref_ln.add_rms_norm(x, r, w.float())
    assert torch.equal(h, hb)  # h = bf16(x + r), exact
    assert_close(y, ref_ln.rms_norm(hb.double(), (40,), w.double(), torch.finfo(BF).eps), yb)
    y, h = ops.add_layer_norm(x, r, w, b, backend=backend)
    yb, hb = ref_ln.add_layer_norm(x, r, w, b)
    assert torch.equal(h, hb)
    assert_close(y, ref_ln.layer_norm(hb.double(), (40,), w.double(), b.double()), yb)


@pytest.mark.parametrize("backend", KERNELS)
def test_bf16_rotary_sinusoidal_sampling(backend):
    q, k = _bf(1, 2, 5, 32), _bf(1, 1, 5, 32)
    pos = torch.tensor([0, 3, 77, 1000, 9], device=DEVICE)
    truth = ref_rot.rotary(q.double(), k.double(), pos, rotary_dim=16)
    base = ref_rot.rotary(q, k, pos, rotary_dim=16)
    for got in (ops.rotary(q, k, pos, rotary_dim=16, backend=backend),
                ops.rotary(q.clone(), k.clone(), pos, rotary_dim=16, inplace=True, backend=backend)):
        for a, t, b in zip(got, truth, base, strict=True):
            assert_close(a, t, b)
    cos, sin = _bf(5, 32), _bf(5, 32)
    got = ops.apply_rotary_pos_emb(q, k, cos, sin, backend=backend)
    for a, t, b in zip(got, ref_rot.apply_rotary_pos_emb(q.double(), k.double(), cos.double(), sin.double()),
                       ref_rot.apply_rotary_pos_emb(q, k, cos, sin), strict=True):
        assert_close(a, t, b)
    assert_close(ops.sinusoidal_position_encoding(pos, 24, dtype=BF, backend=backend),
                 ref_sin.sinusoidal_position_encoding(pos, 24, dtype=torch.float64),
                 ref_sin.sinusoidal_position_encoding(pos, 24, dtype=BF))
    ids, w = torch.randint(0, 7, (2, 5), device=DEVICE), _bf(7, 24)
    assert_close(ops.embed_sinusoidal(ids, w, scale=2.0, backend=backend),
                 ref_sin.embed_sinusoidal(ids, w.double(), scale=2.0), ref_sin.embed_sinusoidal(ids, w, scale=2.0))
    # Sampling is exact (integer masses): the same tokens and filter as the reference.
    logits = _bf(4, 50)
    seed = torch.tensor([11, 3], device=DEVICE)
    tok, lp = ops.sample(logits, temperature=0.7, top_k=9, top_p=0.8, seed=seed, return_logprobs=True, backend=backend)
    tok_r, lp_r = ops.sample(logits, temperature=0.7, top_k=9, top_p=0.8, seed=seed, return_logprobs=True, backend="torch")
    assert torch.equal(tok, tok_r)
    torch.testing.assert_close(lp, lp_r)
    assert torch.equal(ops.top_k_top_p_filter(logits, top_k=5, top_p=0.7, backend=backend),
                       ops.top_k_top_p_filter(logits, top_k=5, top_p=0.7, backend="torch"))


# ---- exact reference angles at large positions -----------------------------------------------------


def _np_rotary(x, pos, theta):
    """Truth in float64 numpy: half-split rotation of x (..., S, D) by pos * theta^(-2p/D)."""
    x = x.double().cpu().numpy()
    D = x.shape[-1]
    inv = theta ** (-np.arange(0, D, 2, dtype=np.float64) / D)
    a = pos.astype(np.float64)[:, None] * inv
    c, s = np.cos(a), np.sin(a)
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return torch.from_numpy(np.concatenate((x1 * c - x2 * s, x2 * c + x1 * s), axis=-1))


@pytest.mark.parametrize("backend", ALL)
def test_reference_angles_exact_at_2_20_and_2_24(backend):
    """Regression: the torch backend formed the angles in fp32 (error 0.011 at 2^20, 1.38 at 2^24).
    Every backend's fp32 error at these positions is within the rule's bound of its error at 0..S."""
    S, D = 16, 64
    q, k = _rand(1, 2, S, D), _rand(1, 1, S, D)

    def errors(offset):
        pos = np.arange(S, dtype=np.int64) + offset
        qo, ko = ops.rotary(q, k, offset, backend=backend)
        rot = max(max_error(qo.cpu(), _np_rotary(q, pos, 10000.0)), max_error(ko.cpu(), _np_rotary(k, pos, 10000.0)))
        pe = ops.sinusoidal_position_encoding(torch.tensor(pos, device=DEVICE), D, backend=backend)
        a = pos.astype(np.float64)[:, None] * 10000.0 ** (-(2 * (np.arange(D) // 2)) / D)
        truth = torch.from_numpy(np.where(np.arange(D) % 2 == 0, np.sin(a), np.cos(a)))
        return rot, max_error(pe.cpu(), truth)

    small = errors(0)
    for offset in (1 << 20, 1 << 24):
        large = errors(offset)
        for what, lg, sm in zip(("rotary", "sinusoidal"), large, small, strict=True):
            assert lg <= FACTOR * sm + ATOL[torch.float32], (what, offset, lg, sm)


# ---- in-place rotary under autograd on (B, S, H, D) storage ------------------------------------------


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("interleaved", [False, True])
def test_inplace_rotary_autograd_on_transposed_views(backend, interleaved):
    """Regression: "If your Function modifies inplace an input that is a view ... cannot return more
    than one Tensor" for q, k = x.transpose(1, 2). Values and gradients equal the out-of-place op's."""
    B, S, Hq, Hk, D = 2, 5, 3, 1, 32
    xq, xk = _rand(B, S, Hq, D).requires_grad_(), _rand(B, S, Hk, D).requires_grad_()
    pos = torch.randint(0, 500, (B, S), device=DEVICE)
    dq, dk = _rand(B, Hq, S, D), _rand(B, Hk, S, D)
    kw = dict(rotary_dim=24, interleaved=interleaved, backend=backend)
    q, k = (xq * 1.0).transpose(1, 2), (xk * 1.0).transpose(1, 2)
    qo, ko = ops.rotary(q, k, pos, inplace=True, **kw)
    assert qo is q and ko is k
    g_in = torch.autograd.grad((qo * dq).sum() + (ko * dk).sum(), (xq, xk))
    qr, kr = ops.rotary(xq.transpose(1, 2), xk.transpose(1, 2), pos, **kw)
    g_out = torch.autograd.grad((qr * dq).sum() + (kr * dk).sum(), (xq, xk))
    torch.testing.assert_close((qo, ko), (qr, kr))
    torch.testing.assert_close(g_in, g_out)


# ---- edge cases ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])
def test_embed_sinusoidal_accepts_every_integer_dtype(dtype):
    """Regression: the torch backend read uint8 ids as a mask and rejected int16."""
    w = _rand(100, 8)
    ids = torch.tensor([[1, 99, 7], [0, 50, 3]], device=DEVICE).to(dtype)
    pos = torch.tensor([4, 0, 9], device=DEVICE).to(dtype)
    want = ref_sin.embed_sinusoidal(ids.long(), w.double(), pos.long())
    for backend in ALL:
        got = ops.embed_sinusoidal(ids, w, positions=pos, backend=backend)
        torch.testing.assert_close(got, want.float(), msg=f"{backend} {dtype}")


def test_negative_ids_are_the_same_on_every_backend():
    """Regression: negative ids wrapped (Python indexing) on the torch backend with check=False.
    check=True: ValueError everywhere; check=False: a NaN row and no gradient everywhere."""
    ids = torch.tensor([[1, -1, 3, 10]], device=DEVICE)
    for backend in ALL:
        w = _rand(10, 8).requires_grad_()
        with pytest.raises(ValueError, match=r"input_ids out of range: found ids in \[-1, 10\]"):
            ops.embed_sinusoidal(ids, w, backend=backend)
        out = ops.embed_sinusoidal(ids, w, check=False, backend=backend)
        assert torch.isnan(out[0, 1]).all() and torch.isnan(out[0, 3]).all(), backend
        torch.testing.assert_close(out[0, [0, 2]], ref_sin.embed_sinusoidal(ids.clamp(0, 9), w.detach())[0, [0, 2]])
        dout = _rand(*out.shape)
        (dw,) = torch.autograd.grad(out, w, dout)
        want = torch.zeros_like(w)
        want[1], want[3] = dout[0, 0], dout[0, 2]
        torch.testing.assert_close(dw, want, msg=backend)


@pytest.mark.parametrize("backend", ALL)
def test_inplace_rotary_rejects_aliased_q_k(backend):
    """Regression: in-place rotary on expanded or overlapping q/k silently gave wrong values on Triton."""
    base = _rand(1, 3, 5, 16)
    cases = [
        ("q and k in separate memory", base[:, :2], base[:, 1:]),
        ("q and k in separate memory", base, base),
        ("q and k in separate memory", base[:, :, :, :8], base[:, :, :, 4:12]),
        ("k to have no overlapping elements", _rand(1, 2, 5, 16), _rand(1, 1, 5, 16).expand(1, 2, 5, 16)),
        ("q to have no overlapping elements", base.as_strided((1, 2, 5, 16), (0, 8, 16, 1)), _rand(1, 1, 5, 16)),
    ]
    for what, q, k in cases:
        with pytest.raises(ValueError, match=f"inplace=True needs {what}"):
            ops.rotary(q, k, 0, inplace=True, backend=backend)
    with torch.enable_grad():  # the autograd path (one Function per tensor) checks too
        q, k = _rand(1, 2, 5, 16).requires_grad_(), _rand(1, 1, 5, 16).requires_grad_()
        with pytest.raises(ValueError, match="k to have no overlapping elements"):
            ops.rotary(q * 1.0, (k * 1.0).expand(1, 2, 5, 16), 0, inplace=True, backend=backend)
        with pytest.raises(ValueError, match="q and k in separate memory"):
            qq = q * 1.0
            ops.rotary(qq, qq, 0, inplace=True, backend=backend)
    # Positive control: q, k, v slices of one fused (B, S, 3H, D) projection are disjoint.
    qkv = _rand(2, 5, 3 * 2, 16)
    want = ops.rotary(qkv[:, :, :2].transpose(1, 2), qkv[:, :, 2:4].transpose(1, 2), 7, backend="torch")
    v_before = qkv[:, :, 4:].clone()
    qo, ko = ops.rotary(qkv[:, :, :2].transpose(1, 2), qkv[:, :, 2:4].transpose(1, 2), 7, inplace=True, backend=backend)
    torch.testing.assert_close((qo, ko), want)
    assert torch.equal(qkv[:, :, 4:], v_before)


@pytest.mark.parametrize("backend", ALL)
def test_decode_ignores_nan_beyond_cache_seqlens(backend):
    """Regression: NaN in the cache beyond cache_seqlens reached the torch backend's output."""
    q, kc, vc = _rand(2, 2, 2, 16), _rand(2, 1, 9, 16), _rand(2, 1, 9, 16)
    lens = torch.tensor([4, 9], device=DEVICE, dtype=torch.int32)
    want = ops.decode_attention(q, kc, vc, lens, backend="torch")
    kc[0, :, 4:], vc[0, :, 4:] = float("nan"), float("inf")
    got = ops.decode_attention(q, kc, vc, lens, backend=backend)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", ALL)
def test_empty_normalized_shape(backend):
    """Regression: normalized_shape=(0,) crashed on Triton; every backend gives torch's empty result."""
    x = _rand(3, 0).requires_grad_()
    w = _rand(0).requires_grad_()
    want = F.layer_norm(x, (0,), w)
    for got in (ops.layer_norm(x, (0,), w, backend=backend), ops.rms_norm(x, (0,), w, backend=backend),
                ops.add_layer_norm(x, x, backend=backend)[0], ops.add_rms_norm(x, x, backend=backend)[1]):
        assert got.shape == want.shape == (3, 0)
        (gx,) = torch.autograd.grad(got.sum(), x)
        assert gx.shape == (3, 0)


def test_int64_overflow_is_a_value_error():
    """Regression: offsets, windows and top_k beyond int64 gave torch.library schema errors."""
    q, k = _rand(1, 2, 5, 16), _rand(1, 1, 5, 16)
    logits = _rand(2, 8)
    lens = torch.tensor([5], device=DEVICE, dtype=torch.int32)
    calls = [
        ("positions offset", lambda b: ops.rotary(q, k, 2**70, backend=b)),
        ("positions offset", lambda b: ops.rotary(q, k, 2**63 - 2, backend=b)),  # + S - 1 overflows
        ("positions offset", lambda b: ops.embed_sinusoidal(torch.zeros(1, 3, dtype=torch.long, device=DEVICE), _rand(4, 8), positions=-(2**64), backend=b)),
        ("top_k", lambda b: ops.sample(logits, top_k=2**64, backend=b)),
        ("top_k", lambda b: ops.top_k_top_p_filter(logits, top_k=2**64, backend=b)),
        ("window side", lambda b: ops.attention(q, k, k, window=(2**70, -1), backend=b)),
        ("window side", lambda b: ops.decode_attention(q[:, :, :1], k, k, lens, window=(2**64, 0), backend=b)),
        ("dim", lambda b: ops.sinusoidal_position_encoding(3, 2**70, backend=b)),
        ("positions", lambda b: ops.sinusoidal_position_encoding(2**64, 8, backend=b)),
    ]
    for backend in ALL:
        for what, call in calls:
            with pytest.raises(ValueError, match=f"{what} must fit in int64"):
                call(backend)
        # Positive controls: the largest values that fit.
        ops.rotary(q, k, 2**63 - 5, backend=backend)
        assert torch.equal(ops.top_k_top_p_filter(logits, top_k=2**63 - 1, backend=backend), logits)
        torch.testing.assert_close(ops.attention(q, k, k, window=(2**63 - 1, 2**63 - 1), backend=backend),
                                   ops.attention(q, k, k, backend=backend))
    assert math.isfinite(float(ops.sample(logits, top_k=2**63 - 1, seed=torch.tensor([1, 2], device=DEVICE))[0]))


@pytest.mark.parametrize("backend", KERNELS)
def test_opcheck_new_ops(backend):
    """The ops added for these fixes pass torch.library.opcheck."""
    q, k = _rand(1, 2, 5, 16), _rand(1, 1, 5, 16)
    pos = torch.randint(0, 50, (5,), device=DEVICE)
    torch.library.opcheck(torch.ops.fastlm.rotary_inplace_one.default, (q.clone(), k, "q", "k", pos, 3, 10000.0, 16, False, backend))
    status = torch.zeros(3, dtype=torch.int64, device=DEVICE)
    torch.library.opcheck(torch.ops.fastlm.check_status.default, (status, _rand(3, 4), "top_k_top_p_filter"))
