"""`python -m fastlm.cuda`: does fastlm._C load, what was it built for, and does a launch fail
cleanly (an error code, not a crash) where there is no GPU. Exit 0 if _C imports, 1 otherwise."""

from __future__ import annotations

import sys


def main() -> int:
    try:
        from fastlm import _C
    except Exception as exc:
        print(f"fastlm._C: not importable ({type(exc).__name__}: {exc})")
        print("build it with `make cuda-check` or `pip install -e . --no-build-isolation` where nvcc is available")
        return 1
    print(f"fastlm._C: loaded from {_C.__file__}")
    print(f"built for archs: {', '.join(_C.built_archs()) or '(none recorded)'}")
    rt = _C.cuda_runtime_version()
    print(f"CUDA runtime: {rt // 1000}.{rt % 1000 // 10} ({rt})")
    devices = _C.device_count()
    print(f"devices: {devices}")

    # Null pointers are rejected before anything touches a device: cudaErrorInvalidValue everywhere.
    code = _C.layer_norm_fwd(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1e-5, False, 0, 0, 0)
    print(f"layer_norm_fwd(null pointers, M=N=1) -> {code} ({_C.error_string(code)})")
    if devices == 0:
        # Well-formed arguments, no GPU: the launch itself reports the runtime's error.
        fake = 1 << 20
        code = _C.layer_norm_fwd(fake, 0, 0, 0, fake, 0, 0, fake, 1, 1, 1, 1, 1, 1, 1e-5, False, 0, 0, 0)
        print(f"layer_norm_fwd(no GPU, M=N=1) -> {code} ({_C.error_string(code)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
