"""The CUDA decode kernels (csrc/decode_attention.cu) through fastlm._C_host on CPU tensors: one
block per (batch, key/value head, split) covering the whole GQA group (G * Sq rows, at most 64),
K/V tiles through a cp.async ring, mma.sync math. Each case is checked against the float64
reference under the tolerance rule, with NaN-poisoned outputs."""

from __future__ import annotations

import pytest
import torch

from fastlm.cuda import attention as cattn
from fastlm.reference import attention as ref
from fastlm.testing import assert_all_written, assert_close, poison_like

pytestmark = pytest.mark.usefixtures("C_host")


def _inputs(B, Hq, Hkv, Sq, S_max, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Sq, D, generator=g).to(dtype)
    kc = torch.randn(B, Hkv, S_max, D, generator=g).to(dtype)
    vc = torch.randn(B, Hkv, S_max, D, generator=g).to(dtype)
    return q, kc, vc


def _run(q, kc, vc, lens, window_left=-1, num_splits=None, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = poison_like(q)
    lse = torch.full(q.shape[:3], float("nan"))
    cattn.decode_attention_fwd(q, kc, vc, lens, scale, window_left, -1, out, lse, num_splits=num_splits)
    assert_all_written(out, "out")
    assert_all_written(lse, "lse")
    return out, lse


def _check(q, kc, vc, lens, window_left=-1, num_splits=None):
    assert cattn.decode_runs_cuda(q, kc, vc)
    out, lse = _run(q, kc, vc, lens, window_left, num_splits)
    window = None if window_left < 0 else (window_left, -1)
    t_out, t_lse = ref.decode_attention(q.double(), kc.double(), vc.double(), lens, window=window, return_lse=True)
    b_out, b_lse = ref.decode_attention(q, kc, vc, lens, window=window, return_lse=True)
    assert_close(out, t_out, b_out, name="out")
    assert_close(lse, t_lse.float(), b_lse.float(), name="lse")
    return out, lse


def _lens(*v):
    return torch.tensor(v, dtype=torch.int32)


def _split_launches(C_host):
    return {k: v for k, v in C_host.emulation_launch_counts().items() if k.startswith("decode_")}


@pytest.mark.parametrize(
    "Hq,Hkv,Sq,D",
    [(32, 4, 1, 128), (32, 4, 8, 64), (16, 4, 16, 64), (64, 1, 1, 128), (8, 8, 16, 256), (4, 1, 16, 64)],
)
def test_runs_cuda_for_groups_up_to_64_rows(Hq, Hkv, Sq, D):
    q, kc, vc = _inputs(1, Hq, Hkv, Sq, 8, D, torch.float16)
    assert cattn.decode_runs_cuda(q, kc, vc)


@pytest.mark.parametrize("Hq,Hkv,Sq,D,dtype", [(32, 4, 9, 64, torch.float16), (65, 1, 1, 64, torch.float16),
                                              (8, 2, 1, 80, torch.float16), (8, 2, 1, 64, torch.float32)])
def test_other_cases_go_to_triton(Hq, Hkv, Sq, D, dtype):
    q, kc, vc = _inputs(1, Hq, Hkv, Sq, 8, D, dtype)
    assert not cattn.decode_runs_cuda(q, kc, vc)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("Sq", [1, 4])
def test_gqa_8_to_1(C_host, dtype, Sq):
    q, kc, vc = _inputs(2, 16, 2, Sq, 150, 128, dtype, seed=Sq)
    before = _split_launches(C_host)
    _check(q, kc, vc, _lens(150, 77), num_splits=3)
    after = _split_launches(C_host)
    name = f"decode_split_kernel<{'__half' if dtype == torch.float16 else '__nv_bfloat16'}, 128, {1 if Sq == 1 else 2}>"
    assert after.get(name, 0) == before.get(name, 0) + 1


@pytest.mark.parametrize("Hq,Hkv,Sq,D,dtype", [(8, 1, 8, 64, torch.bfloat16), (4, 1, 16, 128, torch.float16),
                                              (8, 1, 6, 256, torch.float16)])
def test_64_row_tiles(C_host, Hq, Hkv, Sq, D, dtype):
    """Four m tiles (33 to 64 rows), one per warp; at D = 256 the tile is 32 keys."""
    q, kc, vc = _inputs(1, Hq, Hkv, Sq, 100, D, dtype, seed=D)
    before = _split_launches(C_host)
    _check(q, kc, vc, _lens(100), num_splits=2)
    T = "__half" if dtype == torch.float16 else "__nv_bfloat16"
    name = f"decode_split_kernel<{T}, {D}, 4>"
    assert _split_launches(C_host).get(name, 0) == before.get(name, 0) + 1


def test_mqa():
    q, kc, vc = _inputs(2, 12, 1, 2, 90, 64, torch.float16, seed=5)
    _check(q, kc, vc, _lens(90, 33), num_splits=2)


@pytest.mark.parametrize("D", [64, 256])
def test_ragged_lengths(D):
    """Lengths 0, 1, S_max and one between, in one batch; rows that see no key (all of length 0,
    tokens 0 and 1 of length 1) get O = 0 and LSE = -inf."""
    q, kc, vc = _inputs(4, 4, 2, 3, 130, D, torch.bfloat16, seed=D)
    out, lse = _check(q, kc, vc, _lens(0, 1, 130, 65), num_splits=4)
    empty = torch.zeros(4, 4, 3, dtype=torch.bool)
    empty[0], empty[1, :, :2] = True, True
    assert bool((out[empty] == 0).all()) and bool((lse[empty] == float("-inf")).all())
    assert bool(lse[~empty].isfinite().all())


@pytest.mark.parametrize("left", [0, 5, 70])
def test_window_left(left):
    q, kc, vc = _inputs(2, 8, 2, 4, 200, 128, torch.float16, seed=left)
    _check(q, kc, vc, _lens(200, 9), window_left=left, num_splits=3)


def test_nan_beyond_the_length_never_reaches_the_output():
    q, kc, vc = _inputs(3, 8, 2, 2, 140, 64, torch.float16, seed=7)
    lens = _lens(70, 1, 129)
    for b, n in enumerate(lens.tolist()):
        kc[b, :, n:] = float("nan")
        vc[b, :, n:] = float("nan")
    for splits in (1, 5):
        _check(q, kc, vc, lens, num_splits=splits)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_split_counts_agree(C_host, dtype):
    """One split (written directly, no combine launch) and many splits: the LSE (fp32 sums of fp32
    probabilities) agrees to fp32 rounding; O differs by the rounding of P to the input dtype for
    the P V mma, which each split scales by its own running maximum: within eps(dtype) max|O|."""
    q, kc, vc = _inputs(2, 8, 2, 3, 300, 64, dtype, seed=11)
    lens = _lens(300, 45)
    before = _split_launches(C_host)
    out1, lse1 = _check(q, kc, vc, lens, num_splits=1)
    combines = [k for k in _split_launches(C_host) if k.startswith("decode_combine_kernel")]
    assert all(_split_launches(C_host)[k] == before.get(k, 0) for k in combines)
    for splits in (2, 7, 64):
        out, lse = _check(q, kc, vc, lens, num_splits=splits)
        # each split rounds P to the dtype against its own running maximum before P V: O agrees to
        # one rounding of the dtype, the LSE (fp32 throughout) to fp32 rounding
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(out.float(), out1.float(), rtol=eps, atol=eps * float(out1.abs().max()))
        torch.testing.assert_close(lse, lse1, rtol=1e-6, atol=1e-6)


def test_two_schedule_seeds_are_bit_identical(C_host):
    q, kc, vc = _inputs(2, 8, 2, 4, 160, 128, torch.bfloat16, seed=13)
    lens = _lens(160, 100)
    seed = C_host.emulation_seed()
    try:
        results = []
        for s in (1, 12345):
            C_host.emulation_set_seed(s)
            results.append(_run(q, kc, vc, lens, window_left=40, num_splits=3))
    finally:
        C_host.emulation_set_seed(seed)
    (o1, l1), (o2, l2) = results
    assert torch.equal(o1, o2) and torch.equal(l1, l2)


def test_unaligned_q_and_strided_caches():
    """q rows that are not 16-byte aligned (element loads) and caches that are views of larger
    buffers (row strides of 16-byte multiples)."""
    q_big, kc_big, vc_big = _inputs(2, 8, 4, 2, 120, 72, torch.float16, seed=17)
    q = q_big[..., 1:65]
    kc, vc = kc_big[:, ::2, :, 8:72], vc_big[:, 1::2, :, :64]
    assert q.data_ptr() % 16 != 0
    _check(q, kc, vc, _lens(120, 31), num_splits=2)


def test_grids_and_blocks(C_host):
    assert tuple(C_host.decode_attention_grids(3, 32, 4, 8, 5)[0]) == (12, 5, 1)
    assert tuple(C_host.decode_attention_grids(3, 32, 4, 8, 5)[1]) == (3 * 32 * 8 // 4, 1, 1)
    assert C_host.decode_attention_grids(3, 32, 4, 9, 5) == []  # 72 rows per key/value head
    assert C_host.decode_attention_grids(3, 32, 5, 1, 5) == []  # not a multiple
    assert tuple(C_host.decode_attention_block(13, 4)) == (3, 1)
