"""Backend registry and selection.

A backend is one implementation of every op: "torch" (the plain-PyTorch reference, also the CPU
fallback), "triton" (fastlm/triton, also runs on CPU tensors under TRITON_INTERPRET=1) and "cuda"
(the csrc/ kernels: fastlm._C on CUDA tensors, fastlm._C_host, their host-emulation build, on CPU
tensors). Selection order for one call: the op's explicit ``backend=``
argument, then the innermost ``use_backend(...)`` context, then the ``FASTLM_BACKEND`` environment
variable, then the default: the fastest measured backend on CUDA tensors (Triton until the GPU
measurements say otherwise), the reference on CPU tensors, Triton on CPU tensors when the
interpreter is on.

Selection is traceable by torch.compile (fullgraph=True works with the default call): the
``use_backend`` stack is a per-thread list that Dynamo guards, so entering or leaving a context
recompiles the graph. ``FASTLM_BACKEND`` is read when a graph is traced; changing it later does not
retrace an already compiled function (set it before the first call, or use ``use_backend``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import threading

import torch

BACKENDS = ("torch", "triton", "cuda")


class _Overrides(threading.local):
    """This thread's stack of ``use_backend`` names, innermost last (a list, so Dynamo guards it)."""

    def __init__(self):
        self.stack: list[str] = []


_overrides = _Overrides()


class BackendUnavailableError(RuntimeError):
    """Raised when a backend is asked for but cannot run here; the message says why."""


def interpreter_on() -> bool:
    """True when Triton kernels run on the CPU through the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interpreted_bf16(x: torch.Tensor) -> bool:
    """True when a Triton kernel on x would run through the interpreter in bf16, whose bf16 tl.dot
    and arithmetic are wrong: callers run such kernels on fp32 copies and round the result once."""
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and interpreter_on()


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown fastlm backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


def _find_triton_import_error() -> str | None:
    # triton itself is imported only when a kernel is first launched: importing it before
    # TRITON_INTERPRET is set would pin the interpreter off for the whole process.
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    return None


_TRITON_IMPORT_ERROR = _find_triton_import_error()


def _triton_import_error() -> str | None:
    return _TRITON_IMPORT_ERROR


def why_unavailable(name: str, device: torch.device | str | None = None) -> str | None:
    """None if backend ``name`` can run on tensors of ``device`` here, else the reason it cannot.

    With ``device=None`` the question is whether the backend works on this machine at all.
    """
    _check_name(name)
    dev = torch.device(device) if device is not None else None
    if name == "torch":
        return None
    if name == "triton":
        err = _triton_import_error()
        if err:
            return err
        if dev is None:
            if torch.cuda.is_available() or interpreter_on():
                return None
            return "no CUDA GPU is visible to torch and TRITON_INTERPRET=1 is not set"
        if dev.type == "cuda":
            return None
        if dev.type == "cpu" and interpreter_on():
            return None
        if dev.type == "cpu":
            return "triton kernels need CUDA tensors; on CPU tensors set TRITON_INTERPRET=1 before importing fastlm"
        return f"triton kernels do not run on {dev.type} tensors"
    from fastlm import cuda as _cuda

    if dev is None:
        gpu = _cuda.load_error("cuda") or (None if torch.cuda.is_available() else "fastlm._C is built but no CUDA GPU is visible to torch")
        host = _cuda.load_error("cpu")
        return None if gpu is None or host is None else f"on CUDA tensors: {gpu}; on CPU tensors: {host}"
    if dev.type in ("cuda", "cpu"):
        return _cuda.load_error(dev)
    return f"the cuda backend runs on CUDA tensors (fastlm._C) and CPU tensors (fastlm._C_host), got {dev.type} tensors"


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """The backends that can run here (on tensors of ``device`` if given)."""
    return [b for b in BACKENDS if why_unavailable(b, device) is None]


@contextlib.contextmanager
def use_backend(name: str):
    """Run the enclosed fastlm calls on backend ``name`` (unless a call passes ``backend=``)."""
    stack = _overrides.stack
    stack.append(_check_name(name))
    depth = len(stack)
    try:
        yield
    finally:
        del stack[depth - 1:]


def current_backend() -> str | None:
    """The backend asked for by ``use_backend`` or ``FASTLM_BACKEND``, or None for the default."""
    stack = _overrides.stack
    if stack:
        return stack[-1]
    env = os.environ.get("FASTLM_BACKEND")
    if env:
        if env not in BACKENDS:
            raise ValueError(f"FASTLM_BACKEND={env!r} is not a fastlm backend; expected one of {', '.join(BACKENDS)}")
        return env
    return None


# Default backend per op on CUDA tensors, from GPU measurements (benchmarks/results/).
DEFAULT_CUDA_BACKEND: dict[str, str] = {}


def default_backend(device: torch.device, op: str | None = None) -> str:
    if device.type == "cuda":
        choice = DEFAULT_CUDA_BACKEND.get(op or "", "triton")
        return choice if why_unavailable(choice, device) is None else "torch"
    if device.type == "cpu" and interpreter_on() and _triton_import_error() is None:
        return "triton"
    return "torch"


def resolve(backend: str | None, device: torch.device, op: str | None = None) -> str:
    """The backend one call runs on; raises BackendUnavailableError if the asked one cannot run."""
    name = backend if backend is not None else current_backend()
    if name is None:
        return default_backend(device, op)
    _check_name(name)
    reason = why_unavailable(name, device)
    if reason is not None:
        what = f"fastlm.ops.{op}" if op else "fastlm"
        raise BackendUnavailableError(f"{what}: backend {name!r} is unavailable: {reason}")
    return name
