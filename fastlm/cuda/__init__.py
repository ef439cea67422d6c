"""Loads the modules built from csrc/ (both optional: import fastlm never needs either).

- fastlm._C: the CUDA kernels compiled by nvcc; it serves the cuda backend on CUDA tensors.
- fastlm._C_host: the same kernels compiled by the host C++ compiler against an emulation of the
  CUDA execution model (threads as fibers in a seeded order, a sanitizer for out-of-bounds, racy,
  uninitialised and divergent accesses); it serves the cuda backend on CPU tensors.

Both take raw pointers, sizes, strides, a dtype code and a stream handle, and return a CUDA error
code that ``check`` turns into an exception. ``lib(device)`` picks the module for a device. Through
``lib("cpu")`` every call first registers, as the only global memory a kernel may touch, the CPU
tensors whose addresses ``ptr`` handed out on this thread since the previous call (each as the
byte span from its lowest to its highest element), and clears them afterwards.
"""

from __future__ import annotations

import threading

import torch

from fastlm.backend import BackendUnavailableError

DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
SANITIZER_CODES = (700, 719)  # cudaErrorIllegalAddress, cudaErrorLaunchFailure


class SanitizerError(RuntimeError):
    """A kernel run by fastlm._C_host broke a rule that compute-sanitizer checks on a GPU
    (out-of-bounds global or shared access, shared-memory race, uninitialised shared read,
    divergent barrier or warp op, trap). ``report`` is the emulation's report, ``code`` the CUDA
    error code the launch returned."""

    def __init__(self, message: str, report: str, code: int):
        super().__init__(message)
        self.report = report
        self.code = code


_MODULES: dict[str, tuple] = {}
_HOW_TO_BUILD = {
    "_C": "build it with `make cuda-check` or `pip install -e .` on a machine with nvcc",
    "_C_host": ("build it with `.venv/bin/python setup.py -q build_ext --inplace` (needs CMake and a C++17 "
                "compiler, no nvcc; FASTLM_SKIP_HOST_BUILD=1 skips it)"),
}


def _load(name: str = "_C"):
    """(module, None) or (None, why it is missing) for fastlm.<name>, imported once."""
    if name not in _MODULES:
        try:
            import importlib

            mod = importlib.import_module(f"fastlm.{name}")
            if name == "_C_host" and not getattr(mod, "EMULATION", False):
                raise ImportError(f"{mod.__file__} is not a host-emulation build (no EMULATION attribute)")
            _MODULES[name] = (mod, None)
        except Exception as exc:
            _MODULES[name] = (None, f"fastlm.{name} is not built ({type(exc).__name__}: {exc}); {_HOW_TO_BUILD[name]}")
    return _MODULES[name]


def _module_name(device) -> str:
    """"_C" for CUDA tensors (and for no device), "_C_host" for CPU tensors."""
    if device is None:
        return "_C"
    kind = torch.device(device).type
    if kind == "cuda":
        return "_C"
    if kind == "cpu":
        return "_C_host"
    raise BackendUnavailableError(
        f"the cuda backend runs on CUDA tensors (fastlm._C) and on CPU tensors (fastlm._C_host), got {kind} tensors"
    )


def load_error(device: torch.device | str | None = None) -> str | None:
    """None if the module for ``device`` imported (fastlm._C for CUDA tensors and for None,
    fastlm._C_host for CPU tensors), else why not."""
    try:
        name = _module_name(device)
    except BackendUnavailableError as exc:
        return str(exc)
    return _load(name)[1]


class _Pending(threading.local):
    def __init__(self):
        self.extents: list[tuple[int, int, str]] = []
        self.host_code: int | None = None


_pending = _Pending()


def _extent(t: torch.Tensor, index: int) -> tuple[int, int, str] | None:
    """(lowest byte address, bytes up to and including the highest element, label) of t's view;
    None when t has no elements."""
    if t.numel() == 0:
        return None
    last = sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True))
    label = f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)} #{index}"
    return (t.data_ptr(), (last + 1) * t.element_size(), label)


class _HostLib:
    """fastlm._C_host seen by the launchers: each function call sets the extents ``ptr`` collected
    since the previous call (then clears them, and the module's extents after the call) and records
    the code it returned for ``check``. Other attributes come back as they are."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name: str):
        attr = getattr(self._module, name)
        return self._wrap(attr) if callable(attr) else attr

    def _wrap(self, fn):
        mod = self._module

        def call(*args, **kwargs):
            extents, _pending.extents = _pending.extents, []
            if extents:
                mod.emulation_set_extents(extents)
            try:
                result = fn(*args, **kwargs)
            finally:
                if extents:
                    mod.emulation_clear_extents()
            _pending.host_code = result if type(result) is int else None
            return result

        call.__name__ = call.__qualname__ = fn.__name__
        call.__doc__ = fn.__doc__
        return call

    def __repr__(self) -> str:
        return f"<fastlm.cuda host view of {self._module!r}>"


_HOST_VIEW: list[_HostLib] = []


def lib(device: torch.device | str | None = None):
    """The module that runs kernels on tensors of ``device``: fastlm._C for CUDA tensors (and with
    no argument), the extent-registering view of fastlm._C_host for CPU tensors. Raises
    BackendUnavailableError saying why that module is missing."""
    name = _module_name(device)
    mod, err = _load(name)
    if mod is None:
        raise BackendUnavailableError(err)
    if name == "_C":
        return mod
    if not _HOST_VIEW:
        _HOST_VIEW.append(_HostLib(mod))
    return _HOST_VIEW[0]


def check(code: int, what: str) -> None:
    """Raise if a launcher returned a non-zero CUDA error code: SanitizerError (with the emulation's
    report) when the last fastlm._C_host call on this thread returned this sanitizer code,
    RuntimeError otherwise."""
    host_code, _pending.host_code = _pending.host_code, None
    if code == 0:
        return
    host, _ = _load("_C_host")
    if host is not None and host_code == code:
        text = host.error_string(code)
        report = host.emulation_last_report() if code in SANITIZER_CODES else ""
        if report:
            raise SanitizerError(
                f"fastlm CUDA kernel {what} failed on the host emulation (fastlm._C_host, fiber-schedule seed "
                f"{host.emulation_seed()}): CUDA error {code} ({text})\n{report}", report, code,
            )
        raise RuntimeError(f"fastlm CUDA kernel {what} failed on the host emulation (fastlm._C_host): CUDA error {code} ({text})")
    gpu = _load("_C")[0] or host
    text = gpu.error_string(code) if gpu is not None else "no module loaded to name it"
    raise RuntimeError(f"fastlm CUDA kernel {what} failed: CUDA error {code} ({text})")


def stream_handle(t: torch.Tensor) -> int:
    """The raw cudaStream_t of the current stream on t's device; 0 for CPU tensors."""
    if t.device.type == "cpu":
        return 0
    return torch.cuda.current_stream(t.device).cuda_stream


def ptr(t: torch.Tensor | None) -> int:
    """data_ptr() of t, or 0 for None. A CPU tensor's extent is remembered for the next
    fastlm._C_host call on this thread (see ``lib``)."""
    if t is None:
        return 0
    if t.device.type == "cpu":
        extent = _extent(t, len(_pending.extents))
        if extent is not None:
            _pending.extents.append(extent)
    return t.data_ptr()


def dtype_code(t: torch.Tensor | None) -> int:
    """The csrc dtype code of t (0 fp32, 1 fp16, 2 bf16); 0 for None."""
    if t is None:
        return 0
    try:
        return DTYPE_CODE[t.dtype]
    except KeyError:
        raise TypeError(f"the cuda backend supports float32, float16 and bfloat16, got {t.dtype}") from None


def check_device(what: str, t: torch.Tensor) -> None:
    """ValueError unless t is a CUDA tensor or a CPU tensor; BackendUnavailableError when the
    module for its device (fastlm._C or fastlm._C_host) is missing."""
    if t.device.type not in ("cuda", "cpu"):
        raise ValueError(
            f"{what}: tensors must be CUDA tensors (fastlm._C) or CPU tensors (fastlm._C_host), got {t.device}"
        )
    lib(t.device)


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
