"""Rotary position embedding (RoPE) in plain PyTorch: the oracle for the kernels and the CPU fallback.

For a head vector x of size D whose first ``rotary_dim`` = R dims rotate, pair p = 0 .. R/2 - 1
turns by the angle  a(pos, p) = pos * theta^(-2p/R):
    x1' = x1 * cos(a) - x2 * sin(a),   x2' = x2 * cos(a) + x1 * sin(a)
where (x1, x2) = (x[p], x[p + R/2]) in the GPT-NeoX / Llama half-split pairing (interleaved=False)
and (x[2p], x[2p + 1]) in the GPT-J interleaved pairing. Dims R .. D - 1 pass through unchanged.
The angle pos * theta^(-2p/R) is formed in float64 and (below float64) reduced to [-pi, pi] there,
so it is exact to float32 at any position (as the kernels' angles are: no precision cliff at large positions);
cos/sin and the rotation are then computed in float32 (float64 for float64 inputs) and the result
rounded once to the input's dtype.

``apply_rotary_pos_emb`` is Hugging Face's table form: q * cos + rotate_half(q) * sin, or with
``interleaved`` q * cos + rotate_pairs(q) * sin (tables of R columns, one factor per column).
``rotary_packed`` is the packed (cu_seqlens) form: rotary applied to each sequence alone.
"""

from __future__ import annotations

import math

import torch

TWO_PI = 2 * math.pi


def reduce_angle(a: torch.Tensor) -> torch.Tensor:
    """a (float64) minus the nearest multiple of 2*pi: in [-pi, pi], still float64."""
    return a - TWO_PI * torch.round(a / TWO_PI)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def inv_freq(rotary_dim: int, theta: float, dtype=torch.float32, device=None) -> torch.Tensor:
    """theta^(-2p/R) for p = 0 .. R/2 - 1, shape (R/2,)."""
    exponent = torch.arange(0, rotary_dim, 2, dtype=dtype, device=device) / rotary_dim
    return 1.0 / (theta**exponent)


def angles(positions: torch.Tensor, rotary_dim: int, theta: float, dtype=torch.float32) -> torch.Tensor:
    """a(pos, p) = pos * theta^(-2p/R), formed in float64 (for a lower dtype then reduced to
    [-pi, pi] and cast): shape positions.shape + (R/2,)."""
    a = positions.to(torch.float64)[..., None] * inv_freq(rotary_dim, theta, torch.float64, positions.device)
    return a if dtype == torch.float64 else reduce_angle(a).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Hugging Face's rotate_half: (x1, x2) -> (-x2, x1) over the two halves of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """The interleaved rotate_half: pairs (x[2p], x[2p + 1]) -> (-x[2p + 1], x[2p])."""
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int, interleaved: bool) -> torch.Tensor:
    """Rotate the leading rotary_dim dims of x (…, D) by angles with cos/sin of shape (…, R/2)."""
    xr, xp = x[..., :rotary_dim], x[..., rotary_dim:]
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        x1, x2 = xr.chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return torch.cat((out, xp), dim=-1)


def position_ids(positions, batch: int, seq: int, device) -> torch.Tensor:
    """positions as a (B, S) or (S,) integer tensor: an int or 0-d tensor is an offset."""
    if isinstance(positions, torch.Tensor) and positions.dim() > 0:
        return positions
    return torch.arange(seq, device=device) + positions


def rotary(q, k, positions, theta=10000.0, rotary_dim=None, interleaved=False):
    """q: (B, Hq, S, D), k: (B, Hk, S, D); positions (S,), (B, S), an int or a 0-d tensor offset.
    Returns new (q, k)."""
    B, _, S, D = q.shape
    rotary_dim = D if rotary_dim is None else rotary_dim
    ct = compute_dtype(q)
    pos = position_ids(positions, B, S, q.device)
    a = angles(pos, rotary_dim, theta, ct)  # (S, R/2) or (B, S, R/2)
    if a.dim() == 3:
        a = a[:, None]  # broadcast over heads
    cos, sin = a.cos(), a.sin()
    out = [_rotate(x.to(ct), cos, sin, rotary_dim, interleaved).to(x.dtype) for x in (q, k)]
    return out[0], out[1]


def rotary_packed(q, k, cu_seqlens, offsets=0, theta=10000.0, rotary_dim=None, interleaved=False):
    """q: (T, Hq, D), k: (T, Hk, D), sequence b the rows cu_seqlens[b] .. cu_seqlens[b + 1] - 1 at
    positions offsets[b] + 0, 1, ... (offsets an int or a (B,) tensor), each sequence by rotary alone."""
    cu = cu_seqlens.tolist()
    qs, ks = [], []
    for b, (t0, t1) in enumerate(zip(cu[:-1], cu[1:], strict=True)):
        off = int(offsets[b]) if isinstance(offsets, torch.Tensor) else int(offsets)
        qo, ko = rotary(q[None, t0:t1].transpose(1, 2), k[None, t0:t1].transpose(1, 2), off, theta, rotary_dim, interleaved)
        qs.append(qo[0].transpose(0, 1))
        ks.append(ko[0].transpose(0, 1))
    if not qs:
        return q.clone(), k.clone()
    return torch.cat(qs), torch.cat(ks)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1, interleaved=False):
    """Hugging Face Llama's helper, in float32 (float64 for float64 inputs), output in q's dtype.
    cos/sin: (B, S, R) or (S, R) (read as (1, S, R)); R <= head dim, the rest passes through.
    interleaved: rotate_pairs in place of rotate_half (GPT-J's rotate_every_two)."""
    ct = compute_dtype(q)
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    cos = cos.to(ct).unsqueeze(unsqueeze_dim)
    sin = sin.to(ct).unsqueeze(unsqueeze_dim)
    R = cos.shape[-1]

    def one(x):
        xr, xp = x.to(ct)[..., :R], x.to(ct)[..., R:]
        rot = rotate_pairs(xr) if interleaved else rotate_half(xr)
        return torch.cat((xr * cos + rot * sin, xp), dim=-1).to(x.dtype)

    return one(q), one(k)
