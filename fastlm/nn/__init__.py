"""Drop-in nn modules with torch's constructor arguments and state_dict keys."""

from fastlm.nn.attention import MultiheadSelfAttention
from fastlm.nn.layer_norm import LayerNorm, RMSNorm
from fastlm.nn.rotary import RotaryEmbedding
from fastlm.nn.sinusoidal import SinusoidalEmbedding

__all__ = ["MultiheadSelfAttention", "LayerNorm", "RMSNorm", "RotaryEmbedding", "SinusoidalEmbedding"]
