"""The user-facing commands: info, bench (--quick on the CPU), check, and the JSON schema."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

import fastlm
from fastlm.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, env=None):
    e = dict(os.environ)
    e.pop("TRITON_INTERPRET", None)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "fastlm", *args], capture_output=True, text=True, env=e, cwd=ROOT, timeout=600)


def test_import_needs_no_gpu_nvcc_or_extension_and_no_triton():
    """import fastlm must not import triton: that would pin TRITON_INTERPRET off for the process."""
    code = "import sys, fastlm; assert 'triton' not in sys.modules, 'import fastlm imported triton'; print(fastlm.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == fastlm.__version__


def test_info_explains_missing_gpu():
    r = _run("info")
    assert r.returncode == 0, r.stderr
    assert "fastlm " + fastlm.__version__ in r.stdout
    assert "Backends:" in r.stdout and "torch   available" in r.stdout
    if not fastlm.backend.torch.cuda.is_available():
        assert "GPU: none" in r.stdout
        assert "cuda    unavailable" in r.stdout
    r = _run("info", "--json")
    data = json.loads(r.stdout)
    assert set(data["backends"]) == {"torch", "triton", "cuda"}


def test_bench_list_and_errors(capsys):
    assert main(["bench", "--list"]) == 0
    listed = capsys.readouterr().out
    assert "layer_norm" in listed and "rms_norm" in listed
    assert main(["bench", "no_such_op", "--quick"]) == 2
    assert "unknown benchmark 'no_such_op'" in capsys.readouterr().err


@pytest.mark.skipif(fastlm.backend.torch.cuda.is_available(), reason="checks the CPU-only message")
def test_bench_without_gpu_says_so():
    r = _run("bench", "layer_norm")
    assert r.returncode == 2
    assert "a CUDA GPU is needed" in r.stderr


def test_bench_quick_json_validates_against_schema(tmp_path):
    out = tmp_path / "r.json"
    r = _run("bench", "all", "--quick", "--json", str(out), "--csv", str(tmp_path / "r.csv"), "--plot", str(tmp_path / "r.png"))
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(out.read_text())
    schema = json.loads((ROOT / "fastlm" / "bench" / "schema.json").read_text())
    jsonschema.validate(doc, schema)
    impls = {x["impl"] for x in doc["results"] if x["status"] == "ok"}
    assert {"torch-eager", "fastlm-triton"} <= impls
    assert all(x["status"] != "failed" for x in doc["results"])
    import fastlm.bench

    assert {x["op"] for x in doc["results"]} == set(fastlm.bench.REGISTRY)  # every entry ran
    # benchmarks/perf_table.py: merged per-entry runs stay valid, and the README table is regenerated
    table = [sys.executable, str(ROOT / "benchmarks" / "perf_table.py")]
    merged = tmp_path / "merged.json"
    subprocess.run([*table, "--merge", str(merged), str(out), str(out)], check=True)
    jsonschema.validate(json.loads(merged.read_text()), schema)
    assert len(json.loads(merged.read_text())["results"]) == 2 * len(doc["results"])
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- perf-table:begin -->\nold\n<!-- perf-table:end -->\nrest\n")
    subprocess.run([*table, str(out), "--readme", str(readme)], check=True)
    text = readme.read_text()
    assert "old" not in text and "| rms_norm | fwd |" in text and "not a performance figure" in text and text.endswith("rest\n")
    assert (tmp_path / "r.png").stat().st_size > 0
    assert (tmp_path / "r.csv").read_text().startswith("op,mode")
    if not doc["performance_figure"]:
        assert "Not a performance figure" in r.stdout


def test_bench_reports_a_failing_backend_instead_of_timing_it(monkeypatch):
    from fastlm.bench import runner
    from fastlm.triton import layer_norm as tln

    broken_fwd = tln.layer_norm_fwd
    monkeypatch.setattr(tln, "layer_norm_fwd", lambda *a: (broken_fwd(*a), a[6].mul_(1.5)))
    _, results = runner.run(["layer_norm"], modes=["fwd"], sizes=[96], quick=True, impls=["fastlm-triton"])
    tri = [r for r in results if r["impl"] == "fastlm-triton"]
    assert tri and all(r["status"] == "failed" and "ms" not in r for r in tri)
    assert "exceeds" in tri[0]["error"]


def test_check_cpu_passes_and_fails_loudly(monkeypatch, capsys):
    assert main(["check", "rms_norm", "--device", "cpu"]) == 0
    assert "rms_norm" in capsys.readouterr().out
    from fastlm.triton import layer_norm as tln

    good = tln.layer_norm_fwd
    monkeypatch.setattr(tln, "layer_norm_fwd", lambda *a: (good(*a), a[6].add_(0.5)))
    assert main(["check", "rms_norm", "--device", "cpu"]) == 1
    assert main(["check", "nope"]) == 2
