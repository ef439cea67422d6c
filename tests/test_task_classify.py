"""--task classify: packed batches (a text's logits never depend on its batch companions, for every
pooling), every norm/attention call through fastlm.ops (attention_varlen), the label set stored with
the checkpoint (string and int labels), clear errors for bad data and unknown labels, --init-from a
fastlm checkpoint and local Hugging Face GPT-2 and BERT directories, exact resume, `fastlm classify`, and
the built-in docstring-vs-code set learned far above chance."""

import json
import sysconfig
from pathlib import Path

import pytest
import torch
from test_task_mlm import OpCounter

import fastlm
from fastlm.cli import main
from fastlm.models import GPT
from fastlm.tasks import get_task, load_task
from fastlm.training import CheckpointError, TrainConfig, load_model, train

MODEL = dict(n_layer=2, n_head=4, n_embd=64, block_size=48)
QUIET = dict(log=lambda *a: None)
WORDS = {"fruit": "apple pear plum fig grape melon", "tool": "hammer saw drill wrench chisel pliers"}


def _records(n=60, int_labels=False):
    out = []
    for i in range(n):
        label = ["fruit", "tool"][i % 2]
        words = WORDS[label].split()
        text = " ".join(words[(i * 7 + j) % len(words)] for j in range(3 + i % 5))
        out.append({"text": text, "label": i % 2 if int_labels else label})
    return out


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    """A cache per session; the reference backend (the ops' kernels are tested against it elsewhere,
    and the interpreter would take minutes here)."""
    monkeypatch.setenv("FASTLM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "fastlm-cache"))
    with fastlm.use_backend("torch"):
        yield


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("cls") / "train.jsonl", _records())


def _tc(path, out, **kw):
    base = dict(task="classify", data=[str(path)] if path else None, model=dict(MODEL), steps=4, batch_size=8,
                vocab_size=300, warmup=2, eval_interval=2, eval_iters=2, log_interval=1, out=str(out), progress=False,
                backend="torch", device="cpu", val_fraction=0.2)
    return TrainConfig(**{**base, **kw})


def _task(tc):
    task = get_task("classify")(tc.task_options)
    torch.manual_seed(0)
    task.model = task.new_model(tc, print)
    task.load_data(tc, print)
    return task


@pytest.mark.parametrize("pooling,causal", [("cls", False), ("mean", False), ("mean", True), ("last", True)])
def test_a_text_is_classified_the_same_whatever_its_batch(data, tmp_path, monkeypatch, pooling, causal):
    """Packed: each text's logits equal the text alone, run unpacked through hidden_states and
    pooled by hand (no pad or neighbour leaks in); every norm/attention call is a fastlm op."""
    task = _task(_tc(data, tmp_path, model=dict(MODEL, causal=causal), task_options={"pooling": pooling}))
    model = task.model
    xs = [task.train_x[i] for i in (0, 1, 2, 5)]
    assert len({len(x) for x in xs}) > 1
    b = task._batch(xs, [0] * len(xs))
    counter = OpCounter(monkeypatch)
    logits = model(b["idx"], b["cu_seqlens"], b["max_seqlen"])
    L = MODEL["n_layer"]
    assert counter.count("attention_varlen") == L and counter.count("attention") == 0 and counter.causal == [causal] * L
    assert counter.count("layer_norm") == 1 and counter.count("add_layer_norm") == 2 * L
    for x, got in zip(xs, logits, strict=True):
        h = model.backbone.hidden_states(torch.tensor([x]))[0]
        pooled = {"cls": h[0], "mean": h.mean(0), "last": h[-1]}[pooling]
        torch.testing.assert_close(got, model.head(pooled), rtol=1e-5, atol=1e-5)
    eos = task.tokenizer.eos_id
    assert all((x[0] == eos) if pooling == "cls" else (x[-1] == eos) if pooling == "last" else True for x in xs)


def test_cls_pooling_on_a_causal_model_is_refused(data, tmp_path):
    with pytest.raises(ValueError, match="pooling cls reads the first token"):
        _task(_tc(data, tmp_path, task_options={"pooling": "cls"}))


@pytest.mark.parametrize("int_labels", [False, True])
def test_resume_is_exact_and_fastlm_classify_prints_label_and_probabilities(tmp_path, capsys, int_labels):
    path = _write(tmp_path / "d.jsonl", _records(int_labels=int_labels))
    full = train(_tc(path, tmp_path / "full"), **QUIET)
    train(_tc(path, tmp_path / "split", steps=2, decay_steps=4), **QUIET)
    rest = train(_tc(path, tmp_path / "split", resume=True), **QUIET)
    assert rest["start_step"] == 2 and rest["eval"] == full["eval"] and "eval_accuracy" in rest["eval"]
    task, model = load_task(tmp_path / "split", expect="classify")
    _, other = load_task(tmp_path / "full")
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in model.state_dict().items())
    labels = [0, 1] if int_labels else ["fruit", "tool"]
    assert task.labels == labels and task.pooling == "last"
    assert json.loads((tmp_path / "split" / "checkpoint" / "task.json").read_text())["state"]["labels"] == labels
    assert (tmp_path / "split" / "accuracy.png").stat().st_size > 0
    capsys.readouterr()
    assert main(["classify", "--checkpoint", str(tmp_path / "split"), "--text", "apple fig", "--text", "saw drill",
                 "--json", "--backend", "torch"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    want = task.predict(model, ["apple fig", "saw drill"])
    assert [r["label"] for r in rows] == [w["label"] for w in want] and all(r["label"] in labels for r in rows)
    for r, w in zip(rows, want, strict=True):
        assert sum(r["probabilities"].values()) == pytest.approx(1.0)
        assert r["probabilities"] == pytest.approx({str(k): v for k, v in w["probabilities"].items()})
    assert main(["classify", "--checkpoint", str(tmp_path / "split"), "--text", "plum"]) == 0
    line = capsys.readouterr().out
    assert line.split("\t")[0] in map(str, labels) and line.count(": ") == 2
    with pytest.raises(CheckpointError, match="holds a classify model, not a plain GPT"):
        load_model(tmp_path / "split")


@pytest.mark.parametrize("lines,message", [
    (['{"text": "a", "label": "x"}', '{"label": "y"}'], r"line 2: missing field 'text'"),
    (['{"text": "a", "label": "x"}', "{oops"], r"line 2: not valid JSON"),
    (['{"text": "a", "label": 1.5}'], r"line 1: field 'label' must be a str or int, got float"),
    (['{"text": "a", "label": true}'], r"line 1: field 'label' must be a str or int, got bool"),
    (['{"text": "a", "label": "x"}', '{"text": "b", "label": 2}'], r"labels must be all strings or all integers; line 1 has 'x', line 2 has 2"),
    (['{"text": "a", "label": "x"}', '{"text": "b", "label": "x"}'], r"at least 2 labels, the data has only \['x'\]"),
    (["", "  "], r"empty data set"),
])
def test_bad_data_is_a_clear_error_with_the_line(tmp_path, lines, message):
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message):
        train(_tc(tmp_path / "d.jsonl", tmp_path / "o"), **QUIET)


def test_an_unknown_label_in_the_held_out_data_is_a_clear_error(data, tmp_path):
    _write(tmp_path / "eval.jsonl", [{"text": "apple", "label": "fruit"}, {"text": "car", "label": "vehicle"}])
    with pytest.raises(ValueError, match=r"eval.jsonl line 2: label 'vehicle' is not one of the 2 labels of the model \('fruit', 'tool'\)"):
        train(_tc(data, tmp_path / "o", task_options={"eval_data": str(tmp_path / "eval.jsonl")}), **QUIET)
    _write(tmp_path / "eval.jsonl", [{"text": "apple", "label": "fruit"}, {"text": "saw", "label": "tool"}])
    s = train(_tc(data, tmp_path / "o", task_options={"eval_data": str(tmp_path / "eval.jsonl")}, steps=1), **QUIET)
    assert s["eval"]["eval_accuracy"] in (0.0, 0.5, 1.0)


@pytest.mark.parametrize("kw,message", [
    (dict(task_options={"pooling": "max"}), "pooling must be one of auto, cls, mean, last, got 'max'"),
    (dict(task_options={"heads": 2}), "task classify has no option 'heads'"),
    (dict(data=["/nonexistent/d.jsonl"]), "does not exist"),
    (dict(data=["a.jsonl", "b.jsonl"]), "reads one JSON-lines file, got 2 paths"),
])
def test_bad_settings_are_clear_errors_before_any_work(data, tmp_path, kw, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        train(_tc(data, tmp_path / "o", **kw), **QUIET)
    assert not (tmp_path / "o").exists()


def test_init_from_a_fastlm_checkpoint_and_hugging_face_gpt2_and_bert_directories(data, tmp_path):
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    (tmp_path / "a.py").write_text((stdlib / "textwrap.py").read_text())
    train(TrainConfig(data=[str(tmp_path / "a.py")], model=dict(MODEL), steps=1, batch_size=2, seq_len=32, vocab_size=300,
                      eval_interval=0, out=str(tmp_path / "lm"), progress=False, backend="torch", device="cpu"), **QUIET)
    lm = load_model(tmp_path / "lm")
    task = _task(_tc(data, tmp_path / "o", init_from=str(tmp_path / "lm"), model={}))
    assert all(torch.equal(v, task.model.backbone.state_dict()[k]) for k, v in lm.state_dict().items())
    assert task.tokenizer.tk.to_str() == load_task(tmp_path / "lm")[0].tokenizer.tk.to_str()
    with pytest.raises(ValueError, match="with --init-from the model is the one in"):
        _task(_tc(data, tmp_path / "o", init_from=str(tmp_path / "lm")))

    transformers = pytest.importorskip("transformers", reason="the Hugging Face directory is written by transformers")
    cfg = transformers.GPT2Config(vocab_size=lm.config.vocab_size, n_positions=48, n_embd=64, n_layer=2, n_head=4)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(cfg)
    hf.save_pretrained(tmp_path / "hf")
    task.tokenizer.save(tmp_path / "hf")
    task = _task(_tc(data, tmp_path / "o2", init_from=str(tmp_path / "hf"), model={}))
    ref = GPT.from_pretrained(tmp_path / "hf")
    assert all(torch.equal(v, task.model.backbone.state_dict()[k]) for k, v in ref.state_dict().items())
    s = train(_tc(data, tmp_path / "o3", init_from=str(tmp_path / "hf"), model={}, steps=2), **QUIET)
    assert "eval_accuracy" in s["eval"]
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *" ".join(WORDS.values()).split()]
    bert = transformers.BertForMaskedLM(transformers.BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2,
                                                               num_attention_heads=2, intermediate_size=128, max_position_embeddings=48))
    bert.save_pretrained(tmp_path / "bert")
    (tmp_path / "bert" / "vocab.txt").write_text("\n".join(words) + "\n")
    task = _task(_tc(data, tmp_path / "o4", init_from=str(tmp_path / "bert"), model={}))
    ref = GPT.from_pretrained(tmp_path / "bert")
    assert all(torch.equal(v, task.model.backbone.state_dict()[k]) for k, v in ref.state_dict().items())
    assert task.pooling == "cls" and all(x[0] == 2 and x[-1] == 3 and 1 not in x for x in task.train_x)  # [CLS] text [SEP]
    (tmp_path / "roberta").mkdir()
    (tmp_path / "roberta" / "config.json").write_text(json.dumps({"model_type": "roberta"}))
    with pytest.raises(ValueError, match=r"a Hugging Face 'roberta' model; fastlm reads GPT-2 and BERT directories \(model_type gpt2 or bert\)"):
        _task(_tc(data, tmp_path / "o5", init_from=str(tmp_path / "roberta"), model={}))


def test_builtin_docstring_vs_code_is_learned_far_above_chance(tmp_path):
    """The built-in set (the standard library's docstrings against code): held-out accuracy far
    above chance (0.5 on the balanced two labels)."""
    s = train(_tc(None, tmp_path, model=dict(n_layer=2, n_head=4, n_embd=64, block_size=64), steps=30, batch_size=16,
                  lr=2e-3, warmup=3, eval_interval=30, eval_iters=8, vocab_size=None, val_fraction=0.05), **QUIET)
    task, _ = load_task(tmp_path)
    assert task.labels == ["code", "docstring"]
    assert s["eval"]["eval_accuracy"] > 0.85, s["eval"]
