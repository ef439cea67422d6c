"""The Triton forward through tensor descriptors (TMA, fastlm.triton.attention._attn_fwd_tma_kernel).

On the CPU the interpreter executes host tensor descriptors (out-of-bounds boxes read as zeros,
stores clipped), so FASTLM_ATTENTION_TMA=1 runs the TMA kernel on CPU tensors; the pointer kernel
is replaced by a trap so a silent fall-back fails. bf16 is GPU-only (interpreter bf16 arithmetic is
wrong, testing.md). The SASS gate (UTMALDG on sm_90a) is in test_static_triton.py.
"""

import pytest
import torch
from conftest import DEVICE, HAS_GPU

from fastlm.reference import attention as ref
from fastlm.testing import assert_all_written, assert_close, poison_like
from fastlm.triton import attention as A
from fastlm.triton._configs import gpu_configs

NO_TMA_GPU = HAS_GPU and torch.cuda.get_device_capability()[0] < 9
pytestmark = pytest.mark.skipif(NO_TMA_GPU, reason="TMA needs compute capability 9.0 or more")

# (B, Hq, Hkv, Sq, Sk, D, dtype, causal, window, layout)
CASES = [
    (1, 2, 2, 17, 97, 64, torch.float16, False, None, "bhsd"),
    (1, 2, 2, 97, 17, 128, torch.float32, True, None, "bhsd"),  # Sq > Sk causal: rows that see no key
    (1, 2, 2, 97, 200, 80, torch.float16, True, None, "bhsd"),  # head dim padded to BLOCK_D 128
    (2, 4, 2, 97, 128, 64, torch.float32, False, None, "bhsd"),  # GQA 2, batch 2
    (1, 4, 1, 63, 63, 128, torch.float16, True, None, "bhsd"),  # MQA
    (1, 2, 2, 97, 200, 64, torch.float16, False, (8, -1), "bhsd"),
    (1, 2, 2, 128, 128, 64, torch.float32, True, (5, 3), "bhsd"),
    (2, 4, 2, 97, 97, 80, torch.float16, True, None, "bshd"),  # (B, S, H, D) storage
]
# The production tiles (BLOCK_M 128), where a block straddles the sequence end on both sides.
GPU_TILE_CASES = [
    (1, 2, 1, 130, 97, 64, torch.float16, True, None, "bhsd"),
    (1, 2, 2, 97, 200, 128, torch.float32, False, (16, 0), "bhsd"),
]


def _case_id(c):
    B, Hq, Hkv, Sq, Sk, D, dt, causal, window, layout = c
    return f"B{B}-H{Hq}x{Hkv}-{Sq}x{Sk}-D{D}-{str(dt)[6:]}{'-causal' if causal else ''}{f'-w{window}' if window else ''}-{layout}"


def _inputs(B, Hq, Hkv, Sq, Sk, D, dtype, layout, seed):
    g = torch.Generator().manual_seed(seed)

    def rand(b, h, s, d):
        if layout == "bshd":
            return torch.randn(b, s, h, d, generator=g).to(DEVICE, dtype).transpose(1, 2)
        return torch.randn(b, h, s, d, generator=g).to(DEVICE, dtype)

    return rand(B, Hq, Sq, D), rand(B, Hkv, Sk, D), rand(B, Hkv, Sk, D)


@pytest.fixture
def tma_only(monkeypatch):
    """Force the TMA kernel and make the pointer kernel fail if it is launched."""
    monkeypatch.setenv("FASTLM_ATTENTION_TMA", "1")
    monkeypatch.setenv("FASTLM_AUTOTUNE", "0")

    def trap(*args, **kwargs):
        raise AssertionError("the pointer forward ran instead of the TMA forward")

    monkeypatch.setitem(A._KERNELS, "fwd", (trap, trap))


def _check(case, seed):
    B, Hq, Hkv, Sq, Sk, D, dtype, causal, window, layout = case
    q, k, v = _inputs(B, Hq, Hkv, Sq, Sk, D, dtype, layout, seed)
    out = poison_like(q)
    lse = torch.full((B, Hq, Sq), float("nan"), device=DEVICE)
    assert A.uses_tma(q, k, v, out)
    left, right = window or (-1, -1)
    A.attention_fwd(q, k, v, causal, D**-0.5, left, right, out, lse)
    assert_all_written(out, "out")
    assert not torch.isnan(lse).any(), "lse: some elements never written"
    kw = dict(causal=causal, window=window, return_lse=True)
    base_o, base_l = ref.attention(q, k, v, **kw)
    true_o, true_l = ref.attention(q.double(), k.double(), v.double(), **kw)
    assert_close(out, true_o, base_o, name="tma out", factor=2.0)
    assert_close(lse, true_l, base_l, name="tma lse", factor=2.0, dtype=dtype)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_tma_forward_matches_reference(tma_only, case):
    _check(case, seed=CASES.index(case))


@pytest.mark.parametrize("case", GPU_TILE_CASES, ids=_case_id)
def test_tma_forward_gpu_tiles(tma_only, case):
    with gpu_configs():
        _check(case, seed=100 + GPU_TILE_CASES.index(case))


def test_uses_tma_only_where_a_descriptor_fits(monkeypatch):
    """Off by default on CPU tensors and with FASTLM_ATTENTION_TMA=0; with =1 on for aligned
    inputs (positive control) and off for what a descriptor cannot express or the TMA tile does not
    fit: a base off 16 bytes, a row stride off 16 bytes, an empty key sequence, fp32 at head dim 256."""

    def qkv(sq=8, sk=8, d=64, dtype=torch.float16):
        q, k, v = (torch.randn(1, 2, s, d, device=DEVICE, dtype=dtype) for s in (sq, sk, sk))
        return q, k, v, torch.empty_like(q)

    monkeypatch.setenv("FASTLM_ATTENTION_TMA", "1")
    assert A.uses_tma(*qkv())
    q, k, v, o = qkv()
    shifted = torch.randn(2 * 8 * 64 + 1, device=DEVICE, dtype=torch.float16)[1:].view(1, 2, 8, 64)
    assert shifted.is_contiguous() and not A.uses_tma(shifted, k, v, o)
    padded = torch.randn(1, 2, 8, 68, device=DEVICE, dtype=torch.float16)[..., :64]  # 136-byte rows
    assert not A.uses_tma(q, padded, v, o)
    assert not A.uses_tma(*qkv(sk=0))
    assert not A.uses_tma(*qkv(d=256, dtype=torch.float32))
    assert A.uses_tma(*qkv(d=128, dtype=torch.float32))
    monkeypatch.setenv("FASTLM_ATTENTION_TMA", "0")
    assert not A.uses_tma(*qkv())
    if not HAS_GPU:
        monkeypatch.delenv("FASTLM_ATTENTION_TMA")
        assert not A.uses_tma(*qkv())
