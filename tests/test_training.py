"""Training: exact resume (2N steps == N + resume N), Ctrl-C writes a checkpoint, atomic and
validated checkpoints, DDP on 2 gloo CPU processes == one process with the whole batch, the data
pipeline (default corpus, BPE tokenizer, GPT-2 tokenizer files), metrics and the loss curve, clear
errors, and the `fastlm train` / `fastlm generate` commands end to end."""

import json
import os
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from fastlm import data as fdata
from fastlm.models import GPT
from fastlm.tokenizer import StreamDecoder, Tokenizer
from fastlm.training import CheckpointError, TrainConfig, find_checkpoint, load_checkpoint, load_model, lr_at, train

ROOT = Path(__file__).resolve().parents[1]
MODEL = dict(n_layer=2, n_head=4, n_embd=64, block_size=32)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """~60 KB of the standard library's Python, in two files."""
    d = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    (d / "a.py").write_text((stdlib / "textwrap.py").read_text() + (stdlib / "string.py").read_text())
    (d / "sub").mkdir()
    (d / "sub" / "b.txt").write_text((stdlib / "shlex.py").read_text())
    return d


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FASTLM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "fastlm-cache"))


def _tc(corpus, out, **kw):
    base = dict(data=[str(corpus)], model=dict(MODEL), steps=4, batch_size=4, seq_len=32, vocab_size=300, warmup=2,
                eval_interval=2, eval_iters=2, log_interval=1, out=str(out), progress=False, backend="torch", device="cpu")
    return TrainConfig(**{**base, **kw})


def _params(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_resume_is_exact(corpus, tmp_path):
    """train 2N steps == train N, then --resume to 2N: bit-identical parameters on the CPU."""
    full = train(_tc(corpus, tmp_path / "full", steps=6), log=lambda *a: None)
    half = train(_tc(corpus, tmp_path / "split", steps=3, decay_steps=6), log=lambda *a: None)
    assert half["step"] == 3
    rest = train(_tc(corpus, tmp_path / "split", steps=6, resume=True), log=lambda *a: None)
    assert rest["start_step"] == 3 and rest["step"] == full["step"] == 6
    a, b = load_model(tmp_path / "full"), load_model(tmp_path / "split")
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    _, _, state_a, opt_a, _ = load_checkpoint(tmp_path / "full")
    _, _, state_b, opt_b, _ = load_checkpoint(tmp_path / "split")
    assert state_a["position"] == state_b["position"] == 6 * 4
    for i, s in opt_a["state"].items():
        assert torch.equal(s["exp_avg_sq"], opt_b["state"][i]["exp_avg_sq"])
    rows = [json.loads(x) for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert any("eval_loss" in r and "eval_ppl" in r for r in rows)
    assert (tmp_path / "split" / "loss.png").stat().st_size > 0


def test_ctrl_c_writes_a_checkpoint_then_resumes_exactly(corpus, tmp_path):
    def interrupt(step, model):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # a real SIGINT: the handler lets the step finish

    s = train(_tc(corpus, tmp_path / "a"), on_step=interrupt, log=lambda *a: None)
    assert s["interrupted"] and s["step"] == 2
    assert json.loads((tmp_path / "a" / "checkpoint" / "trainer_state.json").read_text())["step"] == 2
    train(_tc(corpus, tmp_path / "a", resume=True), log=lambda *a: None)
    train(_tc(corpus, tmp_path / "b"), log=lambda *a: None)
    a, b = load_model(tmp_path / "a"), load_model(tmp_path / "b")
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_checkpoint_is_atomic_and_validated(corpus, tmp_path):
    train(_tc(corpus, tmp_path, steps=2), log=lambda *a: None)
    ckpt = tmp_path / "checkpoint"
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(
        ["model.safetensors", "config.json", "optimizer.pt", "rng.pt", "trainer_state.json", "tokenizer.json", "SHA256SUMS"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".checkpoint-tmp", "checkpoint.old"))]
    assert find_checkpoint(tmp_path) == ckpt and find_checkpoint(ckpt) == ckpt
    model = GPT.from_pretrained(tmp_path)  # a fastlm checkpoint loads through from_pretrained too
    assert model.config.n_layer == 2
    # a crash between the two renames of a save leaves checkpoint.old, which is still found
    os.replace(ckpt, tmp_path / "checkpoint.old")
    assert find_checkpoint(tmp_path) == tmp_path / "checkpoint.old"
    os.replace(tmp_path / "checkpoint.old", ckpt)

    weights = ckpt / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors does not match its SHA-256 in SHA256SUMS"):
        load_model(tmp_path)
    weights.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="corrupt"):
        train(_tc(corpus, tmp_path, steps=3, resume=True), log=lambda *a: None)
    weights.write_bytes(good)
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json does not match its SHA-256"):
        load_model(tmp_path)
    (ckpt / "optimizer.pt").unlink()
    with pytest.raises(CheckpointError, match="incomplete: missing optimizer.pt"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        train(_tc(corpus, tmp_path / "nothing", resume=True), log=lambda *a: None)


def test_data_errors(corpus, tmp_path):
    with pytest.raises(FileNotFoundError, match="data path '.*nope' does not exist"):
        train(_tc(corpus, tmp_path, data=[str(tmp_path / "nope")]), log=lambda *a: None)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.txt").write_text("")
    with pytest.raises(ValueError, match="empty corpus"):
        train(_tc(corpus, tmp_path, data=[str(tmp_path / "empty")]), log=lambda *a: None)
    (tmp_path / "small.txt").write_text("x = 1\n")
    with pytest.raises(ValueError, match="corpus too small"):
        train(_tc(corpus, tmp_path, data=[str(tmp_path / "small.txt")]), log=lambda *a: None)
    with pytest.raises(ValueError, match="needs a causal model"):
        train(_tc(corpus, tmp_path, model=dict(MODEL, causal=False)), log=lambda *a: None)
    with pytest.raises(ValueError, match="unknown GPT preset 'huge'; presets: tiny, gpt2, gpt2-medium"):
        train(_tc(corpus, tmp_path, preset="huge"), log=lambda *a: None)


def test_default_corpus_is_the_standard_library():
    files = fdata.default_corpus()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    assert len(files) > 100 and all(f.suffix == ".py" and stdlib in f.parents for f in files)
    assert not any("site-packages" in f.parts for f in files)


def test_batches_and_split():
    tokens = torch.arange(1000, dtype=torch.int32)
    train_t, val_t = fdata.split(tokens, 10, 0.1)
    assert train_t.numel() == 900 and val_t[0] == 900
    b = fdata.Batches(train_t, 10, seed=3)
    x, y = b.get(0, 200)  # more than an epoch: wraps into the next one
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y - x, torch.ones_like(x))
    assert torch.equal(b.get(5, 4)[0], fdata.Batches(train_t, 10, seed=3).get(5, 4)[0])  # a function of (seed, position)
    assert not torch.equal(b.get(0, 4)[0], fdata.Batches(train_t, 10, seed=4).get(0, 4)[0])
    assert int(x.max()) < 900


def test_tokenizer_roundtrip_gpt2_files_and_streaming(tmp_path):
    text = "def f(x):\n    return x * 2  # ünïcode ✓\n" * 20
    tok = Tokenizer.train([text], 300)
    ids = tok.encode(text)
    assert tok.decode(ids) == text and tok.eos_id is not None and tok.vocab_size <= 300
    loaded = Tokenizer.load(tok.save(tmp_path))
    assert loaded.encode(text) == ids
    # GPT-2-style vocab.json + merges.txt
    vocab = json.loads(tok.tk.to_str())["model"]["vocab"]
    merges = json.loads(tok.tk.to_str())["model"]["merges"]
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "vocab.json").write_text(json.dumps(vocab))
    (gpt2 / "merges.txt").write_text("#version: 0.2\n" + "\n".join(m if isinstance(m, str) else " ".join(m) for m in merges) + "\n")
    assert Tokenizer.load(gpt2).decode(Tokenizer.load(gpt2).encode(text)) == text
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        Tokenizer.load(tmp_path / "none")
    s = StreamDecoder(tok)
    assert "".join(s.push(i) for i in tok.encode("✓ ok")) == "✓ ok"


def test_lr_schedule():
    tc = TrainConfig(steps=100, lr=1.0, min_lr=0.1, warmup=10)
    assert lr_at(0, tc) == pytest.approx(0.1) and lr_at(9, tc) == pytest.approx(1.0)
    assert lr_at(10, tc) == pytest.approx(1.0) and lr_at(55, tc) == pytest.approx(0.55)
    assert lr_at(100, tc) == pytest.approx(0.1) and lr_at(500, tc) == pytest.approx(0.1)


def _env(tmp_path):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_ddp_two_gloo_processes_equal_one_process(corpus, tmp_path):
    """torchrun, 2 CPU processes x batch 2 == 1 process x batch 4 (same windows, averaged gradients)."""
    args = ["--data", str(corpus), "--steps", "3", "--seq-len", "32", "--vocab-size", "300", "--warmup", "1",
            "--eval-interval", "3", "--eval-iters", "1", "--log-interval", "1", "--backend", "torch", "--no-progress", "--device", "cpu",
            *[f"--set={k}={v}" for k, v in MODEL.items()]]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fastlm",
                        "train", *args, "--batch-size", "2", "--out", str(tmp_path / "ddp")],
                       env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "2 x cpu" in r.stdout
    train(_tc(corpus, tmp_path / "one", steps=3, warmup=1, eval_interval=3, eval_iters=1, batch_size=4), log=lambda *a: None)
    a, b = load_model(tmp_path / "ddp"), load_model(tmp_path / "one")
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, b.state_dict()[k], rtol=1e-4, atol=1e-5, msg=k)
    assert json.loads((tmp_path / "ddp" / "checkpoint" / "trainer_state.json").read_text())["position"] == 12


def test_cli_train_then_generate(corpus, tmp_path):
    env = _env(tmp_path)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "fastlm", "train", "--data", str(corpus), "--steps", "3", "--batch-size", "2",
                        "--seq-len", "32", "--vocab-size", "300", "--out", str(out), "--eval-interval", "3",
                        "--set", "n_layer=1", "--set", "n_embd=32", "--set", "block_size=32", "--set", "positions=rotary"],
                       env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "held-out loss" in r.stdout + r.stderr and (out / "loss.png").is_file()
    gen = [sys.executable, "-m", "fastlm", "generate", "--checkpoint", str(out), "--max-new-tokens", "12", "--seed", "0"]
    r = subprocess.run([*gen, "--prompt", "def "], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("def ") and len(r.stdout) > 5
    r = subprocess.run([*gen, "--prompt", "x = 1\n" * 40], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "longer than the model's context of 32 tokens" in r.stderr
    r = subprocess.run([*gen[:5], str(tmp_path / "missing"), "--prompt", "x"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_time_limit_stops_cleanly_with_a_checkpoint(corpus, tmp_path):
    s = train(_tc(corpus, tmp_path, steps=4, time_limit=1e-9), log=lambda *a: None)
    assert s["step"] == 1 and not s["interrupted"] and s["eval_loss"] is not None
    assert json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())["step"] == 1


def test_cli_ctrl_c_writes_a_checkpoint_and_exits_130(corpus, tmp_path):
    import time

    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "fastlm", "train", "--data", str(corpus), "--steps", "100000",
                             "--batch-size", "2", "--seq-len", "32", "--vocab-size", "300", "--out", str(out),
                             "--log-interval", "1", "--eval-interval", "0", "--no-progress", "--set", "n_layer=1",
                             "--set", "n_embd=32", "--set", "block_size=32"],
                            env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip()):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr[-2000:]
    assert "writing a checkpoint" in stdout and "continue with --resume" in stdout
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] >= 1
