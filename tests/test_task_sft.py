"""--task sft: targets only on the response tokens (and the closing end-of-text), packed pairs that
never see each other (the packed logits equal each pair run alone; the ops are attention_varlen),
the template stored with the checkpoint and applied by `fastlm generate --instruction`, exact
resume, clear data errors with line numbers, and the built-in pair set learned far above chance."""

import json

import pytest
import torch
from test_task_mlm import OpCounter

import fastlm
from fastlm.cli import main
from fastlm.tasks import get_task, load_task
from fastlm.tasks.sft import TEMPLATE, apply_template
from fastlm.training import TrainConfig, load_model, train

MODEL = dict(n_layer=2, n_head=4, n_embd=64, block_size=64)
QUIET = dict(log=lambda *a: None)
PAIRS = [{"prompt": f"What is {a} plus {b}?", "response": f"{a} plus {b} is {a + b}."} for a in range(12) for b in range(5)]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    """A cache per session; the reference backend (the ops' kernels are tested against it elsewhere,
    and the interpreter would take minutes here)."""
    monkeypatch.setenv("FASTLM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "fastlm-cache"))
    with fastlm.use_backend("torch"):
        yield


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    path = tmp_path_factory.mktemp("sft") / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    return path


def _tc(path, out, **kw):
    base = dict(task="sft", data=[str(path)] if path else None, model=dict(MODEL), steps=4, batch_size=4, vocab_size=300,
                warmup=2, eval_interval=2, eval_iters=2, log_interval=1, out=str(out), progress=False, backend="torch",
                device="cpu")
    return TrainConfig(**{**base, **kw})


def _task(tc):
    task = get_task("sft")(tc.task_options)
    torch.manual_seed(0)
    task.model = task.new_model(tc, print)
    task.load_data(tc, print)
    return task


def test_targets_are_the_response_and_end_of_text_only(pairs, tmp_path):
    task = _task(_tc(pairs, tmp_path))
    tok = task.tokenizer
    ids, p = task.train_seqs[0]
    prompt = tok.encode(apply_template(TEMPLATE, "What is 0 plus 0?"))
    assert p == len(prompt)
    b = task._batch([task.train_seqs[0], task.train_seqs[1]])
    t = b["targets"][0]
    n0 = len(ids)
    want = [-100] * (p - 1) + ids[p:] + [-100]
    assert t[:n0].tolist() == want
    assert ids[-1] == tok.eos_id and tok.decode(ids[p:-1]) in {f"{a} plus {b} is {a + b}." for a in range(12) for b in range(5)}
    ids1, p1 = task.train_seqs[1]
    assert t[n0:].tolist() == [-100] * (p1 - 1) + ids1[p1:] + [-100]  # the second pair's targets start afresh
    assert b["cu_seqlens"].tolist() == [0, n0, n0 + len(ids1)]


def test_packed_pairs_do_not_see_each_other(pairs, tmp_path, monkeypatch):
    """Each pair's logits in a packed batch equal the pair run alone (unpacked); the packed loss
    is the token-weighted mean of the pairs' own losses."""
    task = _task(_tc(pairs, tmp_path))
    model = task.model
    seqs = [task.train_seqs[i] for i in (0, 5, 9)]
    b = task._batch(seqs)
    counter = OpCounter(monkeypatch)
    logits = model(b["idx"], cu_seqlens=b["cu_seqlens"], max_seqlen=b["max_seqlen"])[0]
    assert counter.count("attention_varlen") == MODEL["n_layer"] and counter.count("attention") == 0
    assert counter.causal == [True] * MODEL["n_layer"]
    start, losses, counts = 0, [], []
    for ids, _ in seqs:
        alone = model(torch.tensor([ids]))[0]
        torch.testing.assert_close(logits[start : start + len(ids)], alone, rtol=1e-5, atol=1e-5)
        one = task._batch([(ids, _)])
        losses.append(task.loss(model, one) * int((one["targets"] != -100).sum()))
        counts.append(int((one["targets"] != -100).sum()))
        start += len(ids)
    torch.testing.assert_close(task.loss(model, b), sum(losses) / sum(counts), rtol=1e-5, atol=1e-6)


def test_resume_is_exact_then_generate_applies_the_template(pairs, tmp_path, capsys):
    full = train(_tc(pairs, tmp_path / "full", task_options={"template": "Q: {instruction}\nA:"}), **QUIET)
    train(_tc(pairs, tmp_path / "split", steps=2, decay_steps=4, task_options={"template": "Q: {instruction}\nA:"}), **QUIET)
    rest = train(_tc(pairs, tmp_path / "split", resume=True), **QUIET)
    assert rest["start_step"] == 2 and rest["eval"] == full["eval"]
    a, b = load_model(tmp_path / "full"), load_model(tmp_path / "split")
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    task, model = load_task(tmp_path / "split", expect="sft")
    assert task.options.template == "Q: {instruction}\nA:"
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(tmp_path / "split"), "--instruction", "What is 3 plus 4?",
                 "--temperature", "0", "--max-new-tokens", "8", "--backend", "torch"]) == 0
    out = capsys.readouterr().out
    ids = task.tokenizer.encode("Q: What is 3 plus 4?\nA:")
    got = model.generate([ids], 8, temperature=0, eos_token_id=task.tokenizer.eos_id, cuda_graph=False)[0]
    new = [t for t in got if t != task.tokenizer.eos_id]
    assert out == task.tokenizer.decode(new) + "\n"
    assert main(["generate", "--checkpoint", str(tmp_path / "split"), "--instruction", "x", "--prompt", "y"]) == 2
    assert "pass one of them" in capsys.readouterr().err


def test_instruction_needs_an_sft_checkpoint(pairs, tmp_path, capsys):
    import sysconfig
    from pathlib import Path

    (tmp_path / "a.py").write_text((Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text())
    train(TrainConfig(data=[str(tmp_path / "a.py")], model=dict(n_layer=1, n_head=2, n_embd=32, block_size=32), steps=1,
                      batch_size=2, vocab_size=300, eval_interval=0, out=str(tmp_path / "lm"), progress=False,
                      backend="torch", device="cpu"), **QUIET)
    assert main(["generate", "--checkpoint", str(tmp_path / "lm"), "--instruction", "hi"]) == 2
    assert "needs a checkpoint of `fastlm train --task sft`" in capsys.readouterr().err


@pytest.mark.parametrize("lines,message", [
    (['{"prompt": "a", "response": "b"}', '{"prompt": "a"}'], r"line 2: missing field 'response'"),
    (['{"prompt": "a", "response": "b"}', "", '{"prompt": "a", "response": "b",}'], r"line 3: not valid JSON"),
    (['{"prompt": 1, "response": "b"}'], r"line 1: field 'prompt' must be a str, got int"),
    (["[1, 2]"], r"line 1: expected a JSON object"),
    ([""], r"empty data set: .* holds no records"),
])
def test_bad_data_is_a_clear_error_with_the_line(tmp_path, lines, message):
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message):
        train(_tc(tmp_path / "d.jsonl", tmp_path / "o"), **QUIET)


@pytest.mark.parametrize("kw,message", [
    (dict(task_options={"template": "no slot"}), "template must hold {instruction} exactly once"),
    (dict(model=dict(MODEL, causal=False)), "sft trains a generator"),
    (dict(data=["/nonexistent/p.jsonl"]), "does not exist"),
])
def test_bad_settings_are_clear_errors_before_any_work(pairs, tmp_path, kw, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        train(_tc(pairs, tmp_path / "o", **kw), **QUIET)
    assert not (tmp_path / "o").exists()


def test_a_prompt_longer_than_the_context_names_its_line(tmp_path):
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PAIRS[:3] + [{"prompt": "word " * 200, "response": "x"}]))
    with pytest.raises(ValueError, match=r"line 4: the templated prompt is \d+ tokens, leaving no room"):
        train(_tc(tmp_path / "d.jsonl", tmp_path / "o", val_fraction=0.3), **QUIET)


def test_builtin_pairs_are_learned_far_above_chance(tmp_path):
    """The built-in set (the standard library's docstrings as answers): held-out response-token
    accuracy far above chance (1 / vocabulary) and above the most frequent response token's share."""
    s = train(_tc(None, tmp_path, model=dict(n_layer=2, n_head=4, n_embd=64, block_size=128), steps=60, batch_size=16,
                  lr=3e-3, warmup=5, eval_interval=60, eval_iters=4, log_interval=20, vocab_size=None), **QUIET)
    task, _ = load_task(tmp_path, expect="sft")
    task.load_data(_tc(None, tmp_path, vocab_size=None, model=dict(n_layer=2, n_head=4, n_embd=64, block_size=128)), print)
    targets = torch.cat([task._batch([s])["targets"][0] for s in task.val_seqs[:64]])
    targets = targets[targets != -100]
    top = torch.bincount(targets).max().item() / targets.numel()
    assert s["eval"]["eval_accuracy"] > max(50 / task.tokenizer.vocab_size, 1.5 * top), (s["eval"], top)
