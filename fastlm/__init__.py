"""fastlm: Triton and CUDA kernels for PyTorch transformers, validated against plain-PyTorch references.

``import fastlm`` needs neither a GPU, nor nvcc, nor the built extension: `fastlm info` reports
what is missing.
"""

__version__ = "0.1.0"

from fastlm import nn, ops  # noqa: E402
from fastlm.backend import (  # noqa: E402
    BackendUnavailableError,
    available_backends,
    current_backend,
    use_backend,
)
from fastlm.patch import (  # noqa: E402  (fastlm.patch is the function from here on; transformers loads only for HF models)
    PatchReport,
    patch,
    patch_sdpa,
    patched,
    patched_sdpa,
    unpatch,
    unpatch_sdpa,
)

__all__ = [
    "__version__",
    "ops",
    "nn",
    "use_backend",
    "available_backends",
    "current_backend",
    "BackendUnavailableError",
    "patch",
    "unpatch",
    "patched",
    "PatchReport",
    "patch_sdpa",
    "unpatch_sdpa",
    "patched_sdpa",
]
