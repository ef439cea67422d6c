"""sample / top_k_top_p_filter: exact support and tokens against the sort-based reference, seeded
chi-square tests against the renormalised distribution, determinism, edge cases, bad input.

Statistical tests use fixed seeds (deterministic pass/fail) at a false-alarm rate of 1e-4 each,
with a positive control (a wrong distribution must be rejected) where the draw count gives power.
Draws are cheap rows of one expanded logits row: row b takes counter b of the Philox stream.
"""

import math

import pytest
import torch
from conftest import DEVICE, HAS_GPU, kernel_backends

import fastlm
from fastlm import cases
from fastlm.cases import sampling as sampling_cases
from fastlm.reference import sampling as ref

BACKENDS = kernel_backends()
ALPHA = 1e-4


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny torch ops on a shared 2-core machine run far faster on one intra-op thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _seed(s, off=0):
    return torch.tensor([s, off], dtype=torch.int64, device=DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", cases.cases("sample", DEVICE) + cases.cases("top_k_top_p_filter", DEVICE), ids=lambda c: f"{c.op}-{c.id}")
def test_matches_reference(case, backend):
    cases.check(case, backend)


# ---- statistics ---------------------------------------------------------------------------------


def _distribution(x_row, **kw):
    """The exact distribution the kernels draw from: integer masses over the support, in fp64."""
    z, _, k, p, mp, _, _ = ref.prepare(x_row[None].float(), kw.get("temperature", 1.0), kw.get("top_k"), kw.get("top_p"), kw.get("min_p"))
    keep, _, mass = ref.support(z, k, p, mp)
    m = torch.where(keep, mass, torch.zeros_like(mass))[0].double()
    return m / m.sum()


def _chi_square_p(counts, probs, min_expected=5.0):
    """p-value of Pearson's chi-square, categories (most likely first) merged into bins of
    expected count >= min_expected."""
    n = float(counts.sum())
    order = probs.argsort(descending=True)
    bins_e, bins_c, e_acc, c_acc = [], [], 0.0, 0.0
    for e, c in zip((probs[order] * n).tolist(), counts[order].tolist(), strict=True):
        e_acc += e
        c_acc += c
        if e_acc >= min_expected:
            bins_e.append(e_acc)
            bins_c.append(c_acc)
            e_acc = c_acc = 0.0
    if bins_e:
        bins_e[-1] += e_acc
        bins_c[-1] += c_acc
    e = torch.tensor(bins_e, dtype=torch.float64)
    c = torch.tensor(bins_c, dtype=torch.float64)
    if len(e) < 2:
        return 1.0
    stat = ((c - e) ** 2 / e).sum()
    return float(torch.special.gammaincc(torch.tensor((len(e) - 1) / 2, dtype=torch.float64), stat / 2))


def _draw(backend, x_row, n, seed, **kw):
    x = x_row[None].expand(n, -1)
    return fastlm.ops.sample(x, **kw, seed=_seed(seed), backend=backend).cpu()


def _check_distribution(backend, x_row, n, seed, power=False, **kw):
    V = x_row.shape[0]
    tok = _draw(backend, x_row, n, seed, **kw)
    q = _distribution(x_row.cpu(), **kw)
    counts = torch.bincount(tok, minlength=V).double()
    outside = (counts > 0) & (q == 0)
    assert not outside.any(), f"tokens outside the support: {torch.nonzero(outside).flatten().tolist()[:10]}"
    p = _chi_square_p(counts, q, min_expected=max(5.0, n / 200))
    assert p > ALPHA, f"chi-square p = {p:.2e} <= {ALPHA} (n={n}, V={V}, {kw})"
    if power:  # positive control: a slightly different distribution is rejected
        wrong = _distribution(x_row.cpu(), **{**kw, "temperature": kw.get("temperature", 1.0) * 1.3})
        assert _chi_square_p(counts, wrong) < ALPHA, "the chi-square test has no power here"
    return tok


DRAWS = {7: 20000, 1000: 4000, 50257: 96, 128256: 20000}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dist", ["normal1", "normal5", "halfinf"])
@pytest.mark.parametrize("V", [7, 1000, 50257])
def test_chi_square_unfiltered(backend, V, dist):
    g = torch.Generator().manual_seed(V)
    x = sampling_cases.logits((1, V), dist, torch.float32, DEVICE, g)[0]
    n = DRAWS[V] if not HAS_GPU else 20000
    _check_distribution(backend, x, n, seed=17 + V, power=n >= 4000 and dist != "normal5")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("V", "n", "kw"), [
    (7, 20000, dict(top_k=4)),
    (7, 20000, dict(top_p=0.7, temperature=0.8)),
    (7, 20000, dict(min_p=0.3)),
    (1000, 1000, dict(temperature=1.3, top_k=50, top_p=0.8, min_p=0.02)),
])
def test_chi_square_filtered(backend, V, n, kw):
    g = torch.Generator().manual_seed(3)
    x = sampling_cases.logits((1, V), "normal1", torch.float32, DEVICE, g)[0]
    _check_distribution(backend, x, n, seed=99, **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chi_square_large_vocab_gpu(backend, dtype):
    g = torch.Generator().manual_seed(11)
    x = sampling_cases.logits((1, 128256), "normal5", dtype, DEVICE, g)[0]
    _check_distribution(backend, x, 20000, seed=5, top_p=0.95)
    _check_distribution(backend, x, 20000, seed=6)


# ---- support and edge cases ---------------------------------------------------------------------


def _filter(backend, x, **kw):
    return fastlm.ops.top_k_top_p_filter(x, **kw, backend=backend)


@pytest.mark.parametrize("backend", ["torch"] + BACKENDS)
def test_edge_cases(backend):
    x = torch.tensor([[1.0, 3.0, 3.0, -2.0, 0.5, 3.0, -math.inf, 2.9]], device=DEVICE)
    ninf = float("-inf")
    # k=1 keeps every token tied at the max; k=V and p=1 keep all; tiny p keeps the tied max
    for kw in (dict(top_k=1), dict(top_p=1e-9), dict(min_p=1.0)):
        torch.testing.assert_close(_filter(backend, x, **kw), torch.tensor([[ninf, 3.0, 3.0, ninf, ninf, 3.0, ninf, ninf]], device=DEVICE))
    for kw in (dict(top_k=8), dict(top_k=10**9), dict(top_p=1.0), dict(min_p=0.0), dict()):
        torch.testing.assert_close(_filter(backend, x, **kw), x)
    # ties at the k-th value are all kept (HF's `logits < kth` rule): k=2 keeps the three 3.0s
    torch.testing.assert_close(_filter(backend, x, top_k=2), _filter(backend, x, top_k=1))
    torch.testing.assert_close(_filter(backend, x, top_k=4), torch.tensor([[ninf, 3.0, 3.0, ninf, ninf, 3.0, ninf, 2.9]], device=DEVICE))
    # T=0: argmax, lowest index on ties, log-prob 0
    tok, lp = fastlm.ops.sample(x.expand(4, -1), temperature=0.0, return_logprobs=True, backend=backend)
    assert tok.tolist() == [1, 1, 1, 1] and lp.tolist() == [0.0] * 4
    # k=1 with ties draws among the tied tokens only, all of them
    tok = fastlm.ops.sample(x.expand(300, -1), top_k=1, seed=_seed(4), backend=backend)
    assert set(tok.tolist()) == {1, 2, 5}
    # a single finite token: always drawn, log-prob 0
    y = torch.full((3, 50), ninf, device=DEVICE)
    y[:, 17] = -1e30
    tok, lp = fastlm.ops.sample(y, return_logprobs=True, backend=backend)
    assert tok.tolist() == [17] * 3 and lp.abs().max() == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("slices", [1, 3, 7])
def test_gpu_steps_and_many_slices(backend, slices, monkeypatch):
    """The GPU's 2048-element steps, several steps a slice, several slices a row (histograms and
    statistics met across programs), a ragged last step: the same result."""
    if backend != "triton":
        pytest.skip("a Triton launch-configuration test (the cuda one is in tests/test_sampling_passes.py)")
    from fastlm.triton import sampling as tri

    monkeypatch.setattr(tri, "_block_v", lambda V, device: min(2048, 1 << max(4, (V - 1).bit_length())))
    slicer = tri._slices
    monkeypatch.setattr(tri, "_slices", lambda B, V, block_v, device, n: slicer(B, V, block_v, device, slices if n is None else n))
    g = torch.Generator().manual_seed(slices)
    x = sampling_cases.logits((5, 9001), "ties", torch.float32, DEVICE, g)
    kw = sampling_cases.row_params("rows", 5, 9001, DEVICE, g)
    tok, lp = fastlm.ops.sample(x, **kw, seed=_seed(8, 3), return_logprobs=True, backend=backend)
    rt, rl = ref.sample(x, kw["temperature"], kw["top_k"], kw["top_p"], kw["min_p"], seed=_seed(8, 3))
    assert torch.equal(tok, rt)
    torch.testing.assert_close(lp, rl, atol=1e-5, rtol=0)
    kw.pop("temperature")
    out = _filter(backend, x, **kw)
    assert torch.equal(out, ref.top_k_top_p_filter(x, kw["top_k"], kw["top_p"], kw["min_p"])[0])


@pytest.mark.parametrize("backend", ["torch"] + BACKENDS)
def test_per_row_params_match_rowwise_calls(backend):
    g = torch.Generator().manual_seed(1)
    B, V = 6, 200
    x = sampling_cases.logits((B, V), "normal5", torch.float32, DEVICE, g)
    kw = sampling_cases.row_params("rows", B, V, DEVICE, g)
    out = _filter(backend, x, **{k: v for k, v in kw.items() if k != "temperature"})
    for b in range(B):
        row = _filter(backend, x[b : b + 1], top_k=int(kw["top_k"][b]), top_p=float(kw["top_p"][b]), min_p=float(kw["min_p"][b]))
        assert torch.equal(out[b : b + 1], row), f"row {b}"
    # sampling: a row's draw depends on its index (the Philox counter), so compare against the
    # reference with the same per-row tensors
    tok = fastlm.ops.sample(x, **kw, seed=_seed(2), backend=backend)
    assert torch.equal(tok, ref.sample(x, kw["temperature"], kw["top_k"], kw["top_p"], kw["min_p"], seed=_seed(2))[0])


@pytest.mark.parametrize("backend", ["torch"] + BACKENDS)
def test_determinism_and_generator(backend):
    x = sampling_cases.logits((64, 1000), "normal1", torch.float32, DEVICE, torch.Generator().manual_seed(0))
    g1 = torch.Generator(device=DEVICE).manual_seed(123)
    g2 = torch.Generator(device=DEVICE).manual_seed(123)
    a = fastlm.ops.sample(x, top_k=100, generator=g1, backend=backend)
    b = fastlm.ops.sample(x, top_k=100, generator=g2, backend=backend)
    assert torch.equal(a, b), "same generator state must give the same tokens"
    c = fastlm.ops.sample(x, top_k=100, generator=g1, backend=backend)
    assert (a != c).sum() > 32, "the generator must advance between calls"
    g3 = torch.Generator(device=DEVICE).manual_seed(123)
    torch.randint(-(2**63), 2**63 - 1, (2,), dtype=torch.int64, generator=g3, device=DEVICE)
    assert torch.equal(g2.get_state(), g3.get_state()), "a call advances the generator by one 2-value int64 randint"
    s = fastlm.ops.sample(x, top_k=100, seed=_seed(7, 0), backend=backend)
    assert torch.equal(s, fastlm.ops.sample(x, top_k=100, seed=_seed(7, 0), backend=backend))
    assert (s != fastlm.ops.sample(x, top_k=100, seed=_seed(8, 0), backend=backend)).sum() > 32, "a different seed must differ"
    assert (s != fastlm.ops.sample(x, top_k=100, seed=_seed(7, 1), backend=backend)).sum() > 32, "a different offset must differ"
    torch.manual_seed(5)
    d = fastlm.ops.sample(x, backend=backend)
    torch.manual_seed(5)
    assert torch.equal(d, fastlm.ops.sample(x, backend=backend)), "the default generator is used and seeded by torch.manual_seed"


def test_backends_agree_bitwise():
    """The torch reference and every kernel backend give identical tokens for the same seed."""
    g = torch.Generator().manual_seed(2)
    x = sampling_cases.logits((256, 1000), "normal1", torch.float32, DEVICE, g)
    kw = dict(temperature=0.9, top_k=200, top_p=0.95, min_p=0.001)
    want = fastlm.ops.sample(x, **kw, seed=_seed(31, 9), backend="torch")
    for b in BACKENDS:
        got = fastlm.ops.sample(x, **kw, seed=_seed(31, 9), backend=b)
        assert (got == want).float().mean() >= (1.0 if DEVICE == "cpu" else 0.99), b


def test_philox_known_answers():
    """Philox4x32-10 of the reference against the Random123 known-answer vectors."""
    t = lambda v: torch.tensor([v], dtype=torch.int64)  # noqa: E731
    for ctr, key, want in [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0), (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]:
        got = ref.philox4x32(*map(t, ctr), *map(t, key))
        assert tuple(int(w) for w in got) == want


# ---- layouts, dtypes, outputs ------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_launchers_write_every_output(backend):
    mod = fastlm.ops._common.launcher(backend, "sampling")
    g = torch.Generator().manual_seed(4)
    B, V = 9, 300
    x = sampling_cases.logits((B, V), "halfinf", torch.float32, DEVICE, g)
    tokens = torch.full((B,), -100, dtype=torch.int64, device=DEVICE)
    lp = torch.full((B,), float("nan"), device=DEVICE)
    mod.sample(x, 0.8, 20, 0.9, 0.01, _seed(1), tokens, lp)
    assert (tokens >= 0).all() and torch.isfinite(lp).all()
    out = torch.full_like(x, float("nan"))
    status = torch.full((B,), -100, dtype=torch.int64, device=DEVICE)
    mod.top_k_top_p_filter(x, 20, 0.9, 0.01, out, status)
    assert not torch.isnan(out).any() and (status == 0).all()


@pytest.mark.parametrize("backend", ["torch"] + BACKENDS)
def test_zero_rows_and_strided(backend):
    x = torch.randn(0, 11, device=DEVICE)
    assert fastlm.ops.sample(x, backend=backend).shape == (0,)
    assert fastlm.ops.top_k_top_p_filter(x, top_k=2, backend=backend).shape == (0, 11)
    y = torch.randn(4, 40, device=DEVICE)
    s = y[:, ::2]
    assert torch.equal(fastlm.ops.sample(s, top_p=0.8, seed=_seed(3), backend=backend),
                       fastlm.ops.sample(s.contiguous(), top_p=0.8, seed=_seed(3), backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_filter_gradient(backend):
    x = torch.randn(3, 20, device=DEVICE, requires_grad=True)
    out = fastlm.ops.top_k_top_p_filter(x, top_k=5, backend=backend)
    out.masked_fill(torch.isinf(out), 0.0).sum().backward()
    assert torch.equal(x.grad, torch.isfinite(out).float())


# ---- bad input: each error beside a passing positive control ---------------------------------


def test_errors_scalar_params():
    x = torch.randn(2, 10, device=DEVICE)
    fastlm.ops.sample(x, temperature=0.5, top_k=3, top_p=0.5, min_p=0.1)
    for kw, msg in [
        (dict(temperature=-1.0), r"temperature must be a finite number >= 0"),
        (dict(temperature=float("inf")), r"temperature must be a finite number >= 0"),
        (dict(top_k=0), r"top_k must be >= 1"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(top_p=float("nan")), r"top_p must be in \(0, 1\]"),
        (dict(min_p=-0.1), r"min_p must be in \[0, 1\]"),
        (dict(min_p=2.0), r"min_p must be in \[0, 1\]"),
    ]:
        with pytest.raises(ValueError, match=msg):
            fastlm.ops.sample(x, **kw)
    with pytest.raises(TypeError, match="top_k must be an int or a tensor"):
        fastlm.ops.sample(x, top_k=2.5)
    with pytest.raises(ValueError, match=r"top_k must be >= 1"):
        fastlm.ops.top_k_top_p_filter(x, top_k=-3)


@pytest.mark.parametrize("backend", ["torch"] + BACKENDS)
def test_errors_row_data_and_tensor_params(backend):
    x = torch.randn(4, 10, device=DEVICE)
    fastlm.ops.sample(x, backend=backend)
    bad = x.clone()
    bad[1, 3] = float("nan")
    bad[2] = float("-inf")
    with pytest.raises(ValueError, match=r"row 1 of logits contains NaN.*row 2 of logits is all -inf"):
        fastlm.ops.sample(bad, backend=backend)
    with pytest.raises(ValueError, match=r"row 1 of logits contains NaN"):
        fastlm.ops.top_k_top_p_filter(bad, top_k=2, backend=backend)
    tok = fastlm.ops.sample(bad, check=False, backend=backend)
    assert tok[1] == ref.BAD_LOGITS and tok[2] == ref.ALL_NEG_INF and (tok[[0, 3]] >= 0).all()
    out = fastlm.ops.top_k_top_p_filter(bad, top_k=2, check=False, backend=backend)
    assert torch.isnan(out[1:3]).all() and not torch.isnan(out[[0, 3]]).any()
    inf = x.clone()
    inf[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"row 0 of logits contains NaN or \+inf"):
        fastlm.ops.sample(inf, backend=backend)
    with pytest.raises(ValueError, match=r"row 0 of logits contains NaN or \+inf"):
        fastlm.ops.sample(x * 1e38, temperature=1e-3, backend=backend)
    ok = dict(temperature=torch.ones(4, device=DEVICE), top_k=torch.full((4,), 3, device=DEVICE),
              top_p=torch.full((4,), 0.5, device=DEVICE), min_p=torch.zeros(4, device=DEVICE))
    fastlm.ops.sample(x, **ok, backend=backend)
    for name, value, msg in [
        ("temperature", -1.0, "has a temperature that is not a finite number >= 0"),
        ("top_k", 0, "has top_k < 1"),
        ("top_p", 0.0, r"has top_p outside \(0, 1\]"),
        ("min_p", 1.5, r"has min_p outside \[0, 1\]"),
    ]:
        kw = {k: v.clone() for k, v in ok.items()}
        kw[name][2] = value
        with pytest.raises(ValueError, match=rf"row 2 of logits {msg}"):
            fastlm.ops.sample(x, **kw, backend=backend)
        assert fastlm.ops.sample(x, **kw, check=False, backend=backend)[2] < 0


def test_errors_shapes_devices_types():
    x = torch.randn(3, 10, device=DEVICE)
    with pytest.raises(ValueError, match=r"must be a number or a tensor of shape \(3,\)"):
        fastlm.ops.sample(x, top_k=torch.ones(4, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match=r"top_p is on meta but logits is on"):
        fastlm.ops.sample(x, top_p=torch.ones(3, device="meta"))
    with pytest.raises(TypeError, match=r"top_k must have dtype"):
        fastlm.ops.sample(x, top_k=torch.ones(3, device=DEVICE))
    with pytest.raises(ValueError, match=r"logits must have shape \(B, V\)"):
        fastlm.ops.sample(torch.randn(10, device=DEVICE))
    with pytest.raises(ValueError, match="empty vocabulary"):
        fastlm.ops.sample(torch.randn(2, 0, device=DEVICE))
    with pytest.raises(TypeError, match="logits must have dtype"):
        fastlm.ops.sample(x.to(torch.int32))
    with pytest.raises(ValueError, match="pass generator or seed, not both"):
        fastlm.ops.sample(x, generator=torch.Generator(device=DEVICE), seed=_seed(1))
    with pytest.raises(ValueError, match=r"seed must be an int64 tensor \[seed, offset\]"):
        fastlm.ops.sample(x, seed=torch.zeros(3, dtype=torch.int64, device=DEVICE))
    if BACKENDS:
        with pytest.raises(TypeError, match="supports float32, float16 and bfloat16"):
            fastlm.ops.sample(x.double(), backend=BACKENDS[0])
    fastlm.ops.sample(x.double(), backend="torch")


# ---- torch integration --------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    x = torch.randn(4, 50, device=DEVICE)
    seed = _seed(3)
    T = torch.rand(4, device=DEVICE) + 0.5
    k = torch.tensor([1, 5, 50, 7], device=DEVICE)
    for args in ((x, seed, None, None, None, None, 1.0, 5, 0.9, None, True, backend),
                 (x, seed, T, k, None, None, None, None, None, 0.1, False, backend)):
        torch.library.opcheck(torch.ops.fastlm.sample.default, args)
    torch.library.opcheck(torch.ops.fastlm.top_k_top_p_filter.default, (x, k, None, None, None, 0.8, None, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    def f(x, seed, k):
        tok, lp = fastlm.ops.sample(x, temperature=0.8, top_k=k, top_p=0.9, seed=seed, return_logprobs=True, check=False, backend=backend)
        return tok, lp, fastlm.ops.top_k_top_p_filter(x, top_k=k, check=False, backend=backend)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if DEVICE == "cpu" else "inductor")
    x = torch.randn(4, 64, device=DEVICE)
    k = torch.tensor([1, 3, 64, 10], device=DEVICE)
    got, want = compiled(x, _seed(9), k), f(x, _seed(9), k)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_cuda_backend_rejects_vocab_beyond_its_limit():
    """csrc/sampling.cu keeps int64 fixed-point masses: a vocabulary over 2^22 is refused with a
    clear error before any launch (no GPU needed to check it), and 2^22 itself is accepted."""
    from fastlm.cuda import sampling as cs

    too_big = torch.zeros(1, 1).expand(1, cs.MAX_VOCAB + 1)
    with pytest.raises(ValueError, match=r"vocabulary of at most 4194304, got 4194305"):
        cs.sample(too_big, None, None, None, None, None, torch.empty(1, dtype=torch.int64), None)
    empty = torch.zeros(0, cs.MAX_VOCAB)
    cs.sample(empty, None, None, None, None, None, torch.empty(0, dtype=torch.int64), None)
