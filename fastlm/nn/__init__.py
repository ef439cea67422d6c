"""Drop-in nn modules with torch's constructor arguments and state_dict keys."""

from fastlm.nn.layer_norm import LayerNorm, RMSNorm

__all__ = ["LayerNorm", "RMSNorm"]
