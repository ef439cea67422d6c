"""LayerNorm and RMSNorm launchers for the CUDA backend (csrc/layer_norm.cu through fastlm._C, or
fastlm._C_host on CPU tensors).

Same signatures as fastlm/triton/layer_norm.py: they write into caller-given outputs (None where
absent), pass data_ptr()s, row strides and the current stream to the plain-CUDA launchers, and raise
on a non-zero CUDA error code. Importable without the extension: _C is loaded on first call.
"""

from __future__ import annotations

import torch

from fastlm.cuda import DTYPE_CODE, check, check_device, dtype_code, lib, ptr, stream_handle


def _rows(name: str, t: torch.Tensor | None, shape: tuple[int, int], dtype: torch.dtype, device) -> int:
    """Row stride of an (M, N) operand with unit column stride (0 for None)."""
    if t is None:
        return 0
    if t.dim() != 2 or tuple(t.shape) != shape:
        raise ValueError(f"cuda layer_norm: {name} must have shape {shape}, got {tuple(t.shape)}")
    if t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(f"cuda layer_norm: {name} must have unit column stride, got strides {t.stride()}")
    if t.dtype != dtype:
        raise ValueError(f"cuda layer_norm: {name} must be {dtype}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"cuda layer_norm: {name} is on {t.device}, expected {device}")
    return t.stride(0)


def _vector(name: str, t: torch.Tensor | None, n: int, dtype: torch.dtype | None, device) -> None:
    """Checks an (N,) contiguous operand (weight, bias, their gradients) or a (M,) fp32 statistic."""
    if t is None:
        return
    if t.dim() != 1 or t.shape[0] != n or (n > 1 and t.stride(0) != 1):
        raise ValueError(f"cuda layer_norm: {name} must be contiguous with shape ({n},), got {tuple(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"cuda layer_norm: {name} must be {dtype}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"cuda layer_norm: {name} is on {t.device}, expected {device}")


def _param_dtype(x: torch.Tensor, *params: torch.Tensor | None) -> torch.dtype:
    """The dtype shared by weight-shaped tensors: x's or float32; x's when there are none."""
    dtypes = {p.dtype for p in params if p is not None}
    if not dtypes:
        return x.dtype
    if len(dtypes) > 1:
        raise ValueError(f"cuda layer_norm: weight, bias and their gradients must share a dtype, got {sorted(map(str, dtypes))}")
    (dt,) = dtypes
    if dt not in (x.dtype, torch.float32):
        raise ValueError(f"cuda layer_norm: weights must be {x.dtype} or torch.float32 for {x.dtype} input, got {dt}")
    return dt


def _check_device(x: torch.Tensor) -> None:
    check_device("cuda layer_norm", x)
    dtype_code(x)


def layer_norm_fwd(x, residual, weight, bias, eps, is_rms, y, h, mean, rstd) -> None:
    """y = norm(x + residual) * weight + bias; h = x + residual (rounded to x's dtype, and the value
    normalized); mean (M,) fp32 (None when is_rms), rstd (M,) fp32. x, residual, y, h: (M, N) with
    unit column stride; weight, bias: (N,) contiguous in x's dtype or float32, or None."""
    _check_device(x)
    if x.dim() != 2:
        raise ValueError(f"cuda layer_norm: x must be 2-D (M, N), got shape {tuple(x.shape)}")
    M, N = x.shape
    dev = x.device
    sx = _rows("x", x, (M, N), x.dtype, dev)
    sr = _rows("residual", residual, (M, N), x.dtype, dev)
    sy = _rows("y", y, (M, N), x.dtype, dev)
    sh = _rows("h", h, (M, N), x.dtype, dev)
    wdt = _param_dtype(x, weight, bias)
    _vector("weight", weight, N, wdt, dev)
    _vector("bias", bias, N, wdt, dev)
    _vector("mean", mean, M, torch.float32, dev)
    _vector("rstd", rstd, M, torch.float32, dev)
    if M == 0 or N == 0:
        return
    code = lib(dev).layer_norm_fwd(
        ptr(x), ptr(residual), ptr(weight), ptr(bias), ptr(y), ptr(h), ptr(mean), ptr(rstd),
        M, N, sx, sr, sy, sh, float(eps), bool(is_rms),
        dtype_code(x), DTYPE_CODE[wdt], stream_handle(x),
    )
    check(code, "layer_norm_fwd")


def layer_norm_bwd(dy, dh, x, weight, mean, rstd, is_rms, dx, dweight, dbias) -> None:
    """dx = d norm / dx (plus dh, the upstream gradient of h); dweight, dbias: (N,) or None, summed
    over rows deterministically through an fp32 workspace (which also holds the row dot products
    of long rows). x is the normalized input (h after a residual add); mean is None when is_rms."""
    _check_device(x)
    if x.dim() != 2:
        raise ValueError(f"cuda layer_norm: x must be 2-D (M, N), got shape {tuple(x.shape)}")
    M, N = x.shape
    dev = x.device
    sdy = _rows("dy", dy, (M, N), x.dtype, dev)
    sdh = _rows("dh", dh, (M, N), x.dtype, dev)
    sx = _rows("x", x, (M, N), x.dtype, dev)
    sdx = _rows("dx", dx, (M, N), x.dtype, dev)
    if dy is None or dx is None:
        raise ValueError("cuda layer_norm: dy and dx are required")
    wdt = _param_dtype(x, weight, dweight, dbias)
    _vector("weight", weight, N, wdt, dev)
    _vector("dweight", dweight, N, wdt, dev)
    _vector("dbias", dbias, N, wdt, dev)
    _vector("rstd", rstd, M, torch.float32, dev)
    if not is_rms:
        if mean is None:
            raise ValueError("cuda layer_norm: mean is required unless is_rms")
        _vector("mean", mean, M, torch.float32, dev)
    if N == 0:
        return
    if M == 0:
        for g in (dweight, dbias):
            if g is not None:
                g.zero_()
        return
    C = lib(dev)
    nbytes = C.layer_norm_bwd_workspace_size(M, N)
    if nbytes < 0:
        raise RuntimeError(f"cuda layer_norm: cannot query the SM count of {dev}")
    workspace = torch.empty(nbytes // 4, dtype=torch.float32, device=dev)
    code = C.layer_norm_bwd(
        ptr(dy), ptr(dh), ptr(x), ptr(weight), ptr(None if is_rms else mean), ptr(rstd),
        ptr(dx), ptr(dweight), ptr(dbias), ptr(workspace),
        M, N, sdy, sdh, sx, sdx, bool(is_rms),
        dtype_code(x), DTYPE_CODE[wdt], stream_handle(x),
    )
    check(code, "layer_norm_bwd")

