"""Sinusoidal position encoding and the fused token embedding, in plain PyTorch: the oracle for the
kernels and the CPU fallback.

"Attention Is All You Need": for column j of a d-wide table, with i = j // 2,
    PE(pos, 2i) = sin(pos * base^(-2i/d)),   PE(pos, 2i + 1) = cos(pos * base^(-2i/d)).
embed_sinusoidal(ids, weight) = weight[ids] * scale + PE(positions), positions defaulting to
0 .. S - 1 along the last dim of ids. The angle pos * base^(-2i/d) is formed in float64 and (below
float64) reduced to [-pi, pi] there: exact to float32 at any position, as the kernels' angles are.
The rest is computed in float32 (float64 for float64 inputs) and rounded once to the output dtype.

Ids of any integer dtype index the table. An id outside [0, V) (the op checks them unless
check=False) gives a NaN row and no weight gradient, as on the kernel backends.
"""

from __future__ import annotations

import torch

from fastlm.reference.rotary import reduce_angle


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def sinusoidal_position_encoding(positions: torch.Tensor, dim: int, base: float = 10000.0, dtype=torch.float32) -> torch.Tensor:
    """The table PE(positions): shape positions.shape + (dim,)."""
    ct = compute_dtype(dtype)
    i = torch.arange(dim, device=positions.device) // 2
    inv_freq = 1.0 / (base ** ((2 * i).to(torch.float64) / dim))
    a = positions.to(torch.float64)[..., None] * inv_freq
    a = a if ct == torch.float64 else reduce_angle(a).to(ct)
    even = (torch.arange(dim, device=positions.device) % 2) == 0
    return torch.where(even, a.sin(), a.cos()).to(dtype)


def default_positions(input_ids: torch.Tensor, positions) -> torch.Tensor:
    """positions broadcastable to input_ids: None means 0 .. S - 1 along the last dim, an int an
    offset to that."""
    if positions is None:
        positions = 0
    if isinstance(positions, torch.Tensor):
        return positions
    S = input_ids.shape[-1] if input_ids.dim() else 1
    return torch.arange(S, device=input_ids.device) + positions


def embed_sinusoidal(input_ids, weight, positions=None, scale=None, base=10000.0):
    """weight[input_ids] * scale + PE(positions): shape input_ids.shape + (D,), weight's dtype."""
    ct = compute_dtype(weight.dtype)
    pos = default_positions(input_ids, positions)
    V, D = weight.shape
    ids = input_ids.to(torch.int64)
    valid = ((ids >= 0) & (ids < V))[..., None]
    w = weight.to(ct) if V else weight.new_zeros((1, D), dtype=ct)
    x = w[ids.clamp(0, max(V - 1, 0))]
    if scale is not None:
        x = x * scale
    pe = sinusoidal_position_encoding(pos, D, base, ct)
    return torch.where(valid, x + pe, float("nan")).to(weight.dtype)
