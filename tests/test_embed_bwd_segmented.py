"""The deterministic embedding backward as a segmented reduction (issue 16): the sorted positions in
chunks of R, each run segment summed inside its chunk, the runs crossing chunk edges finished from
fp32 partials. Cases aimed at the chunk edges (runs of R, R + 1, 2R - 1 ... at every alignment), a
frequent id over hundreds of chunks, all ids distinct, out-of-range ids, both column paths of the
CUDA kernels (16-byte vectors and any stride); the tolerance rule against the float64 reference,
bit identity across runs and, on the host tier, across fiber schedules."""

import pytest
import torch
from conftest import DEVICE, kernel_backends

import fastlm
from fastlm.ops._common import launcher
from fastlm.reference import sinusoidal as ref
from fastlm.testing import assert_all_written, assert_close, poison_like
from fastlm.triton.sinusoidal import CHUNK_ROWS as R

BACKENDS = kernel_backends()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _dtypes(backend):
    # bf16 through the interpreter runs numpy's emulation of every op: minutes, not seconds; the
    # Triton bf16 backward is compiled by the compile tier and run in `make gpu-check`.
    return DTYPES if backend == "cuda" or DEVICE == "cuda" else DTYPES[:2]


def _kernel(backend, ids, dout, scale, V, dtype):
    dw = poison_like(torch.empty(V, dout.shape[-1], device=DEVICE, dtype=dtype))
    launcher(backend, "sinusoidal").embed_sinusoidal_bwd(dout.to(dtype), ids, scale, True, dw)
    assert_all_written(dw, "dweight")
    return dw


def _reference(ids, dout, scale, V, dtype):
    """dweight by autograd through the reference forward, weight and dout in dtype."""
    w = torch.zeros(V, dout.shape[-1], device=DEVICE, dtype=dtype, requires_grad=True)
    out = ref.embed_sinusoidal(ids, w, scale=scale)
    return torch.autograd.grad(out, w, dout.to(dtype))[0]


def _check(backend, ids, V, D, dtype, scale=2.0, seed=0, dout=None):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    if dout is None:
        dout = torch.randn(*ids.shape, D, device=DEVICE, generator=g)
    first = _kernel(backend, ids, dout, scale, V, dtype)
    assert torch.equal(_kernel(backend, ids, dout, scale, V, dtype).view(torch.uint8), first.view(torch.uint8))
    truth = _reference(ids, dout.to(dtype).double(), scale, V, torch.float64)
    assert_close(first, truth, _reference(ids, dout, scale, V, dtype), name="dweight")
    return first


def _runs(lengths, V, g):
    """ids (1, sum(lengths)) with run i of id 2 * i + 1 (lengths[i] tokens), the tokens shuffled."""
    ids = torch.repeat_interleave(torch.arange(len(lengths)) * 2 + 1, torch.tensor(lengths))
    assert int(ids.max()) < V
    return ids[torch.randperm(ids.numel(), generator=g)].reshape(1, -1).to(DEVICE)


def test_chunk_rows_agree():
    """The launchers size their workspace by one chunk length: Triton's and the CUDA kernels'."""
    if "cuda" not in BACKENDS:
        pytest.skip(f"the cuda backend is unavailable: {fastlm.backend.why_unavailable('cuda', DEVICE)}")
    assert fastlm.cuda.lib(DEVICE).embed_bwd_chunk_rows() == R
    assert 32 <= R <= 128


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead", [0, 1, R - 1], ids=lambda n: f"lead{n}")
def test_runs_at_chunk_edges(backend, lead):
    """Runs of R, R + 1, 2R - 1, 2R, 3R + 5 and short ones, shifted by a leading run of `lead` tokens
    (0: the first long run fills chunk 0 exactly)."""
    g = torch.Generator().manual_seed(lead)
    lengths = ([lead] if lead else []) + [R, R + 1, 2 * R - 1, 1, 2 * R, 3, 3 * R + 5, R - 1, 2]
    ids = _runs(lengths, 40, g)
    for dtype in _dtypes(backend):
        _check(backend, ids, 40, 24, dtype, seed=lead)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_frequent_id(backend):
    """One id 20k times (a padding token) among a few others: the run spans hundreds of chunks."""
    g = torch.Generator().manual_seed(1)
    ids = torch.full((4, 5011), 5, dtype=torch.int64)
    others = torch.randperm(ids.numel(), generator=g)[:44]
    ids.view(-1)[others] = torch.randint(0, 12, (44,), generator=g)
    ids = ids.to(DEVICE)
    assert int((ids == 5).sum()) >= 20000
    for dtype in _dtypes(backend)[:2]:
        _check(backend, ids, 12, 16, dtype, scale=None, seed=2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ids_distinct(backend):
    g = torch.Generator().manual_seed(3)
    ids = torch.randperm(500, generator=g)[:3 * 97].reshape(3, 97).to(DEVICE)
    for dtype in _dtypes(backend):
        dw = _check(backend, ids, 500, 40, dtype, seed=3)
        unused = torch.ones(500, dtype=torch.bool, device=DEVICE)
        unused[ids.reshape(-1)] = False
        assert torch.equal(dw[unused], torch.zeros_like(dw[unused]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_ids_skipped(backend):
    """Ids below 0 and at or above V, some in runs longer than a chunk, add nothing and are never
    written; the valid runs around them are exact."""
    g = torch.Generator().manual_seed(4)
    ids = torch.cat([torch.full((2 * R + 3,), -3), torch.full((5,), -1), torch.randint(0, 9, (151,), generator=g),
                     torch.full((R + 2,), 9), torch.full((3,), 1 << 40), torch.full((2 * R,), 4)])
    ids = ids[torch.randperm(ids.numel(), generator=g)].reshape(2, -1).to(DEVICE)
    for dtype in _dtypes(backend):
        _check(backend, ids, 9, 16, dtype, scale=-1.5, seed=4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("D", [27, 64], ids=lambda d: f"D{d}")
def test_strided_dout_and_odd_width(backend, D):
    """dout with a column stride of 2 and widths that are not a multiple of the 16-byte vector (the
    CUDA any-stride kernels) give what a contiguous dout gives (the vector kernels at D = 64)."""
    g = torch.Generator(device=DEVICE).manual_seed(D)
    ids = _runs([R + 1, 2 * R - 1, 7, R], 10, torch.Generator().manual_seed(D))
    wide = torch.randn(*ids.shape, 2 * D, device=DEVICE, generator=g)
    strided = wide[..., ::2]
    for dtype in _dtypes(backend):
        got = _check(backend, ids, 10, D, dtype, dout=strided, seed=D)
        assert torch.equal(got, _kernel(backend, ids, strided.to(dtype).contiguous(), 2.0, 10, dtype))


def test_cuda_bit_identical_across_schedules(C_host):
    """The host tier reorders blocks and threads by a seed: the sorted backward gives the same bits."""
    g = torch.Generator().manual_seed(5)
    ids = _runs([3 * R + 1, R, 2 * R - 1, 5, R + 1], 12, g)
    ids = torch.cat([ids, torch.randint(0, 12, (1, 40), generator=g)], 1)
    dout = torch.randn(*ids.shape, 72, generator=g)
    for dtype in DTYPES:
        outs = []
        for seed in (11, 2222, 333333):
            C_host.emulation_set_seed(seed)
            outs.append(_kernel("cuda", ids, dout, 0.5, 12, dtype).view(torch.uint8))
        C_host.emulation_set_seed(11)
        assert all(torch.equal(o, outs[0]) for o in outs[1:]), dtype
