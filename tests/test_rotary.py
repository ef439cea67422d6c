import math

import pytest
import torch
from conftest import DEVICE, kernel_backends

import fastlm
from fastlm import cases
from fastlm.ops._common import launcher
from fastlm.reference import rotary as ref
from fastlm.testing import ATOL, FACTOR, assert_all_written, assert_close, max_error, poison_like

BACKENDS = kernel_backends()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "case", cases.cases("rotary", DEVICE) + cases.cases("apply_rotary_pos_emb", DEVICE), ids=lambda c: f"{c.op}-{c.id}"
)
def test_rotary_matches_reference(case, backend):
    cases.check(case, backend)


# ---- independent formulations ----------------------------------------------------------------------


def hf_rotate_half(x):
    """Hugging Face Llama's rotate_half, written out independently of fastlm.reference."""
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def hf_cos_sin(position_ids, dim, base, dtype):
    """LlamaRotaryEmbedding.forward: emb = cat(freqs, freqs), freqs = inv_freq x position_ids."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype) / dim))
    freqs = (inv_freq[None, :, None].expand(position_ids.shape[0], -1, 1) @ position_ids[:, None, :].to(dtype)).transpose(1, 2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def hf_apply(q, k, cos, sin, unsqueeze_dim=1):
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + hf_rotate_half(q) * sin, k * cos + hf_rotate_half(k) * sin


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_independent_hf_rotate_half(backend):
    """rotary (angles in the kernel) and apply_rotary_pos_emb (tables) against an independent HF-style
    implementation in float64; fastlm's own reference agrees with it to float64 rounding."""
    B, Hq, Hk, S, D = 2, 3, 1, 7, 80
    q = torch.randn(B, Hq, S, D, device=DEVICE)
    k = torch.randn(B, Hk, S, D, device=DEVICE)
    pos = torch.randint(0, 140000, (B, S), device=DEVICE)
    truth = hf_apply(q.double(), k.double(), *hf_cos_sin(pos, D, 10000.0, torch.float64))
    torch_fp32 = hf_apply(q, k, *hf_cos_sin(pos, D, 10000.0, torch.float32))
    ours64 = ref.rotary(q.double(), k.double(), pos)
    for a, t in zip(ours64, truth, strict=True):
        torch.testing.assert_close(a, t, rtol=0, atol=1e-12)
    got = fastlm.ops.rotary(q, k, pos, backend=backend)
    for name, a, t, b in zip("qk", got, truth, torch_fp32, strict=True):
        assert_close(a, t, b, name=f"rotary {name} vs HF")
    cos, sin = hf_cos_sin(pos, D, 10000.0, torch.float32)
    got = fastlm.ops.apply_rotary_pos_emb(q, k, cos, sin, backend=backend)
    truth = hf_apply(q.double(), k.double(), cos.double(), sin.double())
    for name, a, t, b in zip("qk", got, truth, hf_apply(q, k, cos, sin), strict=True):
        assert_close(a, t, b, name=f"apply_rotary_pos_emb {name} vs HF")


def gptj_complex(x, pos, rotary_dim, base):
    """GPT-J interleaved pairs as complex numbers: (x[2p] + i x[2p+1]) * exp(i pos base^(-2p/R))."""
    xr = x[..., :rotary_dim]
    xc = torch.view_as_complex(xr.reshape(*xr.shape[:-1], rotary_dim // 2, 2).contiguous())
    ang = pos.double()[:, None, :, None] * base ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64, device=x.device) / rotary_dim)
    out = torch.view_as_real(xc * torch.polar(torch.ones_like(ang), ang)).flatten(-2)
    return torch.cat((out, x[..., rotary_dim:]), dim=-1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_interleaved_matches_complex_multiplication(backend):
    B, H, S, D, R = 3, 2, 7, 96, 64
    q = torch.randn(B, H, S, D, device=DEVICE)
    k = torch.randn(B, 1, S, D, device=DEVICE)
    pos = torch.randint(0, 5000, (B, S), device=DEVICE)
    got = fastlm.ops.rotary(q, k, pos, rotary_dim=R, interleaved=True, backend=backend)
    base = ref.rotary(q, k, pos, rotary_dim=R, interleaved=True)
    for name, x, a, b in zip("qk", (q, k), got, base, strict=True):
        assert_close(a, gptj_complex(x.double(), pos, R, 10000.0), b, name=f"interleaved {name}")


def _fp32_angle_rotary(x, pos):
    """What fp32 angle math (pos * inv_freq in fp32) would give: the cliff the kernels avoid."""
    a = pos.float()[:, None] * ref.inv_freq(x.shape[-1], 10000.0, device=x.device)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * a.cos() - x2 * a.sin(), x2 * a.cos() + x1 * a.sin()), dim=-1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_precision_cliff_at_large_positions(backend):
    """fp32: the kernel's error at positions around 131072 and 2^20 is no larger than at positions
    0..S (by the tolerance rule's form), while fp32 angle math would be far off there."""
    B, H, S, D = 1, 2, 64, 128
    q = torch.randn(B, H, S, D, device=DEVICE)
    k = torch.randn(B, H, S, D, device=DEVICE)

    def err(offset):
        pos = torch.arange(S, device=DEVICE) + offset
        got = fastlm.ops.rotary(q, k, pos, backend=backend)
        truth = ref.rotary(q.double(), k.double(), pos)
        fp32_angles = [_fp32_angle_rotary(x, pos) for x in (q, k)]
        return max(max_error(g, t) for g, t in zip(got, truth, strict=True)), max(max_error(g, t) for g, t in zip(fp32_angles, truth, strict=True))

    small, _ = err(0)
    for offset in (131072 - S // 2, (1 << 20) - S):
        large, fp32_large = err(offset)
        assert large <= FACTOR * small + ATOL[torch.float32], (offset, large, small)
        assert fp32_large > 20 * large  # the check would see an fp32-angle kernel


# ---- layouts, in place, positions ------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_on_strided_view_touches_only_the_view(backend):
    buf_q = torch.randn(2, 4, 9, 40, device=DEVICE)
    buf_k = torch.randn(2, 9, 2, 40, device=DEVICE)
    q = buf_q[:, 1:4, ::2, 4:36]  # (2, 3, 5, 32), non-contiguous
    k = buf_k[:, ::2, :, 4:36].transpose(1, 2)  # (2, 2, 5, 32), (B, S, H, D) storage
    pos = torch.randint(0, 100, (5,), device=DEVICE)
    expect = fastlm.ops.rotary(q, k, pos, rotary_dim=16, backend="torch")
    before_q, before_k = buf_q.clone(), buf_k.clone()
    qo, ko = fastlm.ops.rotary(q, k, pos, rotary_dim=16, inplace=True, backend=backend)
    assert qo is q and ko is k
    for a, t, b in zip((qo, ko), ref.rotary(q.double(), k.double(), pos, rotary_dim=16), expect, strict=True):
        assert_close(a, t, b.to(a.dtype))
    mask_q = torch.ones_like(buf_q, dtype=torch.bool)
    mask_q[:, 1:4, ::2, 4:20] = False
    mask_k = torch.ones_like(buf_k, dtype=torch.bool)
    mask_k[:, ::2, :, 4:20] = False
    assert torch.equal(buf_q[mask_q], before_q[mask_q]) and torch.equal(buf_k[mask_k], before_k[mask_k])


@pytest.mark.parametrize("backend", BACKENDS)
def test_position_forms_agree(backend):
    """An int offset, a 0-d tensor, (S,), (1, S), (B, S), int32 and int64 give identical results."""
    B, S = 3, 7
    q = torch.randn(B, 2, S, 16, device=DEVICE)
    k = torch.randn(B, 1, S, 16, device=DEVICE)
    ar = torch.arange(S, device=DEVICE) + 11
    first = fastlm.ops.rotary(q, k, 11, backend=backend)
    for pos in (torch.tensor(11, device=DEVICE), ar, ar.int(), ar[None], ar.expand(B, S), ar.expand(B, S).contiguous().int()):
        got = fastlm.ops.rotary(q, k, pos, backend=backend)
        assert torch.equal(got[0], first[0]) and torch.equal(got[1], first[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_bshd_storage_with_unsqueeze_dim_2(backend):
    """q, k stored (B, S, H, D): apply_rotary_pos_emb(unsqueeze_dim=2) equals the (B, H, S, D) call, and
    rotary on the transposed view returns the same layout."""
    q = torch.randn(2, 7, 3, 32, device=DEVICE)
    k = torch.randn(2, 7, 1, 32, device=DEVICE)
    cos, sin = hf_cos_sin(torch.randint(0, 99, (2, 7), device=DEVICE), 32, 10000.0, torch.float32)
    a = fastlm.ops.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2, backend=backend)
    b = fastlm.ops.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin, backend=backend)
    assert a[0].shape == q.shape and torch.equal(a[0], b[0].transpose(1, 2)) and torch.equal(a[1], b[1].transpose(1, 2))
    qo, _ = fastlm.ops.rotary(q.transpose(1, 2), k.transpose(1, 2), 0, backend=backend)
    assert qo.stride() == q.transpose(1, 2).stride()


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_size(backend):
    for qs, ks in (((0, 2, 5, 16), (0, 1, 5, 16)), ((2, 2, 0, 16), (2, 1, 0, 16)), ((2, 0, 5, 16), (2, 1, 5, 16))):
        q = torch.randn(qs, device=DEVICE, requires_grad=True)
        k = torch.randn(ks, device=DEVICE, requires_grad=True)
        qo, ko = fastlm.ops.rotary(q, k, 0, backend=backend)
        assert qo.shape == q.shape and ko.shape == k.shape
        (qo.sum() + ko.sum()).backward()
        assert q.grad.shape == q.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_launchers_write_every_output(backend):
    """NaN-poisoned outputs: every element (pass-through dims included) is written, fwd and bwd,
    angle and table forms."""
    mod = launcher(backend, "rotary")
    B, S, D, R = 2, 7, 80, 48
    q = torch.randn(B, 3, S, D, device=DEVICE)
    k = torch.randn(B, 1, S, D, device=DEVICE)
    cos, sin = torch.randn(B, S, R, device=DEVICE), torch.randn(1, S, R, device=DEVICE)
    for pos in (None, torch.randint(0, 50, (B, S), device=DEVICE)):
        for interleaved in (False, True):
            for fn in (mod.rotary_fwd, mod.rotary_bwd):
                qo, ko = poison_like(q), poison_like(k)
                fn(q, k, pos, 3, 10000.0, R, interleaved, qo, ko)
                assert_all_written(qo, "q_out")
                assert_all_written(ko, "k_out")
                assert torch.equal(qo[..., R:], q[..., R:])
    for fn in (mod.rotary_table_fwd, mod.rotary_table_bwd):
        qo, ko = poison_like(q), poison_like(k)
        fn(q, k, cos, sin, qo, ko)
        assert_all_written(qo, "q_out")
        assert_all_written(ko, "k_out")


# ---- bad input: each error beside a passing positive control ----------------------------------------


def test_errors_rotary_dim():
    q, k = torch.randn(1, 2, 3, 16, device=DEVICE), torch.randn(1, 2, 3, 16, device=DEVICE)
    fastlm.ops.rotary(q, k, 0, rotary_dim=8)
    with pytest.raises(ValueError, match="rotary_dim must be even and positive, got 7"):
        fastlm.ops.rotary(q, k, 0, rotary_dim=7)
    with pytest.raises(ValueError, match="rotary_dim must be even and positive, got 0"):
        fastlm.ops.rotary(q, k, 0, rotary_dim=0)
    fastlm.ops.rotary(q, k, 0, rotary_dim=16)
    with pytest.raises(ValueError, match="rotary_dim 18 must be <= head_dim 16"):
        fastlm.ops.rotary(q, k, 0, rotary_dim=18)
    q7, k7 = torch.randn(1, 2, 3, 7, device=DEVICE), torch.randn(1, 2, 3, 7, device=DEVICE)
    fastlm.ops.rotary(q7, k7, 0, rotary_dim=6)
    with pytest.raises(ValueError, match="rotary_dim must be even; it defaults to head_dim, which is 7"):
        fastlm.ops.rotary(q7, k7, 0)
    with pytest.raises(TypeError, match="rotary_dim must be an int or None"):
        fastlm.ops.rotary(q, k, 0, rotary_dim=8.0)


def test_errors_positions():
    q, k = torch.randn(2, 2, 3, 16, device=DEVICE), torch.randn(2, 1, 3, 16, device=DEVICE)
    fastlm.ops.rotary(q, k, torch.arange(3, device=DEVICE))
    with pytest.raises(TypeError, match="positions must be an integer tensor"):
        fastlm.ops.rotary(q, k, torch.arange(3, device=DEVICE).float())
    with pytest.raises(TypeError, match="positions must be an integer tensor"):
        fastlm.ops.rotary(q, k, torch.ones(3, dtype=torch.bool, device=DEVICE))
    with pytest.raises(TypeError, match="positions must be an integer tensor of shape"):
        fastlm.ops.rotary(q, k, 1.5)
    with pytest.raises(TypeError, match="positions must be an integer tensor of shape"):
        fastlm.ops.rotary(q, k, [0, 1, 2])
    fastlm.ops.rotary(q, k, torch.zeros(2, 3, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match=r"positions must have shape \(S,\) = \(3,\) or \(B, S\) = \(2, 3\); got \[4\]"):
        fastlm.ops.rotary(q, k, torch.arange(4, device=DEVICE))
    with pytest.raises(ValueError, match="positions must have shape"):
        fastlm.ops.rotary(q, k, torch.zeros(3, 3, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="positions is on meta but q is on"):
        fastlm.ops.rotary(q, k, torch.arange(3, device="meta"))


def test_errors_q_k():
    q, k = torch.randn(2, 4, 3, 16, device=DEVICE), torch.randn(2, 2, 3, 16, device=DEVICE)
    fastlm.ops.rotary(q, k, 0)
    with pytest.raises(ValueError, match="must agree in batch, seq and head_dim"):
        fastlm.ops.rotary(q, k[:, :, :2], 0)
    with pytest.raises(ValueError, match="q and k must be 4-D"):
        fastlm.ops.rotary(q[0], k[0], 0)
    with pytest.raises(TypeError, match="k dtype torch.float16 != q dtype torch.float32"):
        fastlm.ops.rotary(q, k.half(), 0)
    with pytest.raises(TypeError, match="q must have dtype"):
        fastlm.ops.rotary(q.int(), k.int(), 0)
    with pytest.raises(TypeError, match="supports float32, float16 and bfloat16"):
        fastlm.ops.rotary(q.double(), k.double(), 0, backend="triton")
    fastlm.ops.rotary(q.double(), k.double(), 0, backend="torch")
    with pytest.raises(ValueError, match="theta must be a finite number > 0"):
        fastlm.ops.rotary(q, k, 0, theta=0.0)
    with pytest.raises(ValueError, match="inplace=True needs q and k in separate memory"):
        fastlm.ops.rotary(q, q, 0, inplace=True)
    fastlm.ops.rotary(q, q, 0)
    if DEVICE == "cpu" and fastlm.cuda.load_error("cpu"):
        with pytest.raises(fastlm.BackendUnavailableError, match="backend 'cuda' is unavailable"):
            fastlm.ops.rotary(q, k, 0, backend="cuda")


def test_errors_apply_rotary_pos_emb():
    q, k = torch.randn(2, 4, 3, 16, device=DEVICE), torch.randn(2, 2, 3, 16, device=DEVICE)
    cos, sin = torch.randn(2, 3, 16, device=DEVICE), torch.randn(2, 3, 16, device=DEVICE)
    fastlm.ops.apply_rotary_pos_emb(q, k, cos, sin)
    fastlm.ops.apply_rotary_pos_emb(q, k, cos[:, :, :8], sin[:, :, :8])
    with pytest.raises(ValueError, match="unsqueeze_dim must be 1"):
        fastlm.ops.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=0)
    with pytest.raises(ValueError, match=r"cos and sin must have shape \(B, S, R\) = \(2, 3, R\) or \(S, R\)"):
        fastlm.ops.apply_rotary_pos_emb(q, k, cos[:, :2], sin[:, :2])
    with pytest.raises(ValueError, match="cos .* and sin .* must have the same shape"):
        fastlm.ops.apply_rotary_pos_emb(q, k, cos, sin[:1])
    with pytest.raises(ValueError, match=r"cos.shape\[-1\] = 7 must be even"):
        fastlm.ops.apply_rotary_pos_emb(q, k, cos[..., :7], sin[..., :7])
    with pytest.raises(ValueError, match=r"cos.shape\[-1\] = 18 must be even, positive and <= head_dim 16"):
        c = torch.randn(2, 3, 18, device=DEVICE)
        fastlm.ops.apply_rotary_pos_emb(q, k, c, c)
    with pytest.raises(TypeError, match="cos must have dtype"):
        fastlm.ops.apply_rotary_pos_emb(q, k, cos.int(), sin)


# ---- modules and torch integration ----------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch"] + BACKENDS)
def test_rotary_embedding_module(backend):
    m = fastlm.nn.RotaryEmbedding(32, theta=500000.0, backend=backend)
    assert m.state_dict() == {}
    q, k = torch.randn(2, 4, 5, 64, device=DEVICE), torch.randn(2, 2, 5, 64, device=DEVICE)
    got = m(q, k, 3)
    want = ref.rotary(q, k, 3, theta=500000.0, rotary_dim=32)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    q = torch.randn(2, 3, 5, 24, device=DEVICE, requires_grad=True)
    k = torch.randn(2, 1, 5, 24, device=DEVICE, requires_grad=True)
    pos = torch.randint(0, 9, (2, 5), device=DEVICE)
    quick = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.fastlm.rotary_fwd.default, (q, k, pos, 0, 10000.0, 24, False, backend))
    torch.library.opcheck(torch.ops.fastlm.rotary_fwd.default, (q, k, None, 7, 500.0, 16, True, backend), test_utils=quick)
    torch.library.opcheck(torch.ops.fastlm.rotary_bwd.default, (q.detach(), k.detach(), pos, 0, 10000.0, 16, True, backend), test_utils=quick)
    torch.library.opcheck(torch.ops.fastlm.rotary_inplace.default, (q.detach().clone(), k.detach().clone(), pos, 0, 10000.0, 16, False, backend))
    cos = torch.randn(1, 5, 16, device=DEVICE, requires_grad=True)
    sin = torch.randn(1, 5, 16, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.fastlm.rotary_table_fwd.default, (q, k, cos, sin, backend))
    torch.library.opcheck(torch.ops.fastlm.rotary_table_bwd.default, (q.detach(), k.detach(), cos.detach(), sin.detach(), backend),
                          test_utils=quick)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    rope = fastlm.nn.RotaryEmbedding(backend=backend)

    def f(q, k, pos, cos, sin):
        qa, ka = fastlm.ops.rotary(q, k, pos, rotary_dim=16, backend=backend)
        qb, kb = rope(qa * 2.0, ka * 2.0, 5, inplace=True)
        qc, kc = fastlm.ops.apply_rotary_pos_emb(qb, kb, cos, sin, backend=backend)
        return qc.sum(-1) + kc.sum((1, -1))[:, None]

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if DEVICE == "cpu" else "inductor")
    leaves = [torch.randn(2, 3, 5, 32, device=DEVICE), torch.randn(2, 1, 5, 32, device=DEVICE)]
    pos = torch.randint(0, 99, (5,), device=DEVICE)
    cos, sin = hf_cos_sin(pos[None].expand(2, 5), 32, 10000.0, torch.float32)
    grads = []
    for fn in (compiled, f):
        ls = [t.clone().requires_grad_() for t in leaves]
        out = fn(*ls, pos, cos, sin)
        out.backward(torch.ones_like(out))
        grads.append([out.detach()] + [t.grad for t in ls])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_cuda_launcher_rejects_bad_arguments():
    """fastlm._C.rotary (when built) returns CUDA error codes instead of crashing: invalid arguments
    give cudaErrorInvalidValue (1), and without a GPU a well-formed launch reports the runtime's error."""
    if fastlm.cuda.load_error():
        pytest.skip(f"fastlm._C is not built here ({fastlm.cuda.load_error()[:80]}...); `make cuda-check` builds it")
    C = fastlm.cuda.lib()
    fake = 1 << 20
    args = dict(q=fake, k=fake, q_out=fake, k_out=fake, positions=0, pos_bits=0, cos=0, sin=0, table_dtype=0, B=1, S=1,
                HQ=1, HK=1, D=16, rotary_dim=16, strides=[0] * 24, offset=0, theta=1e4, interleaved=False,
                backward=False, dtype=0, stream=0)
    for bad in (dict(q=0), dict(rotary_dim=15), dict(rotary_dim=18), dict(strides=[0] * 23), dict(dtype=7),
                dict(positions=fake, pos_bits=16), dict(cos=fake), dict(theta=0.0)):
        assert C.rotary(**{**args, **bad}) == 1, bad
    assert C.rotary(**{**args, "S": 0}) == 0
    if C.device_count() == 0:
        assert C.rotary(**args) != 0


# ---- GPU tier ---------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("case", [c for op in ("rotary", "apply_rotary_pos_emb") for c in cases.cases(op, "cuda", full=True) if c.params["S"] >= 1023],
                         ids=lambda c: f"{c.op}-{c.id}")
def test_gpu_large_shapes(case, backend):
    if fastlm.backend.why_unavailable(backend, "cuda"):
        pytest.fail(f"backend {backend} unavailable on a GPU machine: {fastlm.backend.why_unavailable(backend, 'cuda')}")
    cases.check(case, backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_bf16_large_positions(backend):
    q = torch.randn(2, 8, 333, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 2, 333, 128, device="cuda", dtype=torch.bfloat16)
    pos = torch.randint(0, 1 << 20, (2, 333), device="cuda")
    got = fastlm.ops.rotary(q, k, pos, backend=backend)
    truth = ref.rotary(q.double(), k.double(), pos)
    base = ref.rotary(q, k, pos)
    for a, t, b in zip(got, truth, base, strict=True):
        assert_close(a, t, b)
    assert math.isfinite(max_error(got[0], truth[0]))



import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from fastlm.triton.rotary import sincos  # noqa: E402


@triton.jit
def _sincos_kernel(A, C, S, N, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    a = tl.load(A + i, mask=i < N)
    c, s = sincos(a)
    tl.store(C + i, c, mask=i < N)
    tl.store(S + i, s, mask=i < N)


def test_sincos_polynomial_is_fp32_accurate():
    """The kernels' sincos (quadrant reduction + fdlibm polynomials, replacing libdevice sinf/cosf
    whose Payne-Hanek path kept a stack frame) is within one fp32 ulp of float64 cos/sin."""
    a = torch.cat([torch.linspace(-8.5, 8.5, 1000, dtype=torch.float64),
                   torch.tensor([0.0, 1e-9, math.pi / 4, -math.pi / 4], dtype=torch.float64)]).to(DEVICE)
    c, s = torch.empty(a.shape, device=DEVICE), torch.empty(a.shape, device=DEVICE)
    _sincos_kernel[(1,)](a, c, s, a.numel(), BLOCK=1024)
    assert (c.double() - torch.cos(a)).abs().max() <= 6e-8
    assert (s.double() - torch.sin(a)).abs().max() <= 6e-8
