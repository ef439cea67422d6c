"""`fastlm info`: what this machine can run, and why not where it cannot."""

from __future__ import annotations

import platform

import torch

import fastlm
from fastlm import backend


def collect() -> dict:
    from fastlm import cuda as fcuda

    try:
        import triton

        triton_version = triton.__version__
    except Exception as exc:
        triton_version = f"not importable ({exc})"
    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = f"{props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs)"
    ext = {"built": fcuda.load_error("cuda") is None, "why_not": fcuda.load_error("cuda")}
    if ext["built"]:
        lib = fcuda.lib("cuda")
        ext["archs"] = list(lib.built_archs())
        ext["cuda_runtime"] = lib.cuda_runtime_version()
    host = {"built": fcuda.load_error("cpu") is None, "why_not": fcuda.load_error("cpu")}
    if host["built"]:
        lib = fcuda.lib("cpu")
        host["file"] = lib.__file__
        host["seed"] = lib.emulation_seed()
        host["sm_count"] = lib.emulation_sm_count()
    if ext["built"] or host["built"]:
        ext["coverage"] = fcuda.coverage()
    return {
        "fastlm": fastlm.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "gpu": gpu,
        "why_no_gpu": None if gpu else "torch.cuda.is_available() is False (no CUDA device or driver visible, or a CPU-only torch)",
        "interpreter": backend.interpreter_on(),
        "extension": ext,
        "host_extension": host,
        "cuda_backend": {
            "cuda tensors": "fastlm._C" if ext["built"] else None,
            "cpu tensors": "fastlm._C_host" if host["built"] else None,
        },
        "backends": {b: backend.why_unavailable(b) for b in backend.BACKENDS},
        "selected": backend.current_backend(),
        "default_cuda": dict(backend.DEFAULT_CUDA_BACKEND),
        "notes": list(NOTES),
    }


# What a user should know before choosing a dtype or a head dim (the README says the same).
NOTES = (
    "triton attention in float32: 3xTF32 tensor-core dots (fp32-level accuracy) for head dims up to 128 and "
    "IEEE FMA dots above (and for the dK/dV gradient with dropout at 128), on small tiles (no larger fp32 tile fits the registers without spilling): several "
    "times slower than bfloat16/float16, which use full-size tiles",
)


def render(info: dict) -> str:
    lines = [
        f"fastlm {info['fastlm']}  python {info['python']}  torch {info['torch']} (CUDA {info['torch_cuda'] or 'none'})  triton {info['triton']}",
        f"GPU: {info['gpu'] or 'none: ' + info['why_no_gpu']}",
        f"Triton interpreter (TRITON_INTERPRET=1): {'on: Triton kernels run on CPU tensors, slowly' if info['interpreter'] else 'off'}",
    ]
    ext, host = info["extension"], info["host_extension"]
    if ext["built"]:
        lines.append(f"fastlm._C: built for {', '.join(ext['archs'])} (CUDA runtime {ext['cuda_runtime']})")
    else:
        lines.append(f"fastlm._C: {ext['why_not']}")
    if host["built"]:
        lines.append(f"fastlm._C_host: built (host emulation of csrc/, sanitized; fiber-schedule seed {host['seed']}, "
                     f"{host['sm_count']} emulated SMs)")
    else:
        lines.append(f"fastlm._C_host: {host['why_not']}")
    serves = info["cuda_backend"]
    lines.append(
        "cuda backend: CUDA tensors "
        + (f"by {serves['cuda tensors']}" + ("" if info["gpu"] else " (none visible here)") if serves["cuda tensors"] else "unavailable (fastlm._C is not built)")
        + "; CPU tensors " + (f"by {serves['cpu tensors']}" if serves["cpu tensors"] else "unavailable (fastlm._C_host is not built)")
    )
    for op, text in ext.get("coverage", {}).items():
        lines.append(f"  cuda {op}: {text}")
    lines.append("Backends:")
    for b, why in info["backends"].items():
        lines.append(f"  {b:7s} {'available' if why is None else 'unavailable: ' + why}")
    sel = info["selected"]
    lines.append(
        f"Selected: {sel!r} (use_backend / FASTLM_BACKEND)" if sel else
        "Selected: default (CUDA tensors: fastest measured, Triton unless benchmarks/results say otherwise; "
        "CPU tensors: the reference" + (", Triton under the interpreter)" if info["interpreter"] else ")")
    )
    for note in info.get("notes", ()):
        lines.append(f"Note: {note}")
    return "\n".join(lines)
