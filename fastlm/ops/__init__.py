"""Public functional ops with torch's own signatures; each takes an optional ``backend=``."""

from fastlm.ops.layer_norm import add_layer_norm, add_rms_norm, layer_norm, rms_norm

__all__ = ["layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm"]
