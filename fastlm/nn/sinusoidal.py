"""SinusoidalEmbedding: token embedding + sinusoidal position encoding in one kernel.

A torch.nn.Embedding (same constructor, same ``weight`` parameter and state_dict key) whose forward
is fastlm.ops.embed_sinusoidal: weight[ids] * scale + PE(positions).
"""

from __future__ import annotations

import torch

from fastlm import ops


class SinusoidalEmbedding(torch.nn.Embedding):
    """nn.Embedding(num_embeddings, embedding_dim) + the sinusoidal encoding, fused.

    ``scale``: None or a number multiplying the embedding (e.g. embedding_dim ** 0.5); ``base``: the
    encoding's frequency base; ``check``: validate ids against num_embeddings (one host sync).
    padding_idx, max_norm, scale_grad_by_freq and sparse are not supported by the fused kernel."""

    def __init__(self, num_embeddings, embedding_dim, padding_idx=None, max_norm=None, norm_type=2.0,
                 scale_grad_by_freq=False, sparse=False, _weight=None, _freeze=False, device=None, dtype=None,
                 *, scale=None, base=10000.0, check=True, backend=None):
        unsupported = dict(padding_idx=(padding_idx, None), max_norm=(max_norm, None),
                           scale_grad_by_freq=(scale_grad_by_freq, False), sparse=(sparse, False))
        for name, (value, default) in unsupported.items():
            if value != default:
                raise ValueError(f"fastlm.nn.SinusoidalEmbedding: {name}={value!r} is not supported (only {default!r})")
        super().__init__(num_embeddings, embedding_dim, None, None, norm_type, False, False, _weight, _freeze,
                         device, dtype)
        self.scale = scale
        self.base = base
        self.check = check
        self.backend = backend

    def forward(self, input_ids, positions=None):
        return ops.embed_sinusoidal(input_ids, self.weight, positions=positions, scale=self.scale, base=self.base,
                                    check=self.check, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, scale={self.scale}, base={self.base}"
