"""`python -m fastlm.cuda`: do fastlm._C (nvcc, CUDA tensors) and fastlm._C_host (host emulation,
CPU tensors) load, what were they built for, and does a launch fail cleanly (an error code, not a
crash): _C where there is no GPU, _C_host on null pointers, and a real _C_host launch on CPU
tensors. Exit 0 if either module imports, 1 if neither does."""

from __future__ import annotations

import sys


def _gpu_module() -> bool:
    try:
        from fastlm import _C
    except Exception as exc:
        print(f"fastlm._C: not importable ({type(exc).__name__}: {exc})")
        print("  build it with `make cuda-check` or `pip install -e . --no-build-isolation` where nvcc is available")
        return False
    print(f"fastlm._C: loaded from {_C.__file__}")
    print(f"  built for archs: {', '.join(_C.built_archs()) or '(none recorded)'}")
    rt = _C.cuda_runtime_version()
    print(f"  CUDA runtime: {rt // 1000}.{rt % 1000 // 10} ({rt})")
    devices = _C.device_count()
    print(f"  devices: {devices}")

    # Null pointers are rejected before anything touches a device: cudaErrorInvalidValue everywhere.
    code = _C.layer_norm_fwd(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1e-5, False, 0, 0, 0)
    print(f"  layer_norm_fwd(null pointers, M=N=1) -> {code} ({_C.error_string(code)})")
    if devices == 0:
        # Well-formed arguments, no GPU: the launch itself reports the runtime's error.
        fake = 1 << 20
        code = _C.layer_norm_fwd(fake, 0, 0, 0, fake, 0, 0, fake, 1, 1, 1, 1, 1, 1, 1e-5, False, 0, 0, 0)
        print(f"  layer_norm_fwd(no GPU, M=N=1) -> {code} ({_C.error_string(code)})")
    return True


def _host_module() -> bool:
    import torch

    from fastlm import cuda as fcuda

    err = fcuda.load_error("cpu")
    if err is not None:
        print(f"fastlm._C_host: {err}")
        return False
    H = fcuda.lib("cpu")
    print(f"fastlm._C_host: loaded from {H.__file__}")
    print(f"  host emulation of csrc/: fiber-schedule seed {H.emulation_seed()} (FASTLM_HOST_SEED fixes it), "
          f"{H.emulation_sm_count()} emulated SMs")
    code = H.layer_norm_fwd(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1e-5, False, 0, 0, 0)
    print(f"  layer_norm_fwd(null pointers, M=N=1) -> {code} ({H.error_string(code)})")
    from fastlm.cuda import layer_norm as cln

    x = torch.randn(3, 40)
    y, rstd = torch.empty_like(x), torch.empty(3)
    cln.layer_norm_fwd(x, None, None, None, 1e-5, True, y, None, None, rstd)
    err = (y - torch.nn.functional.rms_norm(x, (40,), eps=1e-5)).abs().max().item()
    print(f"  rms_norm on CPU tensors (3, 40) through the emulation: max |error| vs torch {err:.2e}")
    return True


def main() -> int:
    gpu = _gpu_module()
    host = _host_module()
    return 0 if gpu or host else 1


if __name__ == "__main__":
    sys.exit(main())
