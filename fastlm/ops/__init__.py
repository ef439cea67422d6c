"""Public functional ops with torch's own signatures; each takes an optional ``backend=``."""

from fastlm.ops.attention import (
    attention,
    attention_varlen,
    decode_attention,
    paged_kv_append,
    scaled_dot_product_attention,
)
from fastlm.ops.layer_norm import add_layer_norm, add_rms_norm, layer_norm, rms_norm
from fastlm.ops.rotary import apply_rotary_pos_emb, rotary
from fastlm.ops.sampling import sample, top_k_top_p_filter
from fastlm.ops.sinusoidal import embed_sinusoidal, sinusoidal_position_encoding

__all__ = ["attention", "attention_varlen", "scaled_dot_product_attention", "decode_attention", "paged_kv_append", "layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm", "rotary", "apply_rotary_pos_emb", "sinusoidal_position_encoding", "embed_sinusoidal", "sample", "top_k_top_p_filter"]
