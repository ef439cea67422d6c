"""The CUDA attention forward (csrc/attention.cu) on the host build: what it serves (routing),
split-KV against the unsplit kernel and the float64 truth, windows with splits whose share of
the keys is empty, bit-identical results under fiber schedules, every output element written,
and the launcher's choice of splits. The shared case grid (fastlm/cases/attention.py) runs the
rest through tests/test_attention.py."""

from __future__ import annotations

import pytest
import torch

from fastlm.cuda import attention as cattn
from fastlm.reference import attention as ref
from fastlm.testing import assert_all_written, assert_close, poison_like


@pytest.fixture
def host(C_host):
    seed = C_host.emulation_seed()
    yield C_host
    C_host.emulation_set_seed(seed)


def _inputs(B=1, Hq=4, Hkv=2, Sq=150, Sk=333, D=64, dtype=torch.float16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Sq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Sk, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Sk, D, generator=g).to(dtype)
    return q, k, v


def _fwd(q, k, v, causal=False, window=(-1, -1), num_splits=None, scale=None):
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    out, lse = poison_like(q), torch.full(q.shape[:3], float("nan"))
    cattn.attention_fwd(q, k, v, causal, scale, window[0], window[1], out, lse, num_splits=num_splits)
    return out, lse


def _truth(q, k, v, causal, window):
    w = None if window == (-1, -1) else window
    hq, hkv = q.shape[1], k.shape[1]
    kk, vv = (t.repeat_interleave(hq // hkv, dim=1) for t in (k, v))
    truth = ref.attention(q.double(), kk.double(), vv.double(), causal=causal, window=w, return_lse=True)
    base = ref.attention(q, kk, vv, causal=causal, window=w, return_lse=True)
    return truth, base


def test_routing(host):
    q, k, v = _inputs(Sq=9, Sk=9)
    assert cattn.fwd_runs_cuda(q, k, v, True, -1, -1, q)
    assert cattn.fwd_runs_cuda(q, k, v, False, 8, 3, q)  # windows run CUDA
    q96, k96, _ = _inputs(Sq=9, Sk=9, D=96)
    assert cattn.fwd_runs_cuda(q96, k96, k96, True, -1, -1, q96)
    qb, kb, _ = _inputs(Sq=9, Sk=9, D=128, dtype=torch.bfloat16)
    assert cattn.fwd_runs_cuda(qb, kb, kb, False, -1, -1, qb)
    assert not cattn.fwd_runs_cuda(q.float(), k.float(), v.float(), True, -1, -1, q.float())  # fp32: Triton
    q80, k80, _ = _inputs(Sq=9, Sk=9, D=80)
    assert not cattn.fwd_runs_cuda(q80, k80, k80, True, -1, -1, q80)  # head dim 80: Triton
    for scale in (0.0, -0.5, float("inf")):
        assert not cattn.fwd_runs_cuda(q, k, v, True, -1, -1, q, scale=scale)


@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (False, (70, 10)), (True, (40, -1))],
                         ids=["full", "causal", "window", "causal-left"])
def test_split_kv_matches_the_unsplit_kernel_and_the_truth(host, causal, window):
    """Splits 3 and 7 over 6 key tiles (some splits get none of a query block's visible tiles under
    a window: their partial is empty and must not disturb the merge)."""
    q, k, v = _inputs()
    truth, base = _truth(q, k, v, causal, window)
    one = _fwd(q, k, v, causal, window, num_splits=1)
    for splits in (3, 7):
        out, lse = _fwd(q, k, v, causal, window, num_splits=splits)
        assert_all_written(out, "out")
        assert not torch.isnan(lse).any()
        assert_close(out, truth[0], base[0], name=f"out, {splits} splits")
        assert_close(lse, truth[1], base[1], name=f"lse, {splits} splits")
        # beside the truth checks above: each split rounds P to fp16 against its own maximum and the
        # merge rounds O once more (about 2 fp16 ulps of |O| <= 4); the LSE stays fp32 throughout
        torch.testing.assert_close(out.float(), one[0].float(), rtol=0, atol=2e-3)
        torch.testing.assert_close(lse, one[1], rtol=1e-6, atol=1e-5)


def test_rows_that_see_no_key_with_splits(host):
    """Sq > Sk with a causal mask: the first Sq - Sk rows see nothing (O = 0, LSE = -inf) in every
    split."""
    q, k, v = _inputs(Sq=200, Sk=70)
    for splits in (1, 2):
        out, lse = _fwd(q, k, v, causal=True, num_splits=splits)
        assert torch.equal(out[:, :, :130], torch.zeros_like(out[:, :, :130]))
        assert torch.isneginf(lse[:, :, :130]).all() and torch.isfinite(lse[:, :, 130:]).all()


@pytest.mark.parametrize("D", [64, 96, 128])
def test_bit_identical_under_schedules(host, D):
    q, k, v = _inputs(Sq=130, Sk=140, D=D)
    outs = []
    for seed in (5, 77):
        host.emulation_set_seed(seed)
        outs.append(_fwd(q, k, v, causal=True, window=(100, -1), num_splits=2))
    assert torch.equal(outs[0][0].view(torch.int16), outs[1][0].view(torch.int16))
    assert torch.equal(outs[0][1].view(torch.int32), outs[1][1].view(torch.int32))


def test_splits_follow_the_sm_count(host):
    """Splits only when the B * Hq * ceil(Sq / 128) blocks leave SMs idle, at least 256 keys each."""
    sms = host.emulation_sm_count()
    cpu = torch.device("cpu")
    try:
        host.emulation_set_sm_count(132)
        assert cattn.fwd_splits_for(1, 8, 1000, 8192, cpu) == 3  # 64 blocks: 3 splits cover 132 SMs
        assert cattn.fwd_splits_for(1, 2, 128, 8192, cpu) == 32  # 2 blocks: at most 32
        assert cattn.fwd_splits_for(1, 2, 128, 600, cpu) == 2  # 600 keys: 2 splits of >= 256
        assert cattn.fwd_splits_for(1, 1, 1, 100, cpu) == 1
        assert cattn.fwd_splits_for(4, 32, 2048, 2048, cpu) == 1  # 2048 blocks fill the SMs
    finally:
        host.emulation_set_sm_count(sms)
