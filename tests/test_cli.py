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
        host = fastlm.cuda.load_error("cpu") is None
        assert ("cuda    available" if host else "cuda    unavailable") in r.stdout
        assert ("CPU tensors by fastlm._C_host" if host else "CPU tensors unavailable (fastlm._C_host is not built)") in r.stdout
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


# ---- clear errors before any work (issue 13) ----------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    import sysconfig

    from fastlm.training import TrainConfig, train

    root = tmp_path_factory.mktemp("tiny")
    os.environ.setdefault("FASTLM_CACHE_DIR", str(root / "cache"))
    (root / "a.py").write_text((Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text())
    out = root / "out"
    train(TrainConfig(data=[str(root / "a.py")], model=dict(n_layer=1, n_head=2, n_embd=32, block_size=32), steps=1,
                      batch_size=2, seq_len=32, vocab_size=300, eval_interval=0, out=str(out), progress=False,
                      backend="torch", device="cpu"), log=lambda *a: None)
    return out


def _no_work(monkeypatch):
    from fastlm import data

    def fail(*a, **k):
        raise AssertionError("the corpus was read before the settings were checked")

    monkeypatch.setattr(data, "find_files", fail)


@pytest.mark.parametrize("args,message", [
    (["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
    (["--seq-len", "100000"], r"--seq-len 100000 is longer than the model's context \(block_size 128\); a longer context is --set block_size=100000"),
    (["--steps", "-1"], "--steps must be an integer >= 1"),
    (["--log-interval", "0"], "--log-interval must be an integer >= 1"),
    (["--set", "n_layer=100000"], r"n_layer=100000 \(at most 1024\)"),
    (["--device", "tpu"], "--device .tpu. is not a device"),
    (["--device", "meta"], "--device meta: fastlm runs on cpu or cuda"),
    (["--fit-time-limit"], "--fit-time-limit needs --time-limit"),
    (["--task", "nope"], "--task .nope. is not a task; tasks: classify, (.* )?lm, mlm, sft"),
    (["--task", "classify", "--task-set", "pool=mean"], "--task-set 'pool=mean': expected KEY=VALUE with KEY one of pooling, eval_data"),
    (["--task", "mlm", "--task-set", "mask_prob=lots"], "--task-set 'mask_prob=lots': could not convert"),
    (["--task", "mlm", "--task-set", "mask_prob=2"], r"mask_prob must lie in \(0, 1\], got 2.0"),
    (["--task", "classify", "--task-set", "pooling=max"], "pooling must be one of auto, cls, mean, last"),
    (["--task", "sft", "--task-set", "template=no slot"], "template must hold {instruction} exactly once"),
])
def test_train_rejects_bad_settings_before_any_work(monkeypatch, capsys, tmp_path, args, message):
    import re

    _no_work(monkeypatch)
    assert main(["train", "--out", str(tmp_path / "o"), "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastlm train: ") and re.search(message, err), err
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(fastlm.backend.torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_device_cuda_and_backend_triton_that_cannot_run_are_clear_errors(monkeypatch, capsys, tmp_path, tiny_checkpoint):
    _no_work(monkeypatch)
    assert main(["train", "--out", str(tmp_path / "o"), "--device", "cuda"]) == 2
    assert "fastlm train: --device cuda: torch sees no CUDA device" in capsys.readouterr().err
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert main(["train", "--out", str(tmp_path / "o"), "--device", "cpu", "--backend", "triton"]) == 2
    assert "fastlm train: --backend triton cannot run on cpu tensors here: " in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(tiny_checkpoint), "--device", "cuda", "--prompt", "def "]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "fastlm generate: --device cuda: torch sees no CUDA device" in err


@pytest.mark.parametrize("args,message", [
    (["--max-new-tokens", "-5"], "--max-new-tokens must be >= 0, got -5"),
    (["--temperature", "-1"], "temperature must be"),
    (["--top-k", "0"], "top_k must be"),
    (["--top-p", "1.5"], "top_p must be"),
])
def test_generate_validates_before_printing_the_prompt(capsys, tiny_checkpoint, args, message):
    assert main(["generate", "--checkpoint", str(tiny_checkpoint), "--prompt", "def ", *args]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("fastlm generate: ") and message in err, (out, err)
    assert main(["generate", "--checkpoint", str(tiny_checkpoint), "--prompt", "def ", "--max-new-tokens", "3", "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("def ")  # the positive control


def test_sample_takes_an_int_seed():
    import torch

    logits = torch.randn(4, 50)
    a = fastlm.ops.sample(logits, seed=0, backend="torch")
    assert torch.equal(a, fastlm.ops.sample(logits, seed=torch.tensor([0, 0]), backend="torch"))
    assert torch.equal(a, fastlm.ops.sample(logits, seed=0, backend="torch"))
    with pytest.raises(TypeError, match="seed must be an int or an int64 tensor"):
        fastlm.ops.sample(logits, seed=0.5)
    with pytest.raises(ValueError, match="seed must fit in int64"):
        fastlm.ops.sample(logits, seed=2**63)


def test_a_token_id_equal_to_the_vocabulary_size_is_a_value_error():
    import torch

    from fastlm.models import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=2, n_embd=16))
    model(torch.tensor([[0, 9]]))  # the positive control
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 10\) \(the vocabulary size\), got ids from 0 to 10"):
        model(torch.tensor([[0, 10]]))
    with pytest.raises(ValueError, match=r"got ids from -1 to 3"):
        model(torch.tensor([[-1, 3]]))
    with pytest.raises(ValueError, match=r"GPT.generate: token ids must lie in \[0, 10\).*got \[10\]"):
        model.generate([[1, 10]], 2)


@pytest.mark.skipif(fastlm.backend.torch.cuda.is_available(), reason="checks the CPU --quick output")
def test_bench_quick_says_what_it_did_not_measure_or_run(capsys):
    assert main(["bench", "layer_norm", "--quick", "--mode", "fwd", "--sizes", "96"]) == 0
    out = capsys.readouterr().out
    assert "no peak ceilings on the CPU" in out and "copy 0 GB/s" not in out
    assert "skipped: torch.compile is not timed in --quick runs on the CPU" in out
    assert "float32" in out and "bfloat16" not in out
    assert main(["bench", "layer_norm", "--quick", "--dtype", "bfloat16"]) == 2
    assert "--dtype bfloat16 does not run on the CPU: the Triton interpreter computes bf16 wrongly" in capsys.readouterr().err
    assert main(["bench", "sampling", "--quick", "--mode", "bwd"]) == 0
    assert "nothing was run: sampling has no bwd mode (it has fwd)" in capsys.readouterr().out
