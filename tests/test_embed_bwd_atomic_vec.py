"""The CUDA atomic embedding backward (csrc/sinusoidal.cu, deterministic=False) on the host build:
the 16-byte vector kernel (dout rows 16-byte aligned, unit column stride, D a multiple of 16 bytes,
fp32 accumulator 16-byte aligned) and the any-stride fallback, which one runs (the host tier's
launch counts), repeated and out-of-range ids, scale, int32/int64 ids, token counts that are not a
multiple of the tokens a block handles, and non-contiguous dout; the tolerance rule against the
float64 reference."""

from __future__ import annotations

import pytest
import torch

from fastlm.cuda import sinusoidal as cuda_sin
from fastlm.reference import sinusoidal as ref
from fastlm.testing import assert_all_written, assert_close, poison_like

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
V = 13
KERNELS = ("embed_bwd_atomic_kernel", "embed_bwd_atomic_vec_kernel")


def _launches(C_host) -> dict[str, int]:
    counts = C_host.emulation_launch_counts()
    return {name: sum(v for k, v in counts.items() if k.startswith(name + "<")) for name in KERNELS}


def _ids(shape, seed, dtype=torch.int64):
    """Ids in [0, V) with many repeats, one frequent id, and some below 0 or at or above V."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, shape, generator=g)
    ids.view(-1)[torch.randperm(ids.numel(), generator=g)[: ids.numel() // 3]] = 4
    bad = torch.randperm(ids.numel(), generator=g)[:6]
    ids.view(-1)[bad] = torch.tensor([-1, -7, V, V + 3, 1 << 40, -(1 << 40)]).clamp(
        torch.iinfo(dtype).min, torch.iinfo(dtype).max)
    return ids.to(dtype)


def _reference(ids, dout, scale, dtype):
    w = torch.zeros(V, dout.shape[-1], dtype=dtype, requires_grad=True)
    return torch.autograd.grad(ref.embed_sinusoidal(ids, w, scale=scale), w, dout.to(dtype))[0]


def _run(C_host, ids, dout, scale, dw=None):
    """dweight of the atomic backward into dw NaN-poisoned (default (V, D) in dout's dtype), and
    the launches of each atomic kernel it made."""
    if dw is None:
        dw = poison_like(torch.empty(V, dout.shape[-1], dtype=dout.dtype))
    else:
        dw.fill_(float("nan"))
    before = _launches(C_host)
    cuda_sin.embed_sinusoidal_bwd(dout, ids, scale, False, dw)
    after = _launches(C_host)
    assert_all_written(dw, "dweight")
    return dw, {k: after[k] - before[k] for k in KERNELS}


def _check(C_host, ids, dout, scale, vector, dw=None):
    got, runs = _run(C_host, ids, dout, scale, dw)
    assert runs == {"embed_bwd_atomic_kernel": int(not vector), "embed_bwd_atomic_vec_kernel": int(vector)}
    truth = _reference(ids, dout.double(), scale, torch.float64)
    assert_close(got, truth, _reference(ids, dout, scale, got.dtype), name="dweight")
    return got


def _dout(shape, dtype, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [64, 136, 27], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("scale", [None, -1.5], ids=lambda s: f"scale{s}")
def test_matches_reference(C_host, dtype, D, scale):
    """D = 64 and 136 run the vector kernel (136: column chunks not a power of two), D = 27 the
    fallback; 3 x 37 tokens: not a multiple of a block's tokens."""
    ids = _ids((3, 37), D)
    _check(C_host, ids, _dout((3, 37, D), dtype, D), scale, vector=D != 27)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_int32_ids_and_one_token(C_host, dtype):
    _check(C_host, _ids((5, 11), 1, torch.int32), _dout((5, 11, 64), dtype, 1), 2.0, vector=True)
    _check(C_host, torch.tensor([[3]]), _dout((1, 1, 64), dtype, 2), 2.0, vector=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fallback_layouts_match(C_host, dtype):
    """The same dout values in layouts the vector kernel cannot take (column stride 2; rows one
    element past a 16-byte boundary) run the fallback, the contiguous dout the vector kernel: all
    within the tolerance rule."""
    ids = _ids((4, 19), 7)
    dout = _dout((4, 19, 64), dtype, 7)
    strided = torch.empty(4, 19, 128, dtype=dtype)[..., ::2]
    strided.copy_(dout)
    unaligned = torch.empty(dout.numel() + 1, dtype=dtype)[1:].view(dout.shape)
    unaligned.copy_(dout)
    _check(C_host, ids, dout, 0.5, vector=True)
    for layout in (strided, unaligned):
        _check(C_host, ids, layout, 0.5, vector=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_vector_kernel_on_strided_rows(C_host, dtype):
    """dout (T, S, D) with rows 16-byte aligned but not contiguous (T and S transposed; a row
    stride padded past D) still takes the vector kernel."""
    ids = _ids((6, 9), 11)
    dout = _dout((9, 6, 72), dtype, 11).transpose(0, 1)
    _check(C_host, ids, dout, 3.0, vector=True)
    padded = torch.empty(6, 9, 80, dtype=dtype)[..., :72]
    padded.copy_(dout)
    _check(C_host, ids, padded, 3.0, vector=True)


def test_unaligned_fp32_gradient_takes_the_fallback(C_host):
    """An fp32 contiguous dweight is the accumulator itself: one not 16-byte aligned runs the
    fallback (the vector kernel's adds are 16-byte wide)."""
    ids = _ids((2, 23), 5)
    dout = _dout((2, 23, 64), torch.float32, 5)
    dw = torch.empty(V * 64 + 1)[1:].view(V, 64)
    _check(C_host, ids, dout, None, vector=False, dw=dw)
    _check(C_host, ids, dout, None, vector=True)
