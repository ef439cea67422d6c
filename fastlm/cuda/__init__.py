"""Loads fastlm._C, the CUDA kernels built from csrc/ (optional: import fastlm never needs it).

The extension links only the CUDA runtime: its launchers take raw pointers, sizes, strides, a dtype
code and a stream handle, and return a CUDA error code that ``check`` turns into an exception.
"""

from __future__ import annotations

import torch

from fastlm.backend import BackendUnavailableError

DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


_LOADED: list = []


def _load():
    if not _LOADED:
        try:
            from fastlm import _C

            _LOADED.append((_C, None))
        except Exception as exc:
            _LOADED.append((None, (
                f"fastlm._C is not built ({type(exc).__name__}: {exc}); build it with `make cuda-check` "
                "or `pip install -e .` on a machine with nvcc"
            )))
    return _LOADED[0]


def load_error() -> str | None:
    """None if fastlm._C imported, else why not."""
    return _load()[1]


def lib():
    """The fastlm._C module; raises BackendUnavailableError saying why it is missing."""
    mod, err = _load()
    if mod is None:
        raise BackendUnavailableError(err)
    return mod


def check(code: int, what: str) -> None:
    """Raise RuntimeError if a launcher returned a non-zero CUDA error code."""
    if code != 0:
        raise RuntimeError(f"fastlm CUDA kernel {what} failed: CUDA error {code} ({lib().error_string(code)})")


def stream_handle(t: torch.Tensor) -> int:
    """The raw cudaStream_t of the current stream on t's device."""
    return torch.cuda.current_stream(t.device).cuda_stream


def ptr(t: torch.Tensor | None) -> int:
    """data_ptr() of t, or 0 for None."""
    return 0 if t is None else t.data_ptr()


def dtype_code(t: torch.Tensor | None) -> int:
    """The csrc dtype code of t (0 fp32, 1 fp16, 2 bf16); 0 for None."""
    if t is None:
        return 0
    try:
        return DTYPE_CODE[t.dtype]
    except KeyError:
        raise TypeError(f"the cuda backend supports float32, float16 and bfloat16, got {t.dtype}") from None


def coverage() -> dict[str, str]:
    """Per op, what the CUDA backend runs as CUDA kernels and what it hands to Triton or refuses."""
    import importlib
    import pkgutil

    import fastlm.cuda as pkg

    out = {}
    for m in pkgutil.iter_modules(pkg.__path__):
        if m.name.startswith("_"):
            continue
        mod = importlib.import_module(f"fastlm.cuda.{m.name}")
        out[m.name] = getattr(mod, "CUDA_COVERAGE", "forward and backward, fp32/fp16/bf16")
    return out
