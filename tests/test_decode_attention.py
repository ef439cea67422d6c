import pytest
import torch
from conftest import DEVICE, kernel_backends

import fastlm
from fastlm import cases
from fastlm.ops._common import launcher
from fastlm.reference import attention as ref
from fastlm.testing import assert_all_written, assert_close, poison_like

BACKENDS = kernel_backends()


def _rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE, dtype=dtype)


def _lens(*values):
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", cases.cases("decode_attention", DEVICE), ids=lambda c: c.id)
def test_decode_matches_full_attention(case, backend):
    """Against attention(causal=True) of each sequence over cache[b, :, :L_b] (uneven lengths)."""
    cases.check(case, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_splits", [1, 2, 5, 13])
def test_split_counts_agree(backend, num_splits):
    """Any split count gives the same result within the rule (splits beyond a short sequence's
    keys see nothing and must drop out of the combine); every output element is written."""
    mod = launcher(backend, "attention")
    B, Hq, Hkv, Sq, S, D = 3, 4, 2, 3, 150, 48
    q, kc, vc = _rand(B, Hq, Sq, D), _rand(B, Hkv, S, D), _rand(B, Hkv, S, D)
    lens = _lens(150, 20, 2)
    out, lse = poison_like(q), torch.full((B, Hq, Sq), float("nan"), device=DEVICE)
    mod.decode_attention_fwd(q, kc, vc, lens, D**-0.5, -1, -1, out, lse, num_splits=num_splits)
    assert_all_written(out, "out")
    assert not torch.isnan(lse).any()
    t_out, t_lse = ref.decode_attention(q.double(), kc.double(), vc.double(), lens, return_lse=True)
    b_out, b_lse = ref.decode_attention(q, kc, vc, lens, return_lse=True)
    assert_close(out, t_out, b_out, name="out")
    assert_close(lse, t_lse, b_lse, name="lse")


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_equals_attention_on_last_tokens(backend):
    """A prefill of S tokens with fastlm.ops.attention, then the same last 4 rows through the decode
    path over a larger cache: the same numbers within the rule."""
    B, Hq, Hkv, S, D = 2, 4, 1, 61, 32
    q, k, v = _rand(B, Hq, S, D), _rand(B, Hkv, S, D), _rand(B, Hkv, S, D)
    full = fastlm.ops.attention(q, k, v, causal=True, backend=backend)
    kc, vc = torch.zeros(B, Hkv, 100, D, device=DEVICE), torch.zeros(B, Hkv, 100, D, device=DEVICE)
    kc[:, :, :S], vc[:, :, :S] = k, v
    got = fastlm.ops.decode_attention(q[:, :, -4:].contiguous(), kc, vc, _lens(S, S), backend=backend)
    truth = ref.attention(q.double(), k.double(), v.double(), causal=True)[:, :, -4:]
    base = ref.attention(q, k, v, causal=True)[:, :, -4:]
    assert_close(got, truth, base)
    assert_close(full[:, :, -4:], truth, base)


def test_reference_decode_matches_per_sequence_loop():
    q, kc, vc = _rand(3, 4, 5, 16).double(), _rand(3, 2, 40, 16).double(), _rand(3, 2, 40, 16).double()
    lens = _lens(40, 3, 0)
    for window in (None, (6, -1)):
        got = ref.decode_attention(q, kc, vc, lens, window=window)
        for b, n in enumerate(lens.tolist()):
            want = ref.attention(q[b : b + 1], kc[b : b + 1, :, :n], vc[b : b + 1, :, :n], causal=True, window=window)
            torch.testing.assert_close(got[b : b + 1], want, rtol=0, atol=1e-12)


def test_decode_errors():
    q, kc, vc, lens = _rand(2, 4, 1, 16), _rand(2, 2, 10, 16), _rand(2, 2, 10, 16), _lens(10, 3)
    fastlm.ops.decode_attention(q, kc, vc, lens)
    fastlm.ops.decode_attention(_rand(2, 4, 16, 16), kc, vc, lens)
    with pytest.raises(ValueError, match=r"cache_seqlens must lie in \[0, S_max=10\], got values in \[3, 11\]"):
        fastlm.ops.decode_attention(q, kc, vc, _lens(11, 3))
    with pytest.raises(ValueError, match=r"cache_seqlens must lie in \[0, S_max=10\], got values in \[-1, 10\]"):
        fastlm.ops.decode_attention(q, kc, vc, _lens(10, -1))
    with pytest.raises(TypeError, match=r"cache_seqlens must be int32, got int64 \(use .int\(\)\)"):
        fastlm.ops.decode_attention(q, kc, vc, lens.long())
    with pytest.raises(ValueError, match=r"cache_seqlens must have shape \[2\]"):
        fastlm.ops.decode_attention(q, kc, vc, _lens(10))
    with pytest.raises(ValueError, match="cache_seqlens is on meta"):
        fastlm.ops.decode_attention(q, kc, vc, lens.to("meta"))
    with pytest.raises(ValueError, match="q must have 1 to 16 new tokens"):
        fastlm.ops.decode_attention(_rand(2, 4, 17, 16), kc, vc, lens)
    with pytest.raises(ValueError, match=r"query heads \(4\) must be a multiple of key/value heads \(3\)"):
        fastlm.ops.decode_attention(q, _rand(2, 3, 10, 16), _rand(2, 3, 10, 16), lens)
    with pytest.raises(ValueError, match=r"k_cache shape \[2, 2, 10, 16\] != v_cache shape \[2, 2, 9, 16\]"):
        fastlm.ops.decode_attention(q, kc, _rand(2, 2, 9, 16), lens)
    with pytest.raises(ValueError, match="head dim must be a multiple of 8 between 8 and 256, got 20"):
        fastlm.ops.decode_attention(_rand(2, 4, 1, 20), _rand(2, 2, 10, 20), _rand(2, 2, 10, 20), lens)
    with pytest.raises(ValueError, match="head dim must be a multiple of 8 between 8 and 256, got 264"):
        fastlm.ops.decode_attention(_rand(2, 4, 1, 264), _rand(2, 2, 10, 264), _rand(2, 2, 10, 264), lens)
    with pytest.raises(TypeError, match="k_cache dtype float16 != q dtype float32"):
        fastlm.ops.decode_attention(q, kc.half(), vc, lens)
    with pytest.raises(ValueError, match="k_cache is on meta but q is on"):
        fastlm.ops.decode_attention(q, kc.to("meta"), vc, lens)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_opcheck(backend):
    q, kc, vc, lens = _rand(2, 4, 3, 16), _rand(2, 2, 40, 16), _rand(2, 2, 40, 16), _lens(40, 7)
    for wl in (-1, 5):
        torch.library.opcheck(torch.ops.fastlm.decode_attention.default, (q, kc, vc, lens, 0.25, wl, -1, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_torch_compile_fullgraph(backend):
    def step(q, kc, vc, lens):
        return fastlm.ops.decode_attention(q, kc, vc, lens, window=(16, -1), backend=backend) * 2

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if DEVICE == "cpu" else "inductor")
    q, kc, vc, lens = _rand(2, 4, 1, 32), _rand(2, 2, 50, 32), _rand(2, 2, 50, 32), _lens(50, 9)
    torch.testing.assert_close(compiled(q, kc, vc, lens), step(q, kc, vc, lens))
    lens2 = _lens(31, 1)  # new lengths, same graph
    torch.testing.assert_close(compiled(q, kc, vc, lens2), step(q, kc, vc, lens2))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_cuda_graph_gpu(backend):
    """The decode step captures in a CUDA graph (no autotuning, no host sync) and replays with new lengths."""
    q, kc, vc = _rand(4, 32, 1, 128, dtype=torch.bfloat16), _rand(4, 8, 4096, 128, dtype=torch.bfloat16), _rand(4, 8, 4096, 128, dtype=torch.bfloat16)
    lens = _lens(4096, 100, 1, 3000)
    fastlm.ops.decode_attention(q, kc, vc, lens, backend=backend)  # warm-up (compiles)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fastlm.ops.decode_attention(q, kc, vc, lens, backend=backend)
    for new in ((4096, 100, 1, 3000), (17, 4000, 2048, 1)):
        lens.copy_(_lens(*new))
        graph.replay()
        torch.cuda.synchronize()
        want = fastlm.ops.decode_attention(q, kc, vc, lens, backend=backend)
        assert torch.equal(out, want)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_race_stress_gpu(backend):
    """Batch 60 with ragged lengths, repeated: identical every time and within the rule."""
    B = 60
    q, kc, vc = _rand(B, 8, 2, 64, dtype=torch.float16), _rand(B, 2, 1500, 64, dtype=torch.float16), _rand(B, 2, 1500, 64, dtype=torch.float16)
    lens = torch.randint(0, 1501, (B,), device=DEVICE, dtype=torch.int32)
    first = fastlm.ops.decode_attention(q, kc, vc, lens, backend=backend)
    truth = ref.decode_attention(q.float(), kc.float(), vc.float(), lens)
    base = ref.decode_attention(q, kc, vc, lens)
    assert_close(first, truth, base)
    for _ in range(30):
        assert torch.equal(fastlm.ops.decode_attention(q, kc, vc, lens, backend=backend), first)


def test_cuda_coverage_is_documented():
    """`fastlm info` prints fastlm.cuda.coverage(): the attention module states what runs as CUDA."""
    import fastlm.cuda

    text = fastlm.cuda.coverage()["attention"]
    assert "Triton" in text and "decode" in text and "backward" in text


@pytest.mark.gpu
def test_cuda_routing_gpu():
    """The cuda backend runs its own kernels where CUDA_COVERAGE says so, Triton elsewhere."""
    if "cuda" not in BACKENDS:
        pytest.skip("fastlm._C is not built: " + str(fastlm.backend.why_unavailable("cuda", DEVICE)))
    import fastlm.cuda.attention as C

    q, k = _rand(1, 4, 9, 128, dtype=torch.bfloat16), _rand(1, 2, 9, 128, dtype=torch.bfloat16)
    assert C.fwd_runs_cuda(q, k, k, True, -1, -1, q)
    assert C.fwd_runs_cuda(q, k, k, True, -1, 5, q)  # causal caps the right window at 0: plain causal
    assert C.fwd_runs_cuda(q, k, k, False, 8, -1, q)  # sliding windows run CUDA
    assert not C.fwd_runs_cuda(q, k, k, True, -1, -1, q, scale=0.0)  # scale <= 0: Triton
    assert not C.fwd_runs_cuda(q.float(), k.float(), k.float(), True, -1, -1, q.float())
    q80 = _rand(1, 4, 9, 80, dtype=torch.float16)
    assert not C.fwd_runs_cuda(q80, q80, q80, False, -1, -1, q80)
    assert C.decode_runs_cuda(q, k, k) and not C.decode_runs_cuda(q.float(), k.float(), k.float())


def test_noncontiguous_cache_seqlens_regression():
    """The Triton decode read cache_seqlens as if contiguous: a strided lengths tensor (a column of
    a larger int32 table) gave other sequences' lengths."""
    mod = launcher("triton", "attention")
    B, Hq, Hkv, Sq, S, D = 3, 2, 1, 1, 40, 16
    q, kc, vc = _rand(B, Hq, Sq, D), _rand(B, Hkv, S, D), _rand(B, Hkv, S, D)
    table = torch.tensor([[40, 1], [7, 2], [19, 3]], dtype=torch.int32, device=DEVICE)
    lens = table[:, 0]
    assert not lens.is_contiguous()
    out, lse = torch.empty_like(q), torch.empty((B, Hq, Sq), device=DEVICE)
    mod.decode_attention_fwd(q, kc, vc, lens, D**-0.5, -1, -1, out, lse)
    t_out = ref.decode_attention(q.double(), kc.double(), vc.double(), lens.contiguous())
    b_out = ref.decode_attention(q, kc, vc, lens.contiguous())
    assert_close(out, t_out, b_out, name="out")
