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
  - deterministic: ids sorted (stable) once, then a segmented reduction: the sorted positions split
    into chunks of CHUNK_ROWS; a program sums, in order, each run segment of its chunks (a tile row
    per chunk); a segment that is a whole run is written to dweight, one touching a chunk edge goes
    to an fp32 workspace (the chunk's first / last partial); a second kernel adds each crossing
    run's partials in a fixed order. No atomics, nothing depends on the schedule: bit-identical on
    every run, and a frequent id is summed by as many programs as it has chunks.
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
def _chunks_and_columns(D, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's BLOCK_C chunk indices and BLOCK_D columns (with their mask) of a 1-D grid of
    chunk-block * cdiv(D, BLOCK_D) + d-block."""
    pid = tl.program_id(0)
    d_blocks = tl.cdiv(D, BLOCK_D)
    c = (pid % d_blocks) * BLOCK_D + tl.arange(0, BLOCK_D)
    return (pid // d_blocks).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C), c, c < D


@triton.jit
def _embed_bwd_segments_kernel(
    DO, Sorted, Order, DW, WS,  # dout (N, D) rows; ids sorted (N,) int64; their token indices; dweight (V, D); fp32 (chunks, 2, D)
    N, D, V,
    s_on, s_od, s_w0,
    scale,
    HAS_SCALE: tl.constexpr, R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Chunk k holds sorted indices [k * R, min(k * R + R, N)); each maximal run of equal valid ids
    v inside it (a segment) is summed in order, s = sum of dout[Order[i], cols]. A segment that is
    a whole run: DW[v, cols] = scale * s. Else s goes to WS[k, 0] when the segment continues a run
    from chunk k - 1 (it starts the chunk), to WS[k, 1] when it only continues into chunk k + 1.
    Program chunk-block * cdiv(D, BLOCK_D) + d-block, BLOCK_C chunks as the tile's rows."""
    k, c, c_mask = _chunks_and_columns(D, BLOCK_C, BLOCK_D)
    start = k * R
    end = tl.minimum(start + R, N)
    live = start < N
    first = tl.load(Sorted + start, mask=live, other=-1)
    last = tl.load(Sorted + end - 1, mask=live, other=-1)
    left = live & (start > 0) & (tl.load(Sorted + start - 1, mask=live & (start > 0), other=-1) == first)
    right = live & (end < N) & (tl.load(Sorted + end, mask=live & (end < N), other=-1) == last)
    acc = tl.zeros([BLOCK_C, BLOCK_D], dtype=tl.float32)
    v = first
    for r in range(R):
        i = start + r
        m = i < end
        row = tl.load(Order + i, mask=m, other=0)
        acc += tl.load(DO + row[:, None] * s_on + c[None, :] * s_od, mask=m[:, None] & c_mask[None, :], other=0.0).to(tl.float32)
        nxt = tl.load(Sorted + i + 1, mask=i + 1 < end, other=-1)
        seg_end = m & ((i + 1 == end) | (nxt != v))
        ok = seg_end & (v >= 0) & (v < V)
        cont = (v == first) & left
        to_right = ok & ~cont & (v == last) & right
        whole = ok & ~cont & ~to_right
        out = acc * scale if HAS_SCALE else acc
        tl.store(DW + v[:, None] * s_w0 + c[None, :], out.to(DW.dtype.element_ty), mask=whole[:, None] & c_mask[None, :])
        ws = WS + (2 * k[:, None] + to_right[:, None].to(tl.int64)) * D + c[None, :]
        tl.store(ws, acc, mask=((ok & cont) | to_right)[:, None] & c_mask[None, :])
        acc = tl.where(seg_end[:, None], 0.0, acc)
        v = tl.where(m, nxt, v)


@triton.jit
def _embed_bwd_crossing_kernel(
    Sorted, DW, WS,  # ids sorted (N,) int64; dweight (V, D); the partials of _embed_bwd_segments_kernel
    N, D, V,
    s_w0,
    scale,
    HAS_SCALE: tl.constexpr, R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """For each chunk k0 where a run of a valid id v starts and which it continues past:
    DW[v, cols] = scale * (WS[k0, 1] + sum of WS[k, 0] over the later chunks k the run reaches), those
    taken BLOCK_K chunks at a time (tl.sum: a fixed order). Program chunk-block * cdiv(D, BLOCK_D) +
    d-block, BLOCK_C chunks k0 as the tile's rows."""
    k0, c, c_mask = _chunks_and_columns(D, BLOCK_C, BLOCK_D)
    start = k0 * R
    end = start + R
    crosses = end < N
    v = tl.load(Sorted + end - 1, mask=crosses, other=-1)
    nxt = tl.load(Sorted + end, mask=crosses, other=-1)
    prev = tl.load(Sorted + start - 1, mask=crosses & (start > 0), other=-1)
    own = crosses & (nxt == v) & ((start == 0) | (prev != v)) & (v >= 0) & (v < V)
    acc = tl.load(WS + (2 * k0[:, None] + 1) * D + c[None, :], mask=own[:, None] & c_mask[None, :], other=0.0)
    k = k0 + 1
    active = own
    while tl.max(active.to(tl.int32)) > 0:
        ks = k[:, None] + tl.arange(0, BLOCK_K)[None, :]
        inside = active[:, None] & (ks * R < N)
        member = inside & (tl.load(Sorted + ks * R, mask=inside, other=-1) == v[:, None])
        part = tl.load(WS + 2 * ks[:, :, None] * D + c[None, None, :], mask=member[:, :, None] & c_mask[None, None, :], other=0.0)
        acc += tl.sum(part, axis=1)
        active = tl.sum(member.to(tl.int32), axis=1) == BLOCK_K
        k += BLOCK_K
    if HAS_SCALE:
        acc = acc * scale
    tl.store(DW + v[:, None] * s_w0 + c[None, :], acc.to(DW.dtype.element_ty), mask=own[:, None] & c_mask[None, :])


CHUNK_ROWS = 32  # sorted positions per chunk of the deterministic backward


def _p_bits(dim: int) -> int:
    return max(1, ((dim - 1) // 2).bit_length())


def _tiles(N: int, D: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_D): 2k-element tiles on a GPU, larger ones in the interpreter."""
    block_d = min(triton.next_power_of_2(D), 256 if device.type == "cuda" else 1024)
    elems = 2048 if device.type == "cuda" else 16384
    return min(triton.next_power_of_2(N), max(1, elems // block_d)), block_d


def _crossing_tiles(chunks: int, block_d: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_K) of _embed_bwd_crossing_kernel: on a GPU one run a program and 2k-element
    tiles of later chunks; in the interpreter several runs a program."""
    k = min(triton.next_power_of_2(chunks), max(1, (2048 if device.type == "cuda" else 256) // block_d))
    return (1 if device.type == "cuda" else min(triton.next_power_of_2(chunks), max(1, 16384 // (k * block_d)))), k


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
    token are zero; out-of-range ids are skipped. deterministic: sorted runs reduced by chunks, no atomics."""
    T, S, D = dout.shape
    V = dweight.shape[0]
    N = T * S
    dweight.zero_()
    if N == 0 or D == 0 or V == 0:
        return
    sc = 1.0 if scale is None else float(scale)
    if deterministic:
        sorted_ids, order = torch.sort(input_ids.reshape(N).to(torch.int64), stable=True)
        d2 = dout.reshape(N, D)
        chunks = triton.cdiv(N, CHUNK_ROWS)
        ws = torch.empty((chunks, 2, D), device=dout.device, dtype=torch.float32)
        block_c, block_d = _tiles(chunks, D, dout.device)
        common = dict(HAS_SCALE=scale is not None, R=CHUNK_ROWS, BLOCK_D=block_d, num_warps=4)
        _embed_bwd_segments_kernel[_grid(chunks, block_c, D, block_d)](
            d2, sorted_ids, order, dweight, ws, N, D, V, d2.stride(0), d2.stride(1), dweight.stride(0), sc,
            BLOCK_C=block_c, **common,
        )
        if chunks > 1:
            owners, block_k = _crossing_tiles(chunks, block_d, dout.device)
            _embed_bwd_crossing_kernel[_grid(chunks, owners, D, block_d)](
                sorted_ids, dweight, ws, N, D, V, dweight.stride(0), sc, BLOCK_C=owners, BLOCK_K=block_k, **common,
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
