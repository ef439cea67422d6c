"""LayerNorm and RMSNorm (optionally fused with a residual add) in Triton, forward and backward.

One program normalizes one row: for hidden sizes up to MAX_FUSED_N the whole row lives in
registers, so x is read from memory once and y written once (the bandwidth floor); longer rows
are processed in BLOCK_N chunks with one extra read of x per pass. Statistics are fp32. The
backward writes dx per row and reduces the weight and bias gradients in two deterministic stages:
each program owns a contiguous range of rows and writes one fp32 partial row, then a column
kernel sums the partials in a fixed order. Feature flags (IS_RMS, HAS_RESIDUAL, HAS_WEIGHT,
HAS_BIAS, HAS_DH) are constexprs, so one kernel serves every variant.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_FUSED_N = 16384
CHUNK_N = 4096


def _block_n(n: int, max_fused: int = MAX_FUSED_N) -> tuple[int, bool]:
    """(BLOCK_N, ONE_BLOCK): the whole row as one power-of-two block, or chunks of CHUNK_N."""
    block = triton.next_power_of_2(max(n, 1))
    if block <= max_fused:
        return block, True
    return CHUNK_N, False


# The backward holds x, dy, the weight and their fp32 products per element: a fused 16384-row
# needs more than the 128 registers a thread of a 16-warp block may have, so it spills; above
# this the backward takes the chunked path.
MAX_FUSED_N_BWD = 8192


def _num_warps(block_n: int) -> int:
    return min(max(block_n // 512, 1), 16)


@triton.jit
def _layer_norm_fwd_kernel(
    X, R, W, B, Y, H, Mean, Rstd,  # x, residual, weight, bias in; y, h = x + r, mean, rstd out
    stride_x, stride_r, stride_y, stride_h,  # row strides (columns are unit-stride)
    N, eps,
    IS_RMS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, ONE_BLOCK: tl.constexpr,
):
    """h = x + r, rounded to x's dtype (it is stored and normalized as stored);  LN: y = (h - mean) * rstd * w + b,  rstd = 1/sqrt(mean((h - mean)^2) + eps);
    RMS: y = h * rstd * w,  rstd = 1/sqrt(mean(h^2) + eps)."""
    row = tl.program_id(0).to(tl.int64)
    X += row * stride_x
    Y += row * stride_y
    if HAS_RESIDUAL:
        R += row * stride_r
        H += row * stride_h
    if ONE_BLOCK:
        cols = tl.arange(0, BLOCK_N)
        mask = cols < N
        x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            h = (x + tl.load(R + cols, mask=mask, other=0.0).to(tl.float32)).to(H.dtype.element_ty)
            tl.store(H + cols, h, mask=mask)
            x = h.to(tl.float32)
        if IS_RMS:
            xc = x
        else:
            mean = tl.sum(x, axis=0) / N
            xc = tl.where(mask, x - mean, 0.0)
            tl.store(Mean + row, mean)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / N + eps)
        tl.store(Rstd + row, rstd)
        y = xc * rstd
        if HAS_WEIGHT:
            y *= tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + cols, y.to(Y.dtype.element_ty), mask=mask)
    else:
        mean = 0.0
        if not IS_RMS:
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            for off in range(0, N, BLOCK_N):
                cols = off + tl.arange(0, BLOCK_N)
                mask = cols < N
                x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
                if HAS_RESIDUAL:
                    x = (x + tl.load(R + cols, mask=mask, other=0.0).to(tl.float32)).to(H.dtype.element_ty).to(tl.float32)
                acc += x
            mean = tl.sum(acc, axis=0) / N
            tl.store(Mean + row, mean)
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for off in range(0, N, BLOCK_N):
            cols = off + tl.arange(0, BLOCK_N)
            mask = cols < N
            x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                x = (x + tl.load(R + cols, mask=mask, other=0.0).to(tl.float32)).to(H.dtype.element_ty).to(tl.float32)
            xc = tl.where(mask, x - mean, 0.0)
            acc += xc * xc
        rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / N + eps)
        tl.store(Rstd + row, rstd)
        for off in range(0, N, BLOCK_N):
            cols = off + tl.arange(0, BLOCK_N)
            mask = cols < N
            x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                h = (x + tl.load(R + cols, mask=mask, other=0.0).to(tl.float32)).to(H.dtype.element_ty)
                tl.store(H + cols, h, mask=mask)
                x = h.to(tl.float32)
            y = (x - mean) * rstd
            if HAS_WEIGHT:
                y *= tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                y += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(Y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_bwd_kernel(
    DY, DH, X, W, Mean, Rstd, DX, DW_part, DB_part,  # DW_part/DB_part: (programs, N) fp32 partials
    stride_dy, stride_dh, stride_x, stride_dx,
    M, N, rows_per_program,
    IS_RMS: tl.constexpr, HAS_DH: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, ONE_BLOCK: tl.constexpr,
):
    """xhat = (x - mean) * rstd (RMS: x * rstd), g = dy * w, c1 = mean(g * xhat), c2 = mean(g);
    LN: dx = rstd * (g - xhat * c1 - c2);  RMS: dx = rstd * (g - xhat * c1);  dx += dh.
    Partials: dw_p = sum over this program's rows of dy * xhat, db_p = sum of dy."""
    pid = tl.program_id(0)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    part = pid.to(tl.int64) * N
    if ONE_BLOCK:
        cols = tl.arange(0, BLOCK_N)
        mask = cols < N
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK_N], dtype=tl.float32)
        db = tl.zeros([BLOCK_N], dtype=tl.float32)
        for row in range(row_start, row_end):
            r = tl.cast(row, tl.int64)
            x = tl.load(X + r * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + r * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(Rstd + r)
            if IS_RMS:
                xhat = x * rstd
            else:
                xhat = tl.where(mask, (x - tl.load(Mean + r)) * rstd, 0.0)
            if HAS_WEIGHT:
                g = dy * w
                dw += dy * xhat
            else:
                g = dy
            if HAS_BIAS:
                db += dy
            c1 = tl.sum(g * xhat, axis=0) / N
            if IS_RMS:
                dx = (g - xhat * c1) * rstd
            else:
                c2 = tl.sum(g, axis=0) / N
                dx = (g - xhat * c1 - c2) * rstd
            if HAS_DH:
                dx += tl.load(DH + r * stride_dh + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + r * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_WEIGHT:
            tl.store(DW_part + part + cols, dw, mask=mask)
        if HAS_BIAS:
            tl.store(DB_part + part + cols, db, mask=mask)
    else:
        for off in range(0, N, BLOCK_N):
            cols = off + tl.arange(0, BLOCK_N)
            mask = cols < N
            if HAS_WEIGHT:
                tl.store(DW_part + part + cols, tl.zeros([BLOCK_N], dtype=tl.float32), mask=mask)
            if HAS_BIAS:
                tl.store(DB_part + part + cols, tl.zeros([BLOCK_N], dtype=tl.float32), mask=mask)
        for row in range(row_start, row_end):
            r = tl.cast(row, tl.int64)
            rstd = tl.load(Rstd + r)
            mean = 0.0
            if not IS_RMS:
                mean = tl.load(Mean + r)
            acc1 = tl.zeros([BLOCK_N], dtype=tl.float32)
            acc2 = tl.zeros([BLOCK_N], dtype=tl.float32)
            for off in range(0, N, BLOCK_N):
                cols = off + tl.arange(0, BLOCK_N)
                mask = cols < N
                x = tl.load(X + r * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
                g = tl.load(DY + r * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
                if HAS_WEIGHT:
                    g *= tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
                xhat = tl.where(mask, (x - mean) * rstd, 0.0)
                acc1 += g * xhat
                acc2 += g
            c1 = tl.sum(acc1, axis=0) / N
            c2 = 0.0
            if not IS_RMS:
                c2 = tl.sum(acc2, axis=0) / N
            for off in range(0, N, BLOCK_N):
                cols = off + tl.arange(0, BLOCK_N)
                mask = cols < N
                x = tl.load(X + r * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + r * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
                xhat = tl.where(mask, (x - mean) * rstd, 0.0)
                g = dy
                if HAS_WEIGHT:
                    g = dy * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
                    p = tl.load(DW_part + part + cols, mask=mask, other=0.0)
                    tl.store(DW_part + part + cols, p + dy * xhat, mask=mask)
                if HAS_BIAS:
                    p = tl.load(DB_part + part + cols, mask=mask, other=0.0)
                    tl.store(DB_part + part + cols, p + dy, mask=mask)
                dx = (g - xhat * c1 - c2) * rstd
                if HAS_DH:
                    dx += tl.load(DH + r * stride_dh + cols, mask=mask, other=0.0).to(tl.float32)
                tl.store(DX + r * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _sum_partials_kernel(P, Out, num_parts, N, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """Out[n] = sum_p P[p, n], summed in a fixed order (deterministic)."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    for p0 in range(0, num_parts, BLOCK_P):
        parts = p0 + tl.arange(0, BLOCK_P)
        m = (parts[:, None] < num_parts) & cmask[None, :]
        acc += tl.load(P + parts[:, None].to(tl.int64) * N + cols[None, :], mask=m, other=0.0)
    tl.store(Out + cols, tl.sum(acc, axis=0).to(Out.dtype.element_ty), mask=cmask)


def layer_norm_fwd(x, residual, weight, bias, eps, is_rms, y, h, mean, rstd) -> None:
    """Launch the forward into caller-given outputs. x, residual, y, h: (M, N) with unit column
    stride; weight, bias: (N,) or None; mean (M,) fp32 (None when is_rms), rstd (M,) fp32."""
    M, N = x.shape
    if M == 0 or N == 0:
        return
    block_n, one_block = _block_n(N)
    _layer_norm_fwd_kernel[_fwd_grid(M)](
        x, residual, weight, bias, y, h, mean, rstd,
        x.stride(0), residual.stride(0) if residual is not None else 0, y.stride(0),
        h.stride(0) if h is not None else 0,
        N, eps,
        IS_RMS=is_rms, HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None, BLOCK_N=block_n, ONE_BLOCK=one_block, num_warps=_num_warps(block_n),
    )


def _bwd_plan(M: int, sm_count: int | None) -> tuple[int, int]:
    """(programs, rows_per_program) of the backward: about 2 programs per SM on a GPU (sm_count
    SMs), 4 in the interpreter (sm_count None); each program owns a run of rows and one partial
    row of dweight/dbias."""
    programs = max(1, min(M, 4 if sm_count is None else 2 * sm_count))
    rows_per_program = triton.cdiv(M, programs)
    return triton.cdiv(M, rows_per_program), rows_per_program


def _fwd_grid(M: int) -> tuple[int]:
    """One program per row, on grid x (up to 2^31 - 1)."""
    return (M,)


def _sum_grid(N: int, block_n: int) -> tuple[int]:
    return (triton.cdiv(N, block_n),)


def _sm_count(device: torch.device) -> int | None:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else None


def layer_norm_bwd(dy, dh, x, weight, mean, rstd, is_rms, dx, dweight, dbias) -> None:
    """Launch the backward into caller-given outputs. x is the normalized input (h after a
    residual add); dh, the upstream gradient of h, is added to dx. dweight/dbias: (N,) or None."""
    M, N = x.shape
    if N == 0:
        return
    if M == 0:
        for g in (dweight, dbias):
            if g is not None:
                g.zero_()
        return
    block_n, one_block = _block_n(N, MAX_FUSED_N_BWD)
    programs, rows_per_program = _bwd_plan(M, _sm_count(x.device))
    need_w, need_b = dweight is not None, dbias is not None
    dw_part = torch.empty((programs, N), device=x.device, dtype=torch.float32) if need_w else None
    db_part = torch.empty((programs, N), device=x.device, dtype=torch.float32) if need_b else None
    _layer_norm_bwd_kernel[(programs,)](
        dy, dh, x, weight, mean, rstd, dx, dw_part, db_part,
        dy.stride(0), dh.stride(0) if dh is not None else 0, x.stride(0), dx.stride(0),
        M, N, rows_per_program,
        IS_RMS=is_rms, HAS_DH=dh is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=need_b,
        BLOCK_N=block_n, ONE_BLOCK=one_block, num_warps=_num_warps(block_n),
    )
    for part, out in ((dw_part, dweight), (db_part, dbias)):
        if out is not None:
            _sum_partials_kernel[_sum_grid(N, 128)](part, out, programs, N, BLOCK_P=32, BLOCK_N=128)
