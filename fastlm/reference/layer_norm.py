"""LayerNorm and RMSNorm in plain PyTorch: the oracle for the kernels and the CPU fallback.

Statistics in float32 (float64 for float64 inputs), output in the input's dtype, as torch does.
    LayerNorm: y = (x - mean(x)) / sqrt(var(x) + eps) * w + b      (biased variance)
    RMSNorm:   y = x / sqrt(mean(x^2) + eps) * w
The add_ variants first form h = x + residual (summed in fp32, rounded to the input's dtype, as a
model's residual stream is) and return (norm(h), h).
"""

from __future__ import annotations

import torch


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _dims(normalized_shape) -> tuple[int, ...]:
    n = len(normalized_shape)
    return tuple(range(-n, 0))


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    ct = _compute_dtype(input)
    x = input.to(ct)
    dims = _dims(normalized_shape)
    mean = x.mean(dim=dims, keepdim=True)
    var = (x - mean).square().mean(dim=dims, keepdim=True)
    y = (x - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(ct)
    if bias is not None:
        y = y + bias.to(ct)
    return y.to(input.dtype)


def rms_norm(input, normalized_shape, weight=None, eps=None):
    if eps is None:
        eps = torch.finfo(input.dtype).eps
    ct = _compute_dtype(input)
    x = input.to(ct)
    y = x * torch.rsqrt(x.square().mean(dim=_dims(normalized_shape), keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(ct)
    return y.to(input.dtype)


def add_layer_norm(x, residual, weight=None, bias=None, eps=1e-5):
    h = (x.to(_compute_dtype(x)) + residual.to(_compute_dtype(x))).to(x.dtype)
    return layer_norm(h, (x.shape[-1],), weight, bias, eps), h


def add_rms_norm(x, residual, weight=None, eps=None):
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    h = (x.to(_compute_dtype(x)) + residual.to(_compute_dtype(x))).to(x.dtype)
    return rms_norm(h, (x.shape[-1],), weight, eps), h
