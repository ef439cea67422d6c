"""LayerNorm and RMSNorm (optionally fused with a residual add) in Triton, forward and backward.

Forward, one program per row: for hidden sizes up to MAX_FUSED_N the whole row lives in
registers, so x is read from memory once and y written once (the bandwidth floor). Longer rows
take two passes in BLOCK_N chunks: pass 1 reads x (and the residual, writing h) and keeps
per-lane Welford statistics, merged across lanes by Chan's rule (as exact as a centred two-pass
variance, unlike E[x^2] - E[x]^2); pass 2 re-reads x (or h) and writes y. Statistics are fp32.
Backward: rows up to MAX_FUSED_N_BWD are held in registers by a program that owns a contiguous
range of rows and writes one fp32 partial row of dweight/dbias. Longer rows take two passes over
x and dy: the row dot products (c1, c2) per row, then dx by (column block, row group) programs
that keep their partials in registers and prefetch the next row (cp.async pipelining). A column
kernel sums the partials in a fixed order (deterministic). Feature flags (IS_RMS, HAS_RESIDUAL,
HAS_WEIGHT, HAS_BIAS, HAS_DH) are constexprs, so one kernel serves every variant.
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
# this the backward takes the two-kernel long-row path.
MAX_FUSED_N_BWD = 8192
# The long-row dx kernel: columns per program, warps, and pipeline stages of its row loop.
BWD_BLOCK_N = 1024
BWD_WARPS = 4
BWD_STAGES = 2


def _num_warps(block_n: int) -> int:
    return min(max(block_n // 512, 1), 16)


@triton.jit
def _layer_norm_fwd_kernel(
    X, R, W, B, Y, H, Mean, Rstd,  # x, residual, weight, bias in; y, h = x + r, mean, rstd out
    Loads,  # (M, 3) int32 element loads of x, residual, h per row; only with COUNT_LOADS
    stride_x, stride_r, stride_y, stride_h,  # row strides (columns are unit-stride)
    N, eps,
    IS_RMS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, ONE_BLOCK: tl.constexpr, COUNT_LOADS: tl.constexpr = False,
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
        if COUNT_LOADS:
            tl.atomic_add(Loads + row * 3, tl.sum(mask.to(tl.int32), axis=0))
        if HAS_RESIDUAL:
            h = (x + tl.load(R + cols, mask=mask, other=0.0).to(tl.float32)).to(H.dtype.element_ty)
            tl.store(H + cols, h, mask=mask)
            x = h.to(tl.float32)
            if COUNT_LOADS:
                tl.atomic_add(Loads + row * 3 + 1, tl.sum(mask.to(tl.int32), axis=0))
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
        # Pass 1: h = x + r stored, and per-lane Welford statistics (lane l sees cols = l + k * BLOCK_N,
        # in-bounds lanes all at count k + 1 after chunk k), merged across lanes by Chan's formula.
        lanes = tl.arange(0, BLOCK_N)
        acc_mean = tl.zeros([BLOCK_N], dtype=tl.float32)
        acc_m2 = tl.zeros([BLOCK_N], dtype=tl.float32)
        num_chunks = tl.cdiv(N, BLOCK_N)
        for k in range(0, num_chunks):
            cols = k * BLOCK_N + lanes
            mask = cols < N
            x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
            if COUNT_LOADS:
                tl.atomic_add(Loads + row * 3, tl.sum(mask.to(tl.int32), axis=0))
            if HAS_RESIDUAL:
                h = (x + tl.load(R + cols, mask=mask, other=0.0).to(tl.float32)).to(H.dtype.element_ty)
                tl.store(H + cols, h, mask=mask)
                x = h.to(tl.float32)
                if COUNT_LOADS:
                    tl.atomic_add(Loads + row * 3 + 1, tl.sum(mask.to(tl.int32), axis=0))
            if IS_RMS:
                acc_m2 += x * x
            else:
                delta = x - acc_mean
                new_mean = acc_mean + delta * (1.0 / (k + 1.0))
                acc_m2 = tl.where(mask, acc_m2 + delta * (x - new_mean), acc_m2)
                acc_mean = tl.where(mask, new_mean, acc_mean)
        if IS_RMS:
            mean = 0.0
            rstd = 1.0 / tl.sqrt(tl.sum(acc_m2, axis=0) / N + eps)
        else:
            count = tl.where(lanes < N - (num_chunks - 1) * BLOCK_N, num_chunks, num_chunks - 1).to(tl.float32)
            mean = tl.sum(count * acc_mean, axis=0) / N
            mean += tl.sum(count * (acc_mean - mean), axis=0) / N
            dev = acc_mean - mean
            rstd = 1.0 / tl.sqrt(tl.sum(acc_m2 + count * dev * dev, axis=0) / N + eps)
            tl.store(Mean + row, mean)
        tl.store(Rstd + row, rstd)
        # Pass 2: normalize h (re-read from H after a residual add, else x) and write y.
        for k in range(0, num_chunks):
            cols = k * BLOCK_N + lanes
            mask = cols < N
            if HAS_RESIDUAL:
                x = tl.load(H + cols, mask=mask, other=0.0).to(tl.float32)
                if COUNT_LOADS:
                    tl.atomic_add(Loads + row * 3 + 2, tl.sum(mask.to(tl.int32), axis=0))
            else:
                x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
                if COUNT_LOADS:
                    tl.atomic_add(Loads + row * 3, tl.sum(mask.to(tl.int32), axis=0))
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
    BLOCK_N: tl.constexpr,
):
    """Rows up to MAX_FUSED_N_BWD, each in registers: x and dy read once.
    xhat = (x - mean) * rstd (RMS: x * rstd), g = dy * w, c1 = mean(g * xhat), c2 = mean(g);
    LN: dx = rstd * (g - xhat * c1 - c2);  RMS: dx = rstd * (g - xhat * c1);  dx += dh.
    Partials: dw_p = sum over this program's rows of dy * xhat, db_p = sum of dy."""
    pid = tl.program_id(0)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    part = pid.to(tl.int64) * N
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


@triton.jit
def _layer_norm_bwd_dots_kernel(
    DY, X, W, Mean, Rstd, Dots,  # Dots: (M, 2) fp32 out, (c1, c2) per row
    stride_dy, stride_x, N,
    IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Backward pass 1 of a long row: g = dy * w, xhat = (x - mean) * rstd (RMS: x * rstd);
    c1 = mean(g * xhat), c2 = mean(g) (0 for RMS). One program per row, x and dy read once."""
    row = tl.program_id(0).to(tl.int64)
    rstd = tl.load(Rstd + row)
    mean = 0.0
    if not IS_RMS:
        mean = tl.load(Mean + row)
    acc1 = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_N], dtype=tl.float32)
    for off in range(0, N, BLOCK_N):
        cols = off + tl.arange(0, BLOCK_N)
        mask = cols < N
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            g *= tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        xhat = tl.where(mask, (x - mean) * rstd, 0.0)
        acc1 += g * xhat
        acc2 += g
    tl.store(Dots + 2 * row, tl.sum(acc1, axis=0) / N)
    if IS_RMS:
        tl.store(Dots + 2 * row + 1, 0.0)
    else:
        tl.store(Dots + 2 * row + 1, tl.sum(acc2, axis=0) / N)


@triton.jit
def _layer_norm_bwd_dx_kernel(
    DY, DH, X, W, Mean, Rstd, Dots, DX, DW_part, DB_part,  # DW_part/DB_part: (groups, N) fp32
    stride_dy, stride_dh, stride_x, stride_dx,
    M, N, rows_per_program,
    IS_RMS: tl.constexpr, HAS_DH: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """Backward pass 2 of long rows, program (column block j, row group p): for its rows,
    dx = rstd * (g - xhat * c1 - c2) + dh with (c1, c2) from the dots kernel; its fp32 dweight and
    dbias partials (sum of dy * xhat, of dy) stay in registers and are written once, to row p.
    The row loop is software-pipelined (NUM_STAGES): the next row's x and dy load during this one."""
    j = tl.program_id(0)
    p = tl.program_id(1)
    cols = j * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_start = p * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for row in tl.range(row_start, row_end, num_stages=NUM_STAGES):
        r = tl.cast(row, tl.int64)
        x = tl.load(X + r * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + r * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(Rstd + r)
        c1 = tl.load(Dots + 2 * r)
        c2 = tl.load(Dots + 2 * r + 1)
        if IS_RMS:
            xhat = x * rstd
        else:
            xhat = tl.where(mask, (x - tl.load(Mean + r)) * rstd, 0.0)
        g = dy
        if HAS_WEIGHT:
            g = dy * w
            dw += dy * xhat
        if HAS_BIAS:
            db += dy
        dx = (g - xhat * c1 - c2) * rstd
        if HAS_DH:
            dx += tl.load(DH + r * stride_dh + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + r * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
    part = p.to(tl.int64) * N
    if HAS_WEIGHT:
        tl.store(DW_part + part + cols, dw, mask=mask)
    if HAS_BIAS:
        tl.store(DB_part + part + cols, db, mask=mask)


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


def layer_norm_fwd(x, residual, weight, bias, eps, is_rms, y, h, mean, rstd, loads=None) -> None:
    """Launch the forward into caller-given outputs. x, residual, y, h: (M, N) with unit column
    stride; weight, bias: (N,) or None; mean (M,) fp32 (None when is_rms), rstd (M,) fp32.
    loads: None, or a zeroed (M, 3) int32 tensor that gets, per row, the number of elements of x,
    residual and h the kernel loaded (a pass-count probe; the kernel without it has no counter)."""
    M, N = x.shape
    if M == 0 or N == 0:
        return
    block_n, one_block = _block_n(N)
    _layer_norm_fwd_kernel[_fwd_grid(M)](
        x, residual, weight, bias, y, h, mean, rstd, loads,
        x.stride(0), residual.stride(0) if residual is not None else 0, y.stride(0),
        h.stride(0) if h is not None else 0,
        N, eps,
        IS_RMS=is_rms, HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None, BLOCK_N=block_n, ONE_BLOCK=one_block, COUNT_LOADS=loads is not None,
        num_warps=_num_warps(block_n),
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


def _bwd_long_plan(M: int, N: int, sm_count: int | None) -> tuple[int, int, int]:
    """(column blocks, row groups, rows_per_program) of the long-row dx kernel: BWD_BLOCK_N columns
    per program and enough row groups for about 2 programs per SM (4 in the interpreter)."""
    col_blocks = triton.cdiv(N, BWD_BLOCK_N)
    target = 4 if sm_count is None else 2 * sm_count
    groups = max(1, min(M, triton.cdiv(target, col_blocks)))
    rows_per_program = triton.cdiv(M, groups)
    return col_blocks, triton.cdiv(M, rows_per_program), rows_per_program


def layer_norm_bwd(dy, dh, x, weight, mean, rstd, is_rms, dx, dweight, dbias) -> None:
    """Launch the backward into caller-given outputs. x is the normalized input (h after a
    residual add); dh, the upstream gradient of h, is added to dx. dweight/dbias: (N,) or None.
    Rows up to MAX_FUSED_N_BWD: one kernel, a row per pass in registers. Longer rows: two passes
    over x and dy, the row dot products (c1, c2), then dx with the partials kept in registers."""
    M, N = x.shape
    if N == 0:
        return
    if M == 0:
        for g in (dweight, dbias):
            if g is not None:
                g.zero_()
        return
    need_w, need_b = dweight is not None, dbias is not None
    flags = dict(IS_RMS=is_rms, HAS_WEIGHT=weight is not None)
    strides = (dy.stride(0), dh.stride(0) if dh is not None else 0, x.stride(0), dx.stride(0))
    block_n = triton.next_power_of_2(N)
    if block_n <= MAX_FUSED_N_BWD:
        programs, rows_per_program = _bwd_plan(M, _sm_count(x.device))
        dw_part = torch.empty((programs, N), device=x.device, dtype=torch.float32) if need_w else None
        db_part = torch.empty((programs, N), device=x.device, dtype=torch.float32) if need_b else None
        _layer_norm_bwd_kernel[(programs,)](
            dy, dh, x, weight, mean, rstd, dx, dw_part, db_part, *strides, M, N, rows_per_program,
            HAS_DH=dh is not None, HAS_BIAS=need_b, BLOCK_N=block_n, num_warps=_num_warps(block_n), **flags,
        )
    else:
        dots = torch.empty((M, 2), device=x.device, dtype=torch.float32)
        _layer_norm_bwd_dots_kernel[(M,)](
            dy, x, weight, mean, rstd, dots, dy.stride(0), x.stride(0), N,
            BLOCK_N=CHUNK_N, num_warps=_num_warps(CHUNK_N), **flags,
        )
        col_blocks, programs, rows_per_program = _bwd_long_plan(M, N, _sm_count(x.device))
        dw_part = torch.empty((programs, N), device=x.device, dtype=torch.float32) if need_w else None
        db_part = torch.empty((programs, N), device=x.device, dtype=torch.float32) if need_b else None
        _layer_norm_bwd_dx_kernel[(col_blocks, programs)](
            dy, dh, x, weight, mean, rstd, dots, dx, dw_part, db_part, *strides, M, N, rows_per_program,
            HAS_DH=dh is not None, HAS_BIAS=need_b, BLOCK_N=BWD_BLOCK_N, NUM_STAGES=BWD_STAGES,
            num_warps=BWD_WARPS, **flags,
        )
    for part, out in ((dw_part, dweight), (db_part, dbias)):
        if out is not None:
            _sum_partials_kernel[_sum_grid(N, 128)](part, out, programs, N, BLOCK_P=32, BLOCK_N=128)
