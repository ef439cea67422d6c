"""layer_norm, rms_norm, add_layer_norm, add_rms_norm: validation, dispatch, autograd, torch.library.

The kernel backends run through two custom ops, fastlm::layer_norm_fwd and fastlm::layer_norm_bwd,
whose launchers come from fastlm/triton/layer_norm.py or fastlm/cuda/layer_norm.py; the torch
backend is the reference, differentiated by autograd. An empty normalized shape (N = 0) gives the
empty result torch gives, on every backend. Under the Triton interpreter (CPU) bf16 arithmetic is
wrong, so there the kernels run on fp32 copies and the result is rounded to bf16.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor

from fastlm import backend as _backend
from fastlm.ops._common import check_kernel_dtype, check_same_device, check_tensor, emulate_bf16, launcher
from fastlm.reference import layer_norm as ref

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@torch.library.custom_op("fastlm::layer_norm_fwd", mutates_args=())
def _layer_norm_fwd(
    x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
    eps: float, is_rms: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    M, N = x.shape
    y = torch.empty_like(x)
    h = torch.empty_like(x) if residual is not None else x.new_empty(0)
    mean = x.new_empty(0 if is_rms else M, dtype=torch.float32)
    rstd = x.new_empty(M, dtype=torch.float32)
    launcher(backend, "layer_norm").layer_norm_fwd(
        x, residual, weight, bias, eps, is_rms, y, h if residual is not None else None,
        None if is_rms else mean, rstd,
    )
    return y, h, mean, rstd


@_layer_norm_fwd.register_fake
def _(x, residual, weight, bias, eps, is_rms, backend):
    M = x.shape[0]
    return (
        torch.empty_like(x),
        torch.empty_like(x) if residual is not None else x.new_empty(0),
        x.new_empty(0 if is_rms else M, dtype=torch.float32),
        x.new_empty(M, dtype=torch.float32),
    )


@torch.library.custom_op("fastlm::layer_norm_bwd", mutates_args=())
def _layer_norm_bwd(
    dy: Tensor, dh: Optional[Tensor], x: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor,
    is_rms: bool, has_bias: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    dx = torch.empty_like(x)
    dweight = torch.empty_like(weight) if weight is not None else x.new_empty(0)
    dbias = torch.empty_like(weight if weight is not None else x[0]) if has_bias else x.new_empty(0)
    launcher(backend, "layer_norm").layer_norm_bwd(
        dy, dh, x, weight, None if is_rms else mean, rstd, is_rms, dx,
        dweight if weight is not None else None, dbias if has_bias else None,
    )
    return dx, dweight, dbias


@_layer_norm_bwd.register_fake
def _(dy, dh, x, weight, mean, rstd, is_rms, has_bias, backend):
    return (
        torch.empty_like(x),
        torch.empty_like(weight) if weight is not None else x.new_empty(0),
        torch.empty_like(weight if weight is not None else x[0]) if has_bias else x.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps, is_rms, backend = inputs
    y, h, mean, rstd = output
    ctx.save_for_backward(h if residual is not None else x, weight, mean, rstd)
    ctx.is_rms, ctx.has_bias, ctx.has_residual, ctx.backend = is_rms, bias is not None, residual is not None, backend


def _backward(ctx, dy, dh, dmean, drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(x)
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    if dh is not None and ctx.has_residual:
        dh = dh if dh.stride(-1) == 1 else dh.contiguous()
    else:
        dh = None
    dx, dweight, dbias = _layer_norm_bwd(dy, dh, x, weight, mean, rstd, ctx.is_rms, ctx.has_bias, ctx.backend)
    return (
        dx,
        dx if ctx.has_residual else None,
        dweight if weight is not None else None,
        dbias if ctx.has_bias else None,
        None, None, None,
    )


_layer_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


def _normalized_size(op: str, input: Tensor, normalized_shape) -> tuple[int, tuple[int, ...]]:
    if isinstance(normalized_shape, numbers.Integral):
        normalized_shape = (int(normalized_shape),)
    try:
        shape = tuple(int(s) for s in normalized_shape)
    except TypeError:
        raise TypeError(f"fastlm.ops.{op}: normalized_shape must be an int or a sequence of ints, got {normalized_shape!r}") from None
    if len(shape) == 0 or len(shape) > input.dim() or tuple(input.shape[input.dim() - len(shape):]) != shape:
        raise ValueError(
            f"fastlm.ops.{op}: normalized_shape {list(shape)} must equal the trailing dims of input "
            f"shape {list(input.shape)}"
        )
    return math.prod(shape), shape


def _check_param(op: str, name: str, p, input: Tensor, shape) -> None:
    if p is None:
        return
    check_tensor(name, p, op=op, dtypes=FLOAT_DTYPES)
    if tuple(p.shape) != tuple(shape):
        raise ValueError(f"fastlm.ops.{op}: {name} must have shape {list(shape)} (normalized_shape), got {list(p.shape)}")
    if p.dtype not in (input.dtype, torch.float32):
        raise TypeError(f"fastlm.ops.{op}: {name} must be {input.dtype} (the input's dtype) or float32, got {p.dtype}")
    check_same_device(op, "input", input, **{name: p})


def _check_eps(op: str, eps) -> float:
    if not isinstance(eps, numbers.Real) or not eps >= 0 or not math.isfinite(eps):
        raise ValueError(f"fastlm.ops.{op}: eps must be a finite number >= 0, got {eps!r}")
    return float(eps)


def _norm(op, input, shape_arg, residual, weight, bias, eps, is_rms, backend):
    check_tensor("input", input, op=op, dtypes=FLOAT_DTYPES, ndim_min=1)
    N, shape = _normalized_size(op, input, shape_arg)
    _check_param(op, "weight", weight, input, shape)
    _check_param(op, "bias", bias, input, shape)
    if residual is not None:
        check_tensor("residual", residual, op=op)
        if residual.shape != input.shape:
            raise ValueError(f"fastlm.ops.{op}: residual shape {list(residual.shape)} != input shape {list(input.shape)}")
        if residual.dtype != input.dtype:
            raise TypeError(f"fastlm.ops.{op}: residual dtype {residual.dtype} != input dtype {input.dtype}")
        check_same_device(op, "input", input, residual=residual)
    eps = _check_eps(op, eps)
    name = _backend.resolve(backend, input.device, op)
    if name == "torch" or N == 0:
        if residual is not None:
            if is_rms:
                return ref.add_rms_norm(input, residual, weight, eps)
            return ref.add_layer_norm(input, residual, weight, bias, eps)
        if is_rms:
            return ref.rms_norm(input, shape, weight, eps)
        return ref.layer_norm(input, shape, weight, bias, eps)
    check_kernel_dtype(op, name, input=input, weight=weight, bias=bias)
    emulate = emulate_bf16(name, input)
    x, res = input, residual
    if emulate and residual is not None:
        x, res = (input.float() + residual.float()).to(input.dtype), None
    x2 = x.reshape(-1, N)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    r2 = None
    if res is not None:
        r2 = res.reshape(-1, N)
        r2 = r2 if r2.stride(-1) == 1 else r2.contiguous()
    w = weight.reshape(N).contiguous() if weight is not None else None
    b = bias.reshape(N).contiguous() if bias is not None else None
    if emulate:
        x2 = x2.float()
        w, b = (p.float() if p is not None else None for p in (w, b))
    y, h, _, _ = _layer_norm_fwd(x2, r2, w, b, eps, is_rms, name)
    y = y.view(input.shape).to(input.dtype)
    if residual is not None:
        return y, (x if emulate else h.view(input.shape))
    return y


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5, *, backend=None):
    """torch.nn.functional.layer_norm: y = (x - mean) / sqrt(var + eps) * weight + bias over the
    trailing ``normalized_shape`` dims; statistics in fp32; weight/bias in input's dtype or fp32."""
    return _norm("layer_norm", input, normalized_shape, None, weight, bias, eps, False, backend)


def rms_norm(input, normalized_shape, weight=None, eps=None, *, backend=None):
    """torch.nn.functional.rms_norm: y = x / sqrt(mean(x^2) + eps) * weight; eps=None means
    torch.finfo(input.dtype).eps, as in torch."""
    if eps is None and isinstance(input, torch.Tensor) and input.is_floating_point():
        eps = torch.finfo(input.dtype).eps
    return _norm("rms_norm", input, normalized_shape, None, weight, None, eps, True, backend)


def add_layer_norm(x, residual, weight=None, bias=None, eps=1e-5, *, backend=None):
    """h = x + residual; returns (layer_norm(h) over the last dim, h) in one pass."""
    _last = x.shape[-1:] if isinstance(x, torch.Tensor) and x.dim() else ()
    return _norm("add_layer_norm", x, _last, residual if residual is not None else _missing("add_layer_norm"), weight, bias, eps, False, backend)


def add_rms_norm(x, residual, weight=None, eps=None, *, backend=None):
    """h = x + residual; returns (rms_norm(h) over the last dim, h) in one pass."""
    if eps is None and isinstance(x, torch.Tensor) and x.is_floating_point():
        eps = torch.finfo(x.dtype).eps
    _last = x.shape[-1:] if isinstance(x, torch.Tensor) and x.dim() else ()
    return _norm("add_rms_norm", x, _last, residual if residual is not None else _missing("add_rms_norm"), weight, None, eps, True, backend)


def _missing(op):
    raise TypeError(f"fastlm.ops.{op}: residual must be a tensor; use fastlm.ops.{op.removeprefix('add_')} without one")
