"""Rotary position embedding (RoPE) on q and k in one launch, forward and backward, in Triton.

One program owns BLOCK_S positions of one batch row and a range of heads taken from q's heads
followed by k's: it forms cos/sin for its [BLOCK_S, R/2] (position, pair) tile once and reuses
them for every head, so the angle work is shared by all Hq + Hk heads and each element of q and k
is read once and written once (the bandwidth floor). Inputs and outputs are addressed through
their four strides, so (B, H, S, D) and (B, S, H, D) storage (a transposed view) and sliced views
need no copy, and an output may be its input (in place).

Angles are exact to fp32 at any position: theta^(-2p/R) is r^p with r = theta^(-2/R) passed as an
fp32 (hi, lo) pair (about 48 bits) and raised by square-and-multiply in fp64, the angle
pos * r^p is formed in fp64 and reduced by 2*pi (Cody-Waite, 2*pi as an fp32 pair) before the fp32
cos/sin. fp32 math on pos * inv_freq would be off by up to 0.03 rad at position 131072; the fp64
work is a few operations per (position, pair), shared by every head.

The backward is the rotation by -angle. The table form (Hugging Face's apply_rotary_pos_emb) reads
cos and sin from (B or 1, S, R) tables instead (interleaved: one contiguous [BLOCK_S, R] tile split
into the columns 2p and 2p + 1, as x) and uses the general transpose for its backward.
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

_TWO_PI_HI = tl.constexpr(6.2831854820251465)  # fp32(2*pi)
_TWO_PI_LO = tl.constexpr(-1.7484555314695172e-07)  # fp32(2*pi - _TWO_PI_HI)
_INV_TWO_PI = tl.constexpr(0.15915493667125702)


def fp32_pair(x: float) -> tuple[float, float]:
    """x as hi + lo with hi, lo exactly representable in fp32 (Triton passes float args as fp32)."""
    hi = struct.unpack("f", struct.pack("f", x))[0]
    lo = struct.unpack("f", struct.pack("f", x - hi))[0]
    return hi, lo


def ratio_pair(base: float, dim: int) -> tuple[float, float]:
    """r = base^(-2/dim), so the frequency of pair p is r^p, as an fp32 (hi, lo) pair."""
    return fp32_pair(float(base) ** (-2.0 / dim))


@triton.jit
def inv_freq_f64(p, r_hi, r_lo, P_BITS: tl.constexpr):
    """r^p in fp64 for integer p < 2^P_BITS (square-and-multiply), r = r_hi + r_lo."""
    base = tl.cast(r_hi, tl.float64) + tl.cast(r_lo, tl.float64)
    acc = tl.zeros(p.shape, tl.float64) + 1.0
    e = p
    for _ in tl.static_range(P_BITS):
        acc = tl.where((e & 1) != 0, acc * base, acc)
        base = base * base
        e = e >> 1
    return acc


@triton.jit
def reduce_angle(a):
    """a (fp64) minus a multiple of 2*pi: r in (-2*pi, 2*pi), still fp64."""
    k = (a * _INV_TWO_PI).to(tl.int64).to(tl.float64)
    return (a - k * _TWO_PI_HI) - k * _TWO_PI_LO


_HALF_PI_HI = tl.constexpr(1.5707963705062866)  # fp32(pi/2)
_HALF_PI_LO = tl.constexpr(-4.371138828673793e-08)  # fp32(pi/2 - _HALF_PI_HI)
_TWO_OVER_PI = tl.constexpr(0.6366197723675814)
# fdlibm's k_sinf / k_cosf minimax polynomials on [-pi/4, pi/4], evaluated in fp64
_S1 = tl.constexpr(-0.166666666416265235595)
_S2 = tl.constexpr(0.0083333293858894631756)
_S3 = tl.constexpr(-0.000198393348360966317347)
_S4 = tl.constexpr(0.0000027183114939898219064)
_C0 = tl.constexpr(-0.499999997251031003120)
_C1 = tl.constexpr(0.0416666233237390631894)
_C2 = tl.constexpr(-0.00138867637746099294692)
_C3 = tl.constexpr(0.0000243904487962774090654)


@triton.jit
def _f64(c: tl.constexpr):
    """The constant c as an fp64 scalar (a Python float alone enters a kernel as fp32)."""
    return tl.full([], c, tl.float64)


@triton.jit
def sincos(a):
    """(cos a, sin a) in fp32 for fp64 a with |a| < 2^20 (a reduced angle): a = k pi/2 + r with
    |r| <= pi/4 (pi/2 as an exact fp32 pair), sin r and cos r by polynomial, swapped and negated by
    quadrant. Used instead of libdevice cosf/sinf, whose Payne-Hanek path for huge arguments keeps a
    local array (a stack frame) that a reduced argument never needs."""
    k = tl.floor(a * _f64(_TWO_OVER_PI) + 0.5)
    r = (a - k * _HALF_PI_HI) - k * _HALF_PI_LO
    q = k.to(tl.int32) & 3
    z = r * r
    sr = (r + r * z * (_f64(_S1) + z * (_f64(_S2) + z * (_f64(_S3) + z * _f64(_S4))))).to(tl.float32)
    cr = (1.0 + z * (_f64(_C0) + z * (_f64(_C1) + z * (_f64(_C2) + z * _f64(_C3))))).to(tl.float32)
    sin_a = tl.where((q & 1) == 0, sr, cr)
    cos_a = tl.where((q & 1) == 0, cr, sr)
    sin_a = tl.where(q >= 2, -sin_a, sin_a)
    cos_a = tl.where((q == 1) | (q == 2), -cos_a, cos_a)
    return cos_a, sin_a


@triton.jit
def _rotate_tile(
    X, XO,  # this head's input and output at (b, h, s=0, d=0)
    sx_s, sx_d, so_s, so_d,  # their sequence and head-dim strides
    s64, s_mask, c1, c2, mask,  # positions of the tile, pair columns (x1 at c1, x2 at c2)
    cos1, cos2, sin1, sin2,  # [BLOCK_S, BLOCK_H] fp32 factors for x1 and x2
    R, D,
    BACKWARD: tl.constexpr, COPY_PASS: tl.constexpr, INTERLEAVED: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """fwd: o1 = x1 cos1 - x2 sin1, o2 = x2 cos2 + x1 sin2;  bwd (transpose): o1 = x1 cos1 + x2 sin2,
    o2 = x2 cos2 - x1 sin1. Dims R..D-1 are copied when COPY_PASS (out of place). Interleaved pairs
    are read as one contiguous [BLOCK_S, 2 BLOCK_H] tile and split in registers (16-byte accesses
    instead of strided 2-byte ones)."""
    xrow = X + s64[:, None] * sx_s
    orow = XO + s64[:, None] * so_s
    if INTERLEAVED:
        cc = tl.arange(0, 2 * BLOCK_H)
        m2 = s_mask[:, None] & (cc < R)[None, :]
        x = tl.load(xrow + cc[None, :] * sx_d, mask=m2, other=0.0).to(tl.float32)
        x1, x2 = tl.split(tl.reshape(x, [x.shape[0], BLOCK_H, 2]))
    else:
        x1 = tl.load(xrow + c1[None, :] * sx_d, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(xrow + c2[None, :] * sx_d, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        o1 = x1 * cos1 + x2 * sin2
        o2 = x2 * cos2 - x1 * sin1
    else:
        o1 = x1 * cos1 - x2 * sin1
        o2 = x2 * cos2 + x1 * sin2
    if INTERLEAVED:
        o = tl.reshape(tl.join(o1, o2), [o1.shape[0], 2 * BLOCK_H])
        tl.store(orow + cc[None, :] * so_d, o.to(XO.dtype.element_ty), mask=m2)
    else:
        tl.store(orow + c1[None, :] * so_d, o1.to(XO.dtype.element_ty), mask=mask)
        tl.store(orow + c2[None, :] * so_d, o2.to(XO.dtype.element_ty), mask=mask)
    if COPY_PASS:
        c = R + tl.arange(0, BLOCK_P)
        m = s_mask[:, None] & (c < D)[None, :]
        tl.store(orow + c[None, :] * so_d, tl.load(xrow + c[None, :] * sx_d, mask=m), mask=m)


@triton.jit
def _rotary_kernel(
    Q, K, QO, KO,  # q (B, HQ, S, D), k (B, HK, S, D) and their outputs (which may be q and k)
    Pos, Cos, Sin,  # int positions (B|1, S) (HAS_POS); cos/sin tables (B|1, S, R) (TABLE)
    B, S, HQ, HK, R, D, half,  # half = R / 2 pairs
    s_qb, s_qh, s_qs, s_qd, s_kb, s_kh, s_ks, s_kd,  # input strides
    s_ob, s_oh, s_os, s_od, s_pb, s_ph, s_ps, s_pd,  # output strides: q_out, k_out
    s_posb, s_poss,  # positions strides (0 on a broadcast batch)
    s_cb, s_cs, s_cd, s_sb, s_ss, s_sd,  # table strides (0 on a broadcast batch)
    offset, r_hi, r_lo,  # positions are offset + Pos (or offset + s); r = theta^(-2/R) = r_hi + r_lo
    heads_per_program,
    HAS_POS: tl.constexpr, TABLE: tl.constexpr, INTERLEAVED: tl.constexpr, BACKWARD: tl.constexpr,
    COPY_PASS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
    P_BITS: tl.constexpr,
):
    """Angle form: a = pos * r^p, cos1 = cos2 = cos(a), sin1 = sin2 = sin(a) for pair p of position
    pos; table form: cos1 = Cos[b, s, c1], cos2 = Cos[b, s, c2] (likewise sin). Pair p is
    (c1, c2) = (p, p + R/2) (half-split) or (2p, 2p + 1) (INTERLEAVED). Program
    (g * B + b) * cdiv(S, BLOCK_S) + s-block (a 1-D grid, see _grid) rotates heads
    [g * heads_per_program, ...) of the concatenation q ++ k."""
    pid = tl.program_id(0)
    s_blocks = tl.cdiv(S, BLOCK_S)
    pid_s = pid % s_blocks
    rest = pid // s_blocks
    b = (rest % B).to(tl.int64)
    pid_h = rest // B
    s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    s_mask = s < S
    s64 = s.to(tl.int64)
    p = tl.arange(0, BLOCK_H)
    mask = s_mask[:, None] & (p < half)[None, :]
    if INTERLEAVED:
        c1 = 2 * p
        c2 = 2 * p + 1
    else:
        c1 = p
        c2 = p + half
    if TABLE:
        cb = Cos + b * s_cb + s64[:, None] * s_cs
        sb = Sin + b * s_sb + s64[:, None] * s_ss
        if INTERLEAVED:
            cc = tl.arange(0, 2 * BLOCK_H)
            m2 = s_mask[:, None] & (cc < R)[None, :]
            ct = tl.load(cb + cc[None, :] * s_cd, mask=m2, other=0.0).to(tl.float32)
            st = tl.load(sb + cc[None, :] * s_sd, mask=m2, other=0.0).to(tl.float32)
            cos1, cos2 = tl.split(tl.reshape(ct, [BLOCK_S, BLOCK_H, 2]))
            sin1, sin2 = tl.split(tl.reshape(st, [BLOCK_S, BLOCK_H, 2]))
        else:
            cos1 = tl.load(cb + c1[None, :] * s_cd, mask=mask, other=0.0).to(tl.float32)
            cos2 = tl.load(cb + c2[None, :] * s_cd, mask=mask, other=0.0).to(tl.float32)
            sin1 = tl.load(sb + c1[None, :] * s_sd, mask=mask, other=0.0).to(tl.float32)
            sin2 = tl.load(sb + c2[None, :] * s_sd, mask=mask, other=0.0).to(tl.float32)
    else:
        if HAS_POS:
            pos = tl.load(Pos + b * s_posb + s64 * s_poss, mask=s_mask, other=0).to(tl.int64) + offset
        else:
            pos = s64 + offset
        inv = inv_freq_f64(p, r_hi, r_lo, P_BITS)
        cos1, sin1 = sincos(reduce_angle(pos.to(tl.float64)[:, None] * inv[None, :]))
        cos2 = cos1
        sin2 = sin1
    h0 = pid_h * heads_per_program
    h1 = tl.minimum(h0 + heads_per_program, HQ + HK)
    for h in range(h0, tl.minimum(h1, HQ)):
        hh = tl.cast(h, tl.int64)
        _rotate_tile(Q + b * s_qb + hh * s_qh, QO + b * s_ob + hh * s_oh, s_qs, s_qd, s_os, s_od,
                     s64, s_mask, c1, c2, mask, cos1, cos2, sin1, sin2, R, D, BACKWARD, COPY_PASS, INTERLEAVED, BLOCK_H, BLOCK_P)
    for h in range(tl.maximum(h0, HQ), h1):
        hh = tl.cast(h - HQ, tl.int64)
        _rotate_tile(K + b * s_kb + hh * s_kh, KO + b * s_pb + hh * s_ph, s_ks, s_kd, s_ps, s_pd,
                     s64, s_mask, c1, c2, mask, cos1, cos2, sin1, sin2, R, D, BACKWARD, COPY_PASS, INTERLEAVED, BLOCK_H, BLOCK_P)


def _plan(B: int, S: int, H: int, block_h: int, sm_count: int | None) -> tuple[int, int, int]:
    """(BLOCK_S, heads_per_program, head groups): on a GPU (sm_count SMs) about 4 programs per SM,
    splitting the heads only when batch x sequence blocks are too few; in the interpreter
    (sm_count None), few large programs."""
    if sm_count is not None:
        block_s = min(triton.next_power_of_2(S), max(1, 1024 // block_h))
        rows = triton.cdiv(S, block_s) * B
        groups = min(H, max(1, triton.cdiv(4 * sm_count, rows)))
    else:
        block_s = min(triton.next_power_of_2(S), max(1, 8192 // block_h))
        groups = 1
    per = triton.cdiv(H, groups)
    return block_s, per, triton.cdiv(H, per)


def _grid(B: int, S: int, block_s: int, groups: int) -> tuple[int]:
    """One grid dimension (x, up to 2^31 - 1 programs) for (head group, batch row, s-block), which the
    kernel splits again: B and the head groups can exceed the 65535 of grid y and z."""
    return (triton.cdiv(S, block_s) * B * groups,)


def _sm_count(device: torch.device) -> int | None:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else None


def _pos_strides(positions, B: int) -> tuple[int, int]:
    if positions is None:
        return 0, 0
    if positions.dim() == 1:
        return 0, positions.stride(0)
    return (positions.stride(0) if positions.shape[0] == B and B > 1 else 0), positions.stride(1)


def _table_strides(t, B: int) -> tuple[int, int, int]:
    return (t.stride(0) if t.shape[0] == B and B > 1 else 0), t.stride(1), t.stride(2)


def _launch(q, k, qo, ko, positions, offset, theta, R, interleaved, backward, cos=None, sin=None):
    B, HQ, S, D = q.shape
    HK = k.shape[1]
    if B == 0 or S == 0 or HQ + HK == 0 or D == 0:
        return
    half = R // 2
    block_h = triton.next_power_of_2(max(half, 1))
    copy_pass = R < D and (qo.data_ptr() != q.data_ptr() or ko.data_ptr() != k.data_ptr())
    block_s, per, groups = _plan(B, S, HQ + HK, block_h, _sm_count(q.device))
    table = cos is not None
    r_hi, r_lo = (0.0, 0.0) if table else ratio_pair(theta, R)
    pb, ps = _pos_strides(positions, B)
    cstr = _table_strides(cos, B) if table else (0, 0, 0)
    sstr = _table_strides(sin, B) if table else (0, 0, 0)
    _rotary_kernel[_grid(B, S, block_s, groups)](
        q, k, qo, ko, positions, cos, sin,
        B, S, HQ, HK, R, D, half,
        *q.stride(), *k.stride(), *qo.stride(), *ko.stride(),
        pb, ps, *cstr, *sstr,
        offset, r_hi, r_lo, per,
        HAS_POS=positions is not None, TABLE=table, INTERLEAVED=interleaved, BACKWARD=backward,
        COPY_PASS=copy_pass, BLOCK_S=block_s, BLOCK_H=block_h,
        BLOCK_P=triton.next_power_of_2(max(D - R, 1)), P_BITS=max(1, (block_h - 1).bit_length()),
        num_warps=4,
    )


def rotary_fwd(q, k, positions, offset, theta, rotary_dim, interleaved, q_out, k_out) -> None:
    """Rotate q (B, Hq, S, D) and k (B, Hk, S, D) by pos * theta^(-2p/R) into q_out, k_out (which may
    be q, k). positions: None (pos = offset + s), an int tensor (S,) or (B|1, S) (pos = offset +
    positions[b, s]). Any strides."""
    _launch(q, k, q_out, k_out, positions, offset, theta, rotary_dim, interleaved, False)


def rotary_bwd(dq_out, dk_out, positions, offset, theta, rotary_dim, interleaved, dq, dk) -> None:
    """The gradient of rotary_fwd: dq_out, dk_out rotated by -angle into dq, dk."""
    _launch(dq_out, dk_out, dq, dk, positions, offset, theta, rotary_dim, interleaved, True)


def rotary_table_fwd(q, k, cos, sin, q_out, k_out, interleaved=False) -> None:
    """Hugging Face form: out = x * cos + rotate_half(x) * sin (rotate_pairs when interleaved) over the
    first R = cos.shape[-1] dims of q (B, Hq, S, D) and k; cos, sin: (B or 1, S, R); dims R..D-1
    copied; q_out, k_out may be q, k."""
    _launch(q, k, q_out, k_out, None, 0, 0.0, cos.shape[-1], interleaved, False, cos, sin)


def rotary_table_bwd(dq_out, dk_out, cos, sin, dq, dk, interleaved=False) -> None:
    """The gradient of rotary_table_fwd with respect to q and k (the transposed map)."""
    _launch(dq_out, dk_out, dq, dk, None, 0, 0.0, cos.shape[-1], interleaved, True, cos, sin)
