"""RotaryEmbedding: rotary position embedding of q and k as a module, forwarding to fastlm.ops.rotary.

It holds no parameters or buffers (angles are computed in the kernel from integer positions), so
its state_dict is empty, as Hugging Face's rotary modules' is (their inv_freq is not persistent).
"""

from __future__ import annotations

import torch

from fastlm import ops


class RotaryEmbedding(torch.nn.Module):
    """Rotate q (B, Hq, S, D) and k (B, Hk, S, D) by positions: ``forward(q, k, positions=0)``.

    ``dim``: the rotary size (the leading ``dim`` dims of each head rotate; ``None`` means the whole
    head); ``theta``: the frequency base; ``interleaved``: GPT-J pairing instead of GPT-NeoX/Llama's
    half split. ``positions`` is an int offset, or an integer tensor (S,) or (B, S). ``inplace=True``
    writes into q and k; ``cu_seqlens`` (int32 (B + 1,)) takes packed q (T, Hq, D) and k (T, Hk, D),
    positions restarting in each sequence (``positions`` then an int or (B,) offsets): see
    fastlm.ops.rotary."""

    def __init__(self, dim=None, theta=10000.0, interleaved=False, *, backend=None):
        super().__init__()
        self.dim = dim
        self.theta = theta
        self.interleaved = interleaved
        self.backend = backend

    def forward(self, q, k, positions=0, *, inplace=False, cu_seqlens=None):
        return ops.rotary(q, k, positions, theta=self.theta, rotary_dim=self.dim, interleaved=self.interleaved,
                          inplace=inplace, cu_seqlens=cu_seqlens, backend=self.backend)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, theta={self.theta}, interleaved={self.interleaved}"
