import math

import pytest
import torch
from conftest import DEVICE, kernel_backends

import fastlm
from fastlm import cases
from fastlm.ops._common import launcher
from fastlm.reference import sinusoidal as ref
from fastlm.testing import assert_all_written, assert_close, poison_like

BACKENDS = kernel_backends()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "case",
    cases.cases("sinusoidal_position_encoding", DEVICE) + cases.cases("embed_sinusoidal", DEVICE),
    ids=lambda c: f"{c.op}-{c.id}",
)
def test_sinusoidal_matches_reference(case, backend):
    cases.check(case, backend)


def paper_table(n, d, base):
    """The classic PyTorch-tutorial table (float64), written independently of fastlm.reference."""
    position = torch.arange(n, dtype=torch.float64)[:, None]
    div_term = torch.exp(torch.arange(0, d, 2, dtype=torch.float64) * (-math.log(base) / d))
    pe = torch.zeros(n, d, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(position * div_term)
    pe[:, 1::2] = torch.cos(position * div_term[: d // 2])
    return pe


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_paper_formula(backend):
    for n, d in ((50, 64), (9, 33)):
        truth = paper_table(n, d, 10000.0).to(DEVICE)
        torch.testing.assert_close(ref.sinusoidal_position_encoding(torch.arange(n, device=DEVICE), d, 10000.0, torch.float64),
                                   truth, rtol=0, atol=1e-12)
        got = fastlm.ops.sinusoidal_position_encoding(n, d, backend=backend) if DEVICE == "cpu" else \
            fastlm.ops.sinusoidal_position_encoding(torch.arange(n, device=DEVICE), d, backend=backend)
        assert_close(got, truth, ref.sinusoidal_position_encoding(torch.arange(n, device=DEVICE), d, 10000.0, torch.float32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_embed_matches_nn_embedding_plus_table(backend):
    emb = torch.nn.Embedding(37, 48).to(DEVICE)
    ids = torch.randint(0, 37, (3, 11), device=DEVICE)
    got = fastlm.ops.embed_sinusoidal(ids, emb.weight, scale=48**0.5, backend=backend)
    want = emb(ids) * 48**0.5 + fastlm.ops.sinusoidal_position_encoding(torch.arange(11, device=DEVICE), 48, backend="torch")
    torch.testing.assert_close(got, want)


# ---- out-of-range ids ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch"] + BACKENDS)
def test_out_of_range_ids_raise(backend):
    w = torch.randn(10, 8, device=DEVICE)
    fastlm.ops.embed_sinusoidal(torch.tensor([[0, 9]], device=DEVICE), w, backend=backend)
    with pytest.raises(ValueError, match=r"input_ids out of range: found ids in \[0, 10\] but weight has 10 rows"):
        fastlm.ops.embed_sinusoidal(torch.tensor([[0, 10]], device=DEVICE), w, backend=backend)
    with pytest.raises(ValueError, match=r"input_ids out of range: found ids in \[-1, 3\]"):
        fastlm.ops.embed_sinusoidal(torch.tensor([[-1, 3]], device=DEVICE), w, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unchecked_out_of_range_ids_are_never_read(backend):
    """check=False: an out-of-range id gives a NaN row (its load is masked off) and no gradient; the
    other rows are exact."""
    w = torch.randn(10, 8, device=DEVICE, requires_grad=True)
    ids = torch.tensor([[3, 10, 4], [-5, 3, 1 << 40]], device=DEVICE)
    for det in (False, True):
        out = fastlm.ops.embed_sinusoidal(ids, w, check=False, deterministic=det, backend=backend)
        bad = torch.tensor([[False, True, False], [True, False, True]], device=DEVICE)
        assert torch.isnan(out[bad]).all()
        good = ref.embed_sinusoidal(ids.clamp(0, 9), w.detach())
        torch.testing.assert_close(out[~bad], good[~bad])
        dout = torch.randn_like(out)
        (dw,) = torch.autograd.grad(out, w, dout)
        want = torch.zeros_like(w)
        want[3] = dout[0, 0] + dout[1, 1]
        want[4] = dout[0, 2]
        torch.testing.assert_close(dw, want)


# ---- gradient modes -------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_mode(backend, monkeypatch):
    """deterministic=True repeats bit for bit and matches the atomic mode; the default follows
    torch.are_deterministic_algorithms_enabled()."""
    w = torch.randn(7, 40, device=DEVICE, requires_grad=True)
    ids = torch.randint(0, 7, (4, 33), device=DEVICE)
    dout = torch.randn(4, 33, 40, device=DEVICE)

    def grad(**kw):
        out = fastlm.ops.embed_sinusoidal(ids, w, scale=3.0, backend=backend, **kw)
        return torch.autograd.grad(out, w, dout)[0]

    first = grad(deterministic=True)
    for _ in range(3):
        assert torch.equal(grad(deterministic=True), first)
    torch.testing.assert_close(grad(deterministic=False), first)
    seen = []
    mod = launcher(backend, "sinusoidal")
    real = mod.embed_sinusoidal_bwd
    monkeypatch.setattr(mod, "embed_sinusoidal_bwd", lambda *a: (seen.append(a[3]), real(*a))[1])
    grad()
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        grad()
    finally:
        torch.use_deterministic_algorithms(prev)
    assert seen == [False, True]


@pytest.mark.parametrize("backend", BACKENDS)
def test_launchers_write_every_output(backend):
    """NaN-poisoned outputs: the table, the embedding, and every row of dweight (zero rows included)."""
    mod = launcher(backend, "sinusoidal")
    pos = torch.randint(0, 1000, (3, 7), device=DEVICE)
    out = torch.full((3, 7, 33), float("nan"), device=DEVICE)
    mod.sinusoidal_fwd(pos, 10000.0, out)
    assert_all_written(out, "table")
    w = torch.randn(50, 33, device=DEVICE)
    ids = torch.randint(0, 20, (3, 7), device=DEVICE)
    for positions, offset in ((None, 4), (pos[0], 0), (pos, 2)):
        out = poison_like(torch.empty(3, 7, 33, device=DEVICE))
        mod.embed_sinusoidal_fwd(ids, w, positions, offset, 2.0, 10000.0, out)
        assert_all_written(out, "embedding")
    for det in (False, True):
        dw = poison_like(w)
        mod.embed_sinusoidal_bwd(torch.randn(3, 7, 33, device=DEVICE), ids, 2.0, det, dw)
        assert_all_written(dw, "dweight")
        assert torch.equal(dw[20:], torch.zeros_like(dw[20:]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_size(backend):
    w = torch.randn(5, 8, device=DEVICE, requires_grad=True)
    for shape in ((0,), (2, 0)):
        ids = torch.zeros(shape, dtype=torch.int64, device=DEVICE)
        out = fastlm.ops.embed_sinusoidal(ids, w, backend=backend)
        assert out.shape == (*shape, 8)
        out.sum().backward()
        assert torch.equal(w.grad, torch.zeros_like(w))
    assert fastlm.ops.sinusoidal_position_encoding(torch.zeros(0, dtype=torch.int64, device=DEVICE), 6, backend=backend).shape == (0, 6)


# ---- bad input: each error beside a passing positive control ----------------------------------------


def test_errors_embed_sinusoidal():
    w = torch.randn(10, 8, device=DEVICE)
    ids = torch.randint(0, 10, (2, 3), device=DEVICE)
    fastlm.ops.embed_sinusoidal(ids, w, positions=torch.arange(3, device=DEVICE))
    fastlm.ops.embed_sinusoidal(ids, w, positions=torch.zeros(2, 3, dtype=torch.int32, device=DEVICE))
    with pytest.raises(TypeError, match="input_ids must be an integer tensor, got torch.float32"):
        fastlm.ops.embed_sinusoidal(ids.float(), w)
    with pytest.raises(ValueError, match=r"weight must be 2-D \(num_embeddings, embedding_dim\)"):
        fastlm.ops.embed_sinusoidal(ids, w[0])
    with pytest.raises(TypeError, match="weight must have dtype"):
        fastlm.ops.embed_sinusoidal(ids, w.int())
    with pytest.raises(ValueError, match=r"positions must have shape \(S,\) = \(3,\) or input_ids' shape \[2, 3\]; got \[4\]"):
        fastlm.ops.embed_sinusoidal(ids, w, positions=torch.arange(4, device=DEVICE))
    with pytest.raises(TypeError, match="positions must be None, an int offset or an integer tensor"):
        fastlm.ops.embed_sinusoidal(ids, w, positions=torch.arange(3, device=DEVICE).float())
    with pytest.raises(ValueError, match="scale must be None or a finite number"):
        fastlm.ops.embed_sinusoidal(ids, w, scale=float("inf"))
    with pytest.raises(ValueError, match="base must be a finite number > 0"):
        fastlm.ops.embed_sinusoidal(ids, w, base=-1.0)
    with pytest.raises(TypeError, match="supports float32, float16 and bfloat16"):
        fastlm.ops.embed_sinusoidal(ids, w.double(), backend="triton")
    fastlm.ops.embed_sinusoidal(ids, w.double(), backend="torch")
    with pytest.raises(ValueError, match="input_ids is on meta but weight is on"):
        fastlm.ops.embed_sinusoidal(ids.to("meta"), w)


def test_errors_sinusoidal_position_encoding():
    pos = torch.arange(5, device=DEVICE)
    fastlm.ops.sinusoidal_position_encoding(pos, 7)
    with pytest.raises(TypeError, match="positions must be an integer tensor or an int, got torch.float32"):
        fastlm.ops.sinusoidal_position_encoding(pos.float(), 8)
    with pytest.raises(ValueError, match="dim must be a positive int, got 0"):
        fastlm.ops.sinusoidal_position_encoding(pos, 0)
    with pytest.raises(TypeError, match="dtype must be float32, float16, bfloat16 or float64"):
        fastlm.ops.sinusoidal_position_encoding(pos, 8, dtype=torch.int32)
    with pytest.raises(TypeError, match="supports float32, float16 and bfloat16"):
        fastlm.ops.sinusoidal_position_encoding(pos, 8, dtype=torch.float64, backend="triton")
    fastlm.ops.sinusoidal_position_encoding(pos, 8, dtype=torch.float64, backend="torch")


# ---- modules and torch integration ----------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch"] + BACKENDS)
def test_sinusoidal_embedding_module(backend):
    emb = torch.nn.Embedding(30, 24).to(DEVICE)
    m = fastlm.nn.SinusoidalEmbedding(30, 24, scale=2.0, backend=backend).to(DEVICE)
    assert m.state_dict().keys() == emb.state_dict().keys()
    m.load_state_dict(emb.state_dict())
    ids = torch.randint(0, 30, (2, 9), device=DEVICE)
    pe = ref.sinusoidal_position_encoding(torch.arange(9, device=DEVICE) + 4, 24)
    torch.testing.assert_close(m(ids, 4), emb(ids) * 2.0 + pe)
    with pytest.raises(ValueError, match="padding_idx=0 is not supported"):
        fastlm.nn.SinusoidalEmbedding(30, 24, padding_idx=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    pos = torch.randint(0, 99, (2, 5), device=DEVICE)
    w = torch.randn(11, 12, device=DEVICE, requires_grad=True)
    ids = torch.randint(0, 11, (2, 5), device=DEVICE)
    quick = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.fastlm.sinusoidal_fwd.default, (pos, 12, 10000.0, torch.float16, backend), test_utils=quick)
    torch.library.opcheck(torch.ops.fastlm.embed_sinusoidal_fwd.default, (ids, w, pos[0], 0, 2.0, 10000.0, True, False, backend))
    torch.library.opcheck(torch.ops.fastlm.embed_sinusoidal_fwd.default, (ids, w, None, 3, None, 100.0, False, True, backend), test_utils=quick)
    torch.library.opcheck(torch.ops.fastlm.embed_sinusoidal_bwd.default, (torch.randn(2, 5, 12, device=DEVICE), ids, 11, 2.0, True, backend),
                          test_utils=quick)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    m = fastlm.nn.SinusoidalEmbedding(20, 16, scale=4.0, backend=backend).to(DEVICE)

    def f(ids, pos):
        x = m(ids) + fastlm.ops.embed_sinusoidal(ids, m.weight, positions=pos, backend=backend)
        return x * fastlm.ops.sinusoidal_position_encoding(pos, 16, backend=backend)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if DEVICE == "cpu" else "inductor")
    ids = torch.randint(0, 20, (2, 6), device=DEVICE)
    pos = torch.randint(0, 999, (2, 6), device=DEVICE)
    dout = torch.randn(2, 6, 16, device=DEVICE)
    results = []
    for fn in (compiled, f):
        m.weight.grad = None
        out = fn(ids, pos)
        out.backward(dout)
        results.append((out.detach(), m.weight.grad.clone()))
    torch.testing.assert_close(results[0], results[1])
    with pytest.raises(ValueError, match="input_ids out of range"):
        compiled(ids + 20, pos)


def test_cuda_launchers_reject_bad_arguments():
    """fastlm._C's sinusoidal launchers (when built) return CUDA error codes instead of crashing."""
    if fastlm.cuda.load_error():
        pytest.skip(f"fastlm._C is not built here ({fastlm.cuda.load_error()[:80]}...); `make cuda-check` builds it")
    C = fastlm.cuda.lib()
    f = 1 << 20
    fwd = dict(ids=f, ids_bits=64, weight=f, positions=0, pos_bits=0, out=f, T=1, S=1, D=8, V=10, s_it=1, s_is=1,
               s_w0=8, s_w1=1, s_pt=0, s_ps=0, s_ot=8, s_os=8, s_od=1, offset=0, scale=1.0, has_scale=False, base=1e4,
               dtype=0, stream=0)
    for bad in (dict(out=0), dict(ids=0), dict(ids_bits=16), dict(base=0.0), dict(dtype=7), dict(positions=f, pos_bits=8)):
        assert C.embed_sinusoidal_fwd(**{**fwd, **bad}) == 1, bad
    atomic = (f, f, 64, f, 1, 1, 8, 10, 8, 8, 1, 1, 1, 1.0, False, 0, 0)
    assert C.embed_sinusoidal_bwd_atomic(0, *atomic[1:]) == 1
    assert C.embed_sinusoidal_bwd_atomic(*atomic[:2], 32 + 1, *atomic[3:]) == 1
    srt = (f, f, f, f, f, 1, 8, 10, 8, 1, 8, 1.0, False, 0, 0)
    assert C.embed_sinusoidal_bwd_sorted(*srt[:2], 0, *srt[3:]) == 1
    assert C.embed_sinusoidal_bwd_sorted(*srt[:4], 0, *srt[5:]) == 1
    assert C.embed_sinusoidal_bwd_sorted(*srt[:-2], 5, 0) == 1
    if C.device_count() == 0:
        assert C.embed_sinusoidal_fwd(**fwd) != 0
        assert C.embed_sinusoidal_bwd_atomic(*atomic) != 0
        assert C.embed_sinusoidal_bwd_sorted(*srt) != 0


# ---- GPU tier ---------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("case", [c for op in ("sinusoidal_position_encoding", "embed_sinusoidal") for c in cases.cases(op, "cuda", full=True)
                                  if c.params.get("V", 0) >= 32000 or c.params.get("dim", 0) >= 1024], ids=lambda c: f"{c.op}-{c.id}")
def test_gpu_large_shapes(case, backend):
    if fastlm.backend.why_unavailable(backend, "cuda"):
        pytest.fail(f"backend {backend} unavailable on a GPU machine: {fastlm.backend.why_unavailable(backend, 'cuda')}")
    cases.check(case, backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_deterministic_backward_bit_identical(backend):
    w = torch.randn(1000, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ids = torch.randint(0, 50, (8, 1024), device="cuda")  # heavy duplication
    dout = torch.randn(8, 1024, 768, device="cuda", dtype=torch.bfloat16)
    out = fastlm.ops.embed_sinusoidal(ids, w, deterministic=True, backend=backend)
    first = torch.autograd.grad(out, w, dout, retain_graph=True)[0]
    for _ in range(50):
        assert torch.equal(torch.autograd.grad(out, w, dout, retain_graph=True)[0], first)
