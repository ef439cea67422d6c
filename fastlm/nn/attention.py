"""MultiheadSelfAttention: qkv projection + fastlm.ops.attention + output projection.

state_dict keys are torch.nn.MultiheadAttention's: ``in_proj_weight`` ((Hq + 2 Hkv) * head_dim,
embed_dim), rows [q; k; v]; ``in_proj_bias`` (same rows; absent with bias=False);
``out_proj.weight`` (embed_dim, embed_dim); ``out_proj.bias``. With num_kv_heads == num_heads a
torch.nn.MultiheadAttention(embed_dim, num_heads, batch_first=True) state_dict loads as is, and
the module equals it called as self-attention with need_weights=False (and a causal mask when
causal=True).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fastlm import ops


class MultiheadSelfAttention(nn.Module):
    """Self-attention over x (B, S, embed_dim), batch first.

    num_kv_heads < num_heads gives grouped-query attention (1: multi-query); ``causal`` uses the
    bottom-right aligned mask of fastlm.ops.attention, ``window=(left, right)`` sliding-window
    attention; ``backend=None`` follows fastlm's backend selection.
    """

    def __init__(self, embed_dim, num_heads, num_kv_heads=None, bias=True, causal=True, window=None,
                 device=None, dtype=None, *, backend=None):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if embed_dim % num_heads:
            raise ValueError(f"MultiheadSelfAttention: embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"MultiheadSelfAttention: num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.causal, self.window, self.backend = causal, window, backend
        kw = dict(device=device, dtype=dtype)
        rows = (num_heads + 2 * num_kv_heads) * self.head_dim
        self.in_proj_weight = nn.Parameter(torch.empty(rows, embed_dim, **kw))
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(rows, **kw))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        self.reset_parameters()

    def reset_parameters(self):
        """torch.nn.MultiheadAttention's initialisation: xavier-uniform in_proj, zero biases."""
        nn.init.xavier_uniform_(self.in_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
        nn.init.kaiming_uniform_(self.out_proj.weight, a=math.sqrt(5))
        if self.out_proj.bias is not None:
            nn.init.zeros_(self.out_proj.bias)

    def forward(self, x):
        B, S, _ = x.shape
        qkv = nn.functional.linear(x, self.in_proj_weight, self.in_proj_bias)
        hq, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = qkv.split((hq * d, hkv * d, hkv * d), dim=-1)
        q = q.view(B, S, hq, d).transpose(1, 2)
        k = k.view(B, S, hkv, d).transpose(1, 2)
        v = v.view(B, S, hkv, d).transpose(1, 2)
        y = ops.attention(q, k, v, causal=self.causal, window=self.window, backend=self.backend)
        return self.out_proj(y.transpose(1, 2).reshape(B, S, hq * d))

    def extra_repr(self):
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"causal={self.causal}, window={self.window}")
