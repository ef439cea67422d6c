"""pytest-benchmark over the same registry as `fastlm bench`, to catch regressions between commits:

    pytest benchmarks/ --benchmark-only --benchmark-autosave
    pytest benchmarks/ --benchmark-only --benchmark-compare

The device is synchronised inside the timed function. Without a GPU the quick sizes run through
the Triton interpreter: a harness check, not a performance figure.
"""

import pytest
import torch

import fastlm
from fastlm.bench import REGISTRY

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
QUICK = DEVICE.type == "cpu"
DTYPE = "bfloat16" if DEVICE.type == "cuda" else "float32"


def _params():
    out = []
    backends = fastlm.available_backends(DEVICE)
    for name, entry in REGISTRY.items():
        dtype = DTYPE if DTYPE in entry.dtypes else entry.dtypes[0]
        for mode in entry.modes:
            for case in entry.cases(dtype, mode, None, DEVICE, QUICK)[:3]:
                for impl in entry.impls(mode, DEVICE, backends):
                    if impl == "torch-compile" and QUICK:
                        continue
                    out.append(pytest.param(entry, mode, case, impl, id=f"{name}-{mode}-{dtype}-{case.label}-{impl}".replace(" ", "_")))
    return out


@pytest.mark.parametrize("entry,mode,case,impl", _params())
def test_bench(benchmark, entry, mode, case, impl):
    prepare = entry.impls(mode, DEVICE, fastlm.available_backends(DEVICE))[impl]
    run = prepare(case.make())

    def timed():
        out = run()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark.extra_info.update(op=entry.name, mode=mode, case=case.label, bytes=case.bytes, flops=case.flops)
    benchmark(timed)
