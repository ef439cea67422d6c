"""The pass count of sampling, proved by the kernels' own load counters (issue 16): every pass
reads each logit once, the draw reloads one 2048-element chunk, so a row loads V (greedy),
2V + C (temperature only), 4V + C (top-k), 5V + C (top-p), 7V + C (top-k + top-p + min-p) and
7V (the filter with top-k + top-p), C <= 2048 the drawn chunk's length: at most 2V + 2048 for
plain temperature sampling and 8V for everything. Also with several programs a row."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, kernel_backends

from fastlm.cases import sampling as sampling_cases
from fastlm.reference import sampling as ref

B, V = 3, 40000
MODES = {  # (temperature, top_k, top_p, min_p): passes over V before the draw chunk
    "greedy": ((0.0, None, None, None), 1),
    "temperature": ((0.7, None, None, None), 2),
    "top-k": ((1.0, 50, None, None), 4),
    "top-p": ((0.9, None, 0.8, None), 5),
    "all": ((0.9, 50, 0.8, 0.01), 7),
}


def _launcher(backend):
    if backend == "triton":
        from fastlm.triton import sampling
    else:
        from fastlm.cuda import sampling
    return sampling


def _config(backend, monkeypatch):
    if backend == "triton":  # the GPU's 2048-element steps, so that slices exist on the CPU too
        from fastlm.triton import sampling as tri

        monkeypatch.setattr(tri, "_block_v", lambda V, device: min(2048, 1 << max(4, (V - 1).bit_length())))


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("slices", [1, 5])
def test_sample_loads_each_logit_once_a_pass(backend, mode, slices, monkeypatch):
    _config(backend, monkeypatch)
    (t, k, p, mp), passes = MODES[mode]
    x = sampling_cases.logits((B, V), "normal5", torch.float32, DEVICE, torch.Generator().manual_seed(3))
    seed = torch.tensor([11, 2], dtype=torch.int64, device=DEVICE)
    tokens = torch.empty(B, dtype=torch.int64, device=DEVICE)
    logprobs = torch.empty(B, dtype=torch.float32, device=DEVICE)
    loads = torch.zeros(B, dtype=torch.int64, device=DEVICE)
    _launcher(backend).sample(x, t, k, p, mp, seed, tokens, logprobs, loads=loads, num_slices=slices)
    assert torch.equal(tokens, ref.sample(x, t, k, p, mp, seed=seed)[0])
    extra = loads - passes * V
    if mode == "greedy":
        assert (extra == 0).all(), loads
    else:
        assert ((extra >= 1) & (extra <= 2048)).all(), f"{mode}: {loads.tolist()} for V = {V}"
    assert (loads <= (2 * V + 2048 if mode == "temperature" else 8 * V)).all()


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("slices", [1, 5])
def test_filter_loads_each_logit_once_a_pass(backend, slices, monkeypatch):
    _config(backend, monkeypatch)
    x = sampling_cases.logits((B, V), "normal5", torch.float32, DEVICE, torch.Generator().manual_seed(4))
    out = torch.empty_like(x)
    status = torch.empty(B, dtype=torch.int64, device=DEVICE)
    loads = torch.zeros(B, dtype=torch.int64, device=DEVICE)
    _launcher(backend).top_k_top_p_filter(x, 50, 0.8, None, out, status, loads=loads, num_slices=slices)
    assert torch.equal(out, ref.top_k_top_p_filter(x, 50, 0.8, None)[0]) and (status == 0).all()
    assert (loads == 7 * V).all(), loads


@pytest.mark.parametrize("backend", kernel_backends())
def test_rows_that_need_no_search_skip_its_passes(backend, monkeypatch):
    """Per-row parameters: a row whose top-k keeps everything (k >= V) or whose top-p is 1 does not
    pay for that search; a bad row stops after the statistics."""
    _config(backend, monkeypatch)
    x = sampling_cases.logits((4, V), "normal5", torch.float32, DEVICE, torch.Generator().manual_seed(5))
    x[3, 7] = float("nan")
    k = torch.tensor([50, V, 50, 50], device=DEVICE)
    p = torch.tensor([0.8, 0.8, 1.0, 0.8], device=DEVICE)
    seed = torch.tensor([1, 0], dtype=torch.int64, device=DEVICE)
    tokens = torch.empty(4, dtype=torch.int64, device=DEVICE)
    loads = torch.zeros(4, dtype=torch.int64, device=DEVICE)
    _launcher(backend).sample(x, 1.0, k, p, None, seed, tokens, None, loads=loads, num_slices=2)
    assert torch.equal(tokens, ref.sample(x, 1.0, k, p, None, seed=seed)[0])
    per_v = (loads // V).tolist()
    assert per_v == [7, 5, 4, 1], loads


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rows_off_16_byte_alignment_take_the_scalar_path(backend, dtype, monkeypatch):
    """A row that starts one element past a 16-byte boundary (a view into a wider buffer) loads
    with scalar accesses, with the same tokens, filter and pass count."""
    _config(backend, monkeypatch)
    n = 5000
    wide = sampling_cases.logits((B, n + 9), "ties", torch.float32, DEVICE, torch.Generator().manual_seed(6)).to(dtype)
    x = wide[:, 1 : n + 1]
    seed = torch.tensor([4, 1], dtype=torch.int64, device=DEVICE)
    tokens = torch.empty(B, dtype=torch.int64, device=DEVICE)
    loads = torch.zeros(B, dtype=torch.int64, device=DEVICE)
    _launcher(backend).sample(x, 0.9, 50, 0.8, 0.01, seed, tokens, None, loads=loads, num_slices=2)
    assert torch.equal(tokens, ref.sample(x, 0.9, 50, 0.8, 0.01, seed=seed)[0])
    assert ((loads > 7 * n) & (loads <= 7 * n + 2048)).all(), loads
    out = torch.empty_like(x)
    status = torch.empty(B, dtype=torch.int64, device=DEVICE)
    _launcher(backend).top_k_top_p_filter(x, 50, 0.8, 0.01, out, status, num_slices=2)
    assert torch.equal(out, ref.top_k_top_p_filter(x, 50, 0.8, 0.01)[0])


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_bad_slice_count_is_a_clear_error(backend, bad):
    x = torch.zeros(2, 100, device=DEVICE)
    tokens = torch.empty(2, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="num_slices must be an int >= 1"):
        _launcher(backend).sample(x, 1.0, None, None, None, torch.zeros(2, dtype=torch.int64, device=DEVICE), tokens, None,
                                  num_slices=bad)
