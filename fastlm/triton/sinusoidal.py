"""Sinusoidal position encoding and the fused token embedding + encoding, forward and backward, in Triton.

Forward: one program writes a [BLOCK_T tokens, BLOCK_D columns] tile of
weight[id] * scale + PE(pos), reading each weight row slice once and writing the output once;
with no weight it writes the table PE(pos) alone. PE is exact to fp32 at any position: the
frequency base^(-2i/d) = r^i is raised in fp64 from r given as an fp32 (hi, lo) pair, the angle is
formed in fp64, reduced by 2*pi, and cos taken as sin(angle + pi/2), one fp32 sin per element.
Out-of-range ids never load: their output rows are NaN (the op checks ids first unless told not to).

Backward (dweight[v] = scale * sum of dout over the tokens with id v), two modes:
  - atomic: one program per token tile adds its rows into an fp32 gradient with atomic adds; fast,
    but the summation order varies from run to run on a GPU;
  - deterministic: ids sorted (stable) once, then one program per (run of equal ids, column block)
    sums its run's rows in token order and writes the row once: bit-identical on every run, no atomics.
Out-of-range ids contribute nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastlm.triton.rotary import fp32_pair, inv_freq_f64, ratio_pair, reduce_angle, sincos


@triton.jit
def _embed_sinusoidal_fwd_kernel(
    Ids, W, Pos, Out,  # ids (T, S) ints; weight (V, D); positions (T|1, S) ints; out (T, S, D)
    N, S, D, V,  # N = T * S tokens, token n = (n // S, n % S)
    s_it, s_is, s_w0, s_w1, s_pt, s_ps, s_ot, s_os, s_od,  # strides (s_pt = 0 for (S,) positions)
    offset, scale, r_hi, r_lo,  # pos = offset + Pos[t, s] (or offset + s); r = base^(-2/D) = r_hi + r_lo
    HAS_WEIGHT: tl.constexpr, HAS_POS: tl.constexpr, HAS_SCALE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, P_BITS: tl.constexpr,
):
    """out[n, j] = weight[id_n, j] * scale + PE(pos_n, j), PE(pos, j) = sin(pos * r^(j // 2) + (j odd) * pi/2);
    NaN where id_n is outside [0, V). Without HAS_WEIGHT: out = PE. Program
    t-block * cdiv(D, BLOCK_D) + d-block (a 1-D grid, see _grid)."""
    pid = tl.program_id(0)
    d_blocks = tl.cdiv(D, BLOCK_D)
    n = (pid // d_blocks).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = (pid % d_blocks) * BLOCK_D + tl.arange(0, BLOCK_D)
    n_mask = n < N
    c_mask = c < D
    t = n // S
    s = n % S
    if HAS_POS:
        pos = tl.load(Pos + t * s_pt + s * s_ps, mask=n_mask, other=0).to(tl.int64) + offset
    else:
        pos = s + offset
    inv = inv_freq_f64(c // 2, r_hi, r_lo, P_BITS)
    a = reduce_angle(pos.to(tl.float64)[:, None] * inv[None, :])
    cos_a, sin_a = sincos(a)
    out = tl.where((c % 2 == 1)[None, :], cos_a, sin_a)
    mask = n_mask[:, None] & c_mask[None, :]
    if HAS_WEIGHT:
        ids = tl.load(Ids + t * s_it + s * s_is, mask=n_mask, other=0).to(tl.int64)
        valid = (ids >= 0) & (ids < V)
        w = tl.load(W + ids[:, None] * s_w0 + c[None, :] * s_w1, mask=mask & valid[:, None], other=0.0).to(tl.float32)
        if HAS_SCALE:
            w = w * scale
        out = tl.where(valid[:, None], w + out, float("nan"))
    tl.store(Out + t[:, None] * s_ot + s[:, None] * s_os + c[None, :] * s_od, out.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _embed_bwd_atomic_kernel(
    DO, Ids, DW,  # dout (T, S, D); ids (T, S); dweight accumulator (V, D) fp32, contiguous, zeroed
    N, S, D, V,
    s_ot, s_os, s_od, s_it, s_is,
    scale,
    HAS_SCALE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """DW[id_n, :] += dout[n, :] * scale for every token n with a valid id (atomic adds). Program
    t-block * cdiv(D, BLOCK_D) + d-block (a 1-D grid, see _grid)."""
    pid = tl.program_id(0)
    d_blocks = tl.cdiv(D, BLOCK_D)
    n = (pid // d_blocks).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = (pid % d_blocks) * BLOCK_D + tl.arange(0, BLOCK_D)
    n_mask = n < N
    c_mask = c < D
    t = n // S
    s = n % S
    ids = tl.load(Ids + t * s_it + s * s_is, mask=n_mask, other=-1).to(tl.int64)
    valid = n_mask & (ids >= 0) & (ids < V)
    mask = valid[:, None] & c_mask[None, :]
    g = tl.load(DO + t[:, None] * s_ot + s[:, None] * s_os + c[None, :] * s_od, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        g = g * scale
    tl.atomic_add(DW + ids[:, None] * D + c[None, :], g, mask=mask, sem="relaxed")


@triton.jit
def _embed_bwd_sorted_kernel(
    DO, Sorted, Order, DW,  # dout (N, D) rows; ids sorted (N,) int64; their token indices; dweight (V, D)
    N, D, V,
    s_on, s_od, s_w0,
    scale,
    HAS_SCALE: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """For the run of equal ids starting at sorted index i (i = 0 or Sorted[i-1] != Sorted[i]):
    DW[v, cols] = scale * sum over the run, in order, of dout[Order[j], cols]. Other programs exit.
    Program i * cdiv(D, BLOCK_D) + d-block (a 1-D grid, see _grid)."""
    pid = tl.program_id(0)
    d_blocks = tl.cdiv(D, BLOCK_D)
    i = (pid // d_blocks).to(tl.int64)
    c = (pid % d_blocks) * BLOCK_D + tl.arange(0, BLOCK_D)
    c_mask = c < D
    v = tl.load(Sorted + i)
    prev = tl.load(Sorted + i - 1, mask=i > 0, other=-1)
    if ((i == 0) | (prev != v)) & (v >= 0) & (v < V):
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        j = i
        nxt = v
        while nxt == v:
            row = tl.load(Order + j).to(tl.int64)
            acc += tl.load(DO + row * s_on + c * s_od, mask=c_mask, other=0.0).to(tl.float32)
            j += 1
            nxt = tl.load(Sorted + j, mask=j < N, other=-1)
        if HAS_SCALE:
            acc = acc * scale
        tl.store(DW + v * s_w0 + c, acc.to(DW.dtype.element_ty), mask=c_mask)


def _p_bits(dim: int) -> int:
    return max(1, ((dim - 1) // 2).bit_length())


def _tiles(N: int, D: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_D): 2k-element tiles on a GPU, larger ones in the interpreter."""
    block_d = min(triton.next_power_of_2(D), 256 if device.type == "cuda" else 1024)
    elems = 2048 if device.type == "cuda" else 16384
    return min(triton.next_power_of_2(N), max(1, elems // block_d)), block_d


def _grid(rows: int, block_rows: int, D: int, block_d: int) -> tuple[int]:
    """One grid dimension (x, up to 2^31 - 1 programs) for (row block, column block), which the
    kernels split again: token and column block counts can exceed the 65535 of grid y."""
    return (triton.cdiv(rows, block_rows) * triton.cdiv(D, block_d),)


def _fwd(ids, weight, positions, offset, scale, base, out) -> None:
    T, S, D = out.shape
    N = T * S
    if N == 0 or D == 0:
        return
    block_t, block_d = _tiles(N, D, out.device)
    r_hi, r_lo = ratio_pair(base, D)
    has_w = weight is not None
    pt = 0
    if positions is not None and positions.dim() == 2 and positions.shape[0] == T and T > 1:
        pt = positions.stride(0)
    _embed_sinusoidal_fwd_kernel[_grid(N, block_t, D, block_d)](
        ids, weight, positions, out,
        N, S, D, weight.shape[0] if has_w else 0,
        ids.stride(0) if has_w else 0, ids.stride(1) if has_w else 0,
        weight.stride(0) if has_w else 0, weight.stride(1) if has_w else 0,
        pt, positions.stride(-1) if positions is not None else 0,
        *out.stride(),
        offset, 1.0 if scale is None else float(scale), r_hi, r_lo,
        HAS_WEIGHT=has_w, HAS_POS=positions is not None, HAS_SCALE=scale is not None,
        BLOCK_T=block_t, BLOCK_D=block_d, P_BITS=_p_bits(D), num_warps=4,
    )


def sinusoidal_fwd(positions, base, out) -> None:
    """out (T, S, dim) = PE(positions (T, S) ints) in out's dtype."""
    _fwd(None, None, positions, 0, None, base, out)


def embed_sinusoidal_fwd(input_ids, weight, positions, offset, scale, base, out) -> None:
    """out (T, S, D) = weight[input_ids (T, S)] * scale + PE(pos); pos = offset + positions[t, s] for
    positions (S,) or (T, S), offset + s for positions None. scale None means 1. Rows of
    out-of-range ids are NaN (nothing is read for them)."""
    _fwd(input_ids, weight, positions, offset, scale, base, out)


def embed_sinusoidal_bwd(dout, input_ids, scale, deterministic, dweight) -> None:
    """dweight (V, D) = scale * sum of dout (T, S, D) rows per id of input_ids (T, S); rows with no
    token are zero; out-of-range ids are skipped. deterministic: sorted runs, no atomics."""
    T, S, D = dout.shape
    V = dweight.shape[0]
    N = T * S
    dweight.zero_()
    if N == 0 or D == 0 or V == 0:
        return
    sc = 1.0 if scale is None else float(scale)
    if deterministic:
        flat = input_ids.reshape(N).to(torch.int64)
        sorted_ids, order = torch.sort(flat, stable=True)
        d2 = dout.reshape(N, D)
        block_d = min(triton.next_power_of_2(D), 1024)
        _embed_bwd_sorted_kernel[_grid(N, 1, D, block_d)](
            d2, sorted_ids, order, dweight, N, D, V, d2.stride(0), d2.stride(1), dweight.stride(0), sc,
            HAS_SCALE=scale is not None, BLOCK_D=block_d, num_warps=4,
        )
        return
    acc = dweight if dweight.dtype == torch.float32 and dweight.is_contiguous() else torch.zeros(
        (V, D), device=dweight.device, dtype=torch.float32
    )
    block_t, block_d = _tiles(N, D, dout.device)
    _embed_bwd_atomic_kernel[_grid(N, block_t, D, block_d)](
        dout, input_ids, acc, N, S, D, V, *dout.stride(), *input_ids.stride(), sc,
        HAS_SCALE=scale is not None, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4,
    )
    if acc is not dweight:
        dweight.copy_(acc)


__all__ = ["sinusoidal_fwd", "embed_sinusoidal_fwd", "embed_sinusoidal_bwd", "fp32_pair"]
