"""Drop-in LayerNorm and RMSNorm modules: torch's constructor arguments, parameters and
state_dict keys (``weight``, ``bias``), forwarding to fastlm.ops."""

from __future__ import annotations

import torch

from fastlm import ops


class LayerNorm(torch.nn.LayerNorm):
    """torch.nn.LayerNorm computed by fastlm.ops.layer_norm (``backend=None`` follows selection)."""

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True, device=None, dtype=None, *, backend=None):
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)
        self.backend = backend

    def forward(self, input):
        return ops.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps, backend=self.backend)


class RMSNorm(torch.nn.RMSNorm):
    """torch.nn.RMSNorm computed by fastlm.ops.rms_norm (``backend=None`` follows selection)."""

    def __init__(self, normalized_shape, eps=None, elementwise_affine=True, device=None, dtype=None, *, backend=None):
        super().__init__(normalized_shape, eps, elementwise_affine, device, dtype)
        self.backend = backend

    def forward(self, input):
        return ops.rms_norm(input, self.normalized_shape, self.weight, self.eps, backend=self.backend)
