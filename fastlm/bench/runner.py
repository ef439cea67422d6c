"""Runs registry entries: ceilings, validation before timing, timing, results as plain dicts.

Timing is ``triton.testing.do_bench`` (median, after warm-up) on CUDA, or a CUDA-graph replay
(``do_bench_cudagraph``) for cases marked ``graph=True``; on the CPU (``--quick`` only) a
wall-clock median that is labelled as not a performance figure.
"""

from __future__ import annotations

import statistics
import time
import traceback

import torch

from fastlm import testing
from fastlm.bench.registry import REGISTRY, Case, Entry


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_ms(run, device, graph=False, quick=False) -> float:
    """Median milliseconds of run()."""
    if torch.device(device).type == "cuda":
        import triton.testing as tt

        if graph:
            return float(tt.do_bench_cudagraph(run, rep=50 if quick else 200))
        return float(tt.do_bench(run, warmup=10 if quick else 25, rep=30 if quick else 100, return_mode="median"))
    run()
    samples = []
    for _ in range(3):
        t0 = time.perf_counter()
        run()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def measure_ceilings(device, quick=False) -> dict:
    """Copy bandwidth (a device-to-device copy, bytes read + written) and the bf16 matmul rate."""
    dev = torch.device(device)
    n_copy = (1 << 20) if quick else (1 << 29)  # elements of 1 byte... uint8: 512 MiB on GPU
    src = torch.empty(n_copy, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), dev, quick=quick)
    copy_gbps = 2 * n_copy / (ms * 1e-3) / 1e9
    n = 256 if quick else 8192
    mm_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=dev, dtype=mm_dtype)
    b = torch.randn(n, n, device=dev, dtype=mm_dtype)
    ms = time_ms(lambda: a @ b, dev, quick=quick)
    tflops = 2 * n**3 / (ms * 1e-3) / 1e12
    return {"copy_gbps": copy_gbps, "matmul_tflops": tflops, "matmul_dtype": str(mm_dtype).replace("torch.", "")}


def _flatten(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    res = []
    for o in out or []:
        if o is not None:
            res.extend(_flatten(o))
    return res


def validate(out, truth, baseline, factor) -> float:
    """Worst error ratio under the tolerance rule across every output; raises AssertionError."""
    outs, truths, bases = _flatten(out), _flatten(truth), _flatten(baseline)
    if not (len(outs) == len(truths) == len(bases)):
        raise AssertionError(f"{len(outs)} outputs, {len(truths)} in the truth, {len(bases)} in the baseline")
    worst = 0.0
    for i, (o, t, b) in enumerate(zip(outs, truths, bases, strict=True)):
        if not o.is_floating_point():
            if not torch.equal(o.cpu(), t.cpu()):
                raise AssertionError(f"output {i}: integer result differs from the reference")
            continue
        worst = max(worst, testing.assert_close(o, t.to(o.device), b, name=f"output {i}", factor=factor))
    return worst


def run_case(entry: Entry, case: Case, mode: str, device, backends, quick, ceilings, only=None) -> list[dict]:
    """Validate then time every implementation of one case; returns one result dict per impl."""
    inputs = case.make()
    impls = entry.impls(mode, device, backends)
    if only is not None:
        impls = {k: v for k, v in impls.items() if k in only or k == entry.baseline}
    truth = entry.truth(inputs, mode)
    results = []
    base_out = None
    if entry.baseline in impls:
        base_out = impls[entry.baseline](inputs)()
    for name, prepare in impls.items():
        r = {"impl": name, "case": case.label, "size": case.size, "params": case.params, "status": "ok"}
        if quick and torch.device(device).type == "cpu" and name == "torch-compile":
            r.update(status="skipped", error="torch.compile is not timed in --quick runs on the CPU")
            results.append(r)
            continue
        try:
            run = prepare(inputs)
            out = run()
            _sync(device)
            if base_out is not None:
                r["error_ratio"] = validate(out, truth, base_out, entry.factor)
        except Exception as exc:  # a failing backend is reported, not timed
            r.update(status="failed", error=f"{type(exc).__name__}: {exc}".strip()[:500])
            r["traceback"] = traceback.format_exc(limit=3)[-800:]
            results.append(r)
            continue
        ms = time_ms(run, device, graph=case.params.get("graph", False), quick=quick)
        r["ms"] = ms
        if case.bytes:
            r["gbps"] = case.bytes / (ms * 1e-3) / 1e9
            r["pct_of_copy"] = 100 * r["gbps"] / ceilings["copy_gbps"]
        if case.flops:
            r["tflops"] = case.flops / (ms * 1e-3) / 1e12
            r["pct_of_matmul"] = 100 * r["tflops"] / ceilings["matmul_tflops"]
        if case.params.get("tokens"):  # whole-model entries (fastlm/bench/gpt.py)
            r["tokens_per_s"] = case.params["tokens"] / (ms * 1e-3)
        results.append(r)
    by_name = {r["impl"]: r for r in results if r.get("ms")}
    for r in results:
        if r.get("ms"):
            r["speedup"] = {b: by_name[b]["ms"] / r["ms"] for b in ("torch-eager", "torch-compile") if b in by_name}
    return results


def _skipped(entry: Entry, mode: str, dtype: str, why: str) -> dict:
    return {"op": entry.name, "mode": mode, "dtype": dtype, "metric": entry.metric, "case": "-", "size": 0, "impl": "-",
            "status": "skipped", "error": why}


def run(ops, *, dtype=None, modes=None, sizes=None, backends=None, device=None, quick=False, progress=None, impls=None):
    """Run entries; returns (ceilings, results). ``ops`` is a list of entry names or ["all"].
    ``dtype``: default bfloat16 on CUDA, float32 on the CPU (the Triton interpreter computes bf16
    wrongly, so bfloat16 there is a ValueError). A mode or dtype an entry lacks gives a "skipped"
    result saying so."""
    import fastlm.bench  # noqa: F401  (registers the entries)

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    names = list(REGISTRY) if ops == ["all"] or ops == "all" else list(ops)
    for n in names:
        if n not in REGISTRY:
            raise ValueError(f"unknown benchmark {n!r}; available: {', '.join(REGISTRY)}")
    if device.type == "cpu" and dtype == "bfloat16":
        raise ValueError("--dtype bfloat16 does not run on the CPU: the Triton interpreter computes bf16 wrongly. "
                         "Leave --dtype out (the CPU runs float32) or run on a GPU")
    dtype = dtype or ("bfloat16" if device.type == "cuda" else "float32")
    if backends is None:
        backends = fastlm.available_backends(device)
    ceilings = measure_ceilings(device, quick)
    todo, results = [], []
    for n in names:
        entry = REGISTRY[n]
        for mode in modes or entry.modes:
            if mode not in entry.modes:
                results.append(_skipped(entry, mode, dtype, f"{entry.name} has no {mode} mode (it has {', '.join(entry.modes)})"))
            elif dtype not in entry.dtypes:
                results.append(_skipped(entry, mode, dtype, f"{entry.name} does not run {dtype} (it runs {', '.join(entry.dtypes)})"))
            else:
                todo.extend((entry, dtype, mode, case) for case in entry.cases(dtype, mode, sizes, device, quick))
    for entry, dt, mode, case in (progress(todo) if progress else todo):
        for r in run_case(entry, case, mode, device, backends, quick, ceilings, only=impls):
            r.update(op=entry.name, mode=mode, dtype=dt, metric=entry.metric)
            results.append(r)
    return ceilings, results
