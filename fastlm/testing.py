"""The tolerance rule shared by tests/ and `fastlm check`.

An output passes when
    max|kernel - truth| <= factor * max|torch_same_dtype - truth| + atol(dtype)
where truth is the reference in float64 (or float32 upcast for large GPU shapes) and
torch_same_dtype is the reference run in the kernel's own dtype: a kernel may be at most `factor`
times as far from the truth as PyTorch itself is. factor is 2 for outputs and 3 for attention
gradients. NaN or inf where the truth is finite always fails.
"""

from __future__ import annotations

import math

import torch

FACTOR = 2.0
GRAD_FACTOR_ATTENTION = 3.0
ATOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def max_error(actual: torch.Tensor, truth: torch.Tensor) -> float:
    """max|actual - truth| in float64; inf if actual is non-finite where truth is finite."""
    if actual.shape != truth.shape:
        raise AssertionError(f"shape {tuple(actual.shape)} != expected {tuple(truth.shape)}")
    if actual.numel() == 0:
        return 0.0
    a = actual.detach().to(device=truth.device, dtype=torch.float64)
    t = truth.detach().to(torch.float64)
    finite = torch.isfinite(t)
    if bool((~torch.isfinite(a) & finite).any()):
        return math.inf
    same_nonfinite = (~finite) & ((a == t) | (torch.isnan(a) & torch.isnan(t)))
    if bool((~finite & ~same_nonfinite).any()):
        return math.inf
    diff = (a - t).abs().masked_fill(~finite, 0.0)
    return float(diff.max())


def error_ratio(actual, truth, baseline, *, dtype=None, factor=FACTOR, atol=None) -> float:
    """err / bound under the rule; <= 1 passes."""
    dtype = dtype or actual.dtype
    atol = ATOL[dtype] if atol is None else atol
    bound = factor * max_error(baseline, truth) + atol
    return max_error(actual, truth) / bound


def assert_close(actual, truth, baseline, *, name="output", dtype=None, factor=FACTOR, atol=None) -> float:
    """Assert the tolerance rule for one output; returns the error ratio (<= 1)."""
    dtype = dtype or actual.dtype
    atol = ATOL[dtype] if atol is None else atol
    if actual.dtype != baseline.dtype:
        raise AssertionError(f"{name}: dtype {actual.dtype} != torch's {baseline.dtype}")
    err = max_error(actual, truth)
    base = max_error(baseline, truth)
    bound = factor * base + atol
    if not err <= bound:
        raise AssertionError(
            f"{name}: max error {err:.3e} vs float64 truth exceeds {factor:g} x torch's {base:.3e} "
            f"+ atol {atol:.0e} = {bound:.3e} ({dtype}, shape {tuple(actual.shape)})"
        )
    return err / bound


def poison_like(t: torch.Tensor) -> torch.Tensor:
    """An output buffer filled with NaN, so a missed store shows up as a failure."""
    return torch.full_like(t, float("nan"))


def assert_all_written(t: torch.Tensor, name="output") -> None:
    """After a kernel wrote into a poison_like buffer: every element must be finite."""
    if t.numel() and bool(torch.isnan(t).any()):
        n = int(torch.isnan(t).sum())
        raise AssertionError(f"{name}: {n} of {t.numel()} elements were never written (still NaN)")
