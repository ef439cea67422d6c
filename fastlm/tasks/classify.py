"""``--task classify``: sequence classification, a linear head on a pooled representation.

Data: JSON lines ``{"text": str, "label": str | int}`` (--data FILE); the label set is the sorted
set of the training labels (all strings or all integers), stored in the checkpoint's task.json.
Held out: ``--task-set eval_data=FILE`` or a ``val_fraction`` split of the data (a permutation from
the seed); a held-out (or resumed) label outside the label set is a ValueError naming the line.
Without --data the built-in set is made from this Python's standard library: the docstrings of its
functions and classes (label "docstring") against their code with the docstring removed (label
"code"), written once to fastlm's cache directory.

Model: ``Classifier`` = a GPT backbone (new, or --init-from a fastlm checkpoint or a local Hugging
Face GPT-2 or BERT directory: BERT is read as a post-norm GPT, ``GPT.from_pretrained``) + ``head``
(Linear n_embd -> number of labels) on the pooled final hidden states: ``cls`` (an end-of-text
token put before the text, read at position 0; bidirectional models only), ``mean`` (over the
text's tokens) or ``last`` (the end-of-text token appended after the text; for causal models).
A tokenizer with [CLS] and [SEP] (BERT's) frames every text as Hugging Face's does for one text,
``[CLS] text [SEP]`` (what a BERT backbone was trained on), and the pooling reads [CLS], the mean
of all, or [SEP]. A batch is packed (cu_seqlens: every text attends only to itself, no padding),
so the result for a text never depends on the others in its batch.
eval_loss and eval_accuracy on up to eval_iters x batch_size held-out texts (the same ones every time).
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import inspect
import json
import os
import sys
import sysconfig
import tempfile
import textwrap
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastlm import data as fdata
from fastlm.tasks import Task, register
from fastlm.tasks.lm import check_gpt_settings, gpt_from_config, new_gpt

POOLINGS = ("auto", "cls", "mean", "last")


class Classifier(nn.Module):
    """logits (B, num_labels) = head(pool(backbone.hidden_states(packed texts)))."""

    def __init__(self, backbone, num_labels: int, pooling: str):
        super().__init__()
        if pooling not in ("cls", "mean", "last"):
            raise ValueError(f"pooling must be cls, mean or last, got {pooling!r}")
        if pooling == "cls" and backbone.config.causal:
            raise ValueError("pooling cls reads the first token, which sees nothing else in a causal model: use last or mean")
        self.backbone, self.pooling, self.config = backbone, pooling, backbone.config
        self.head = nn.Linear(backbone.config.n_embd, num_labels)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def num_params(self) -> int:
        return self.backbone.num_params() + sum(p.numel() for p in self.head.parameters())

    def forward(self, idx, cu_seqlens, max_seqlen=None):
        """idx (1, T) packed texts, cu_seqlens (B + 1,) int32: logits (B, num_labels)."""
        h = self.backbone.hidden_states(idx, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)[0]  # (T, C)
        starts, ends = cu_seqlens[:-1].long(), cu_seqlens[1:].long()
        if self.pooling == "cls":
            pooled = h[starts]
        elif self.pooling == "last":
            pooled = h[ends - 1]
        else:
            seq = torch.repeat_interleave(torch.arange(len(starts), device=h.device), ends - starts)
            pooled = torch.zeros(len(starts), h.shape[1], device=h.device, dtype=h.dtype).index_add_(0, seq, h)
            pooled = pooled / (ends - starts).clamp_min(1)[:, None].to(h.dtype)
        return self.head(pooled)


def _clip(text: str, limit: int = 600) -> str:
    return text if len(text) <= limit else text[:limit].rsplit(None, 1)[0]


def stdlib_definitions(limit: int):
    """Up to ``limit`` (module, name, docstring, code without the docstring) of functions and
    classes of the standard library, in a fixed order (every fifth file, then others)."""
    files = fdata.default_corpus()
    root = Path(sysconfig.get_paths()["stdlib"])
    found = 0
    for path in files[::5] + files[2::5]:
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue
        lines = source.splitlines()
        module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            doc = ast.get_docstring(node)
            if not doc or len(node.body) < 2 or len(doc) < 40:
                continue
            code = textwrap.dedent("\n".join(lines[node.body[1].lineno - 1 : node.body[-1].end_lineno])).strip()
            if len(code) < 40:
                continue
            yield module, node.name, inspect.cleandoc(doc), code
            found += 1
            if found >= limit:
                return


def builtin_examples(per_label: int = 1500) -> list[dict]:
    """Docstrings vs code from the standard library's functions and classes, balanced, in a fixed order."""
    out = []
    for _, _, doc, code in stdlib_definitions(per_label):
        out += [{"text": _clip(doc), "label": "docstring"}, {"text": _clip(code), "label": "code"}]
    if len(out) < 40:
        raise ValueError("the built-in classification set needs the standard library's sources; too few were found: pass --data FILE")
    return out


def builtin_data_file(name: str, make) -> Path:
    """``make()``'s records as a JSON-lines file in fastlm's cache, written once per Python installation."""
    from fastlm.tokenizer import cache_dir

    key = hashlib.sha256(f"{name}-v1-{sys.version}-{sysconfig.get_paths()['stdlib']}".encode()).hexdigest()[:16]
    path = cache_dir() / "data" / f"{name}-{key}.jsonl"
    if path.is_file():
        return path
    records = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    os.replace(tmp, path)
    return path


def _one_file(tc, what: str) -> Path | None:
    if not tc.data:
        return None
    if len(tc.data) != 1:
        raise ValueError(f"--data: task {what} reads one JSON-lines file, got {len(tc.data)} paths")
    return Path(tc.data[0])


def init_backbone(path, tc):
    """(GPT, tokenizer) from --init-from: a fastlm checkpoint (lm, mlm, sft: the GPT; classify: its
    backbone) or a local Hugging Face GPT-2 or BERT directory (config.json with model_type gpt2 or
    bert, and its tokenizer files)."""
    from fastlm.models.gpt import GPT
    from fastlm.tokenizer import Tokenizer
    from fastlm.training import find_checkpoint, load_task_model

    path = Path(path)
    if tc.model:
        raise ValueError("--set shapes a new model; with --init-from the model is the one in "
                         f"{path} (leave --set out)")
    if not path.exists():
        raise FileNotFoundError(f"--init-from {path} does not exist")
    ckpt = find_checkpoint(path)
    if ckpt is not None and (ckpt / "SHA256SUMS").exists():
        task, model = load_task_model(ckpt)
        if isinstance(model, Classifier):
            model = model.backbone
        if not isinstance(model, GPT) or task.tokenizer is None:
            raise ValueError(f"--init-from {path}: a {task.name} checkpoint holds no GPT with a tokenizer")
        return model, task.tokenizer
    try:
        hf = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"--init-from {path}: neither a fastlm checkpoint nor a Hugging Face directory with a "
                         f"readable config.json ({exc})") from None
    if not isinstance(hf, dict) or hf.get("model_type") not in ("gpt2", "bert"):
        kind = hf.get("model_type") if isinstance(hf, dict) else None
        raise ValueError(f"--init-from {path}: a Hugging Face {kind!r} model; fastlm reads GPT-2 and BERT directories "
                         f"(model_type gpt2 or bert) and fastlm checkpoints")
    return GPT.from_pretrained(path), Tokenizer.load(path)


@register
class ClassifyTask(Task):
    name = "classify"

    @dataclasses.dataclass
    class Options:
        pooling: str = "auto"  # cls | mean | last | auto (last for a causal backbone, cls for a bidirectional one)
        eval_data: str = ""  # a held-out JSON-lines file (default: a val_fraction split of --data)

        def __post_init__(self):
            if self.pooling not in POOLINGS:
                raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
            if not isinstance(self.eval_data, str):
                raise ValueError(f"eval_data must be a path, got {self.eval_data!r}")

    labels: list = []

    def check(self, tc) -> None:
        if tc.init_from is None:
            check_gpt_settings(tc)
        path = _one_file(tc, self.name)
        if path is not None and not path.exists():
            raise FileNotFoundError(f"data file {str(path)!r} does not exist")

    def _records(self, path: Path):
        return fdata.read_jsonl(path, {"text": str, "label": (str, int)})

    def _train_file(self, tc) -> Path:
        return _one_file(tc, self.name) or builtin_data_file("classify", builtin_examples)

    def new_model(self, tc, log):
        from fastlm.tokenizer import train_or_load_cached

        path = self._train_file(tc)
        self._all = self._records(path)
        kinds = {type(r["label"]) for r in self._all}
        if len(kinds) > 1:
            first = {t: next(r for r in self._all if type(r["label"]) is t) for t in kinds}
            raise ValueError(f"{path}: labels must be all strings or all integers; line {first[str]['_line']} has "
                             f"{first[str]['label']!r}, line {first[int]['_line']} has {first[int]['label']!r}")
        self.labels = sorted({r["label"] for r in self._all})
        if len(self.labels) < 2:
            raise ValueError(f"{path}: a classifier needs at least 2 labels, the data has only {self.labels!r}")
        if tc.init_from:
            backbone, self.tokenizer = init_backbone(tc.init_from, tc)
        else:
            from fastlm.models.gpt import PRESETS
            from fastlm.tokenizer import Tokenizer

            self.tokenizer = Tokenizer.load(tc.tokenizer) if tc.tokenizer else train_or_load_cached(
                [path], tc.vocab_size or min(2048, PRESETS[tc.preset]["vocab_size"]), _texts_of)
            backbone = new_gpt(tc, self.tokenizer)
        if self.tokenizer.eos_id is None:
            raise ValueError("the tokenizer has no end-of-text token (<|endoftext|>, or [SEP]), which marks the pooled position")
        self.pooling = self._pooling(backbone.config.causal)
        return Classifier(backbone, len(self.labels), self.pooling)

    def _pooling(self, causal: bool) -> str:
        p = self.options.pooling
        return ("last" if causal else "cls") if p == "auto" else p

    def state(self) -> dict:
        return {"labels": list(self.labels), "pooling": self.pooling}

    def model_config(self, model) -> dict:
        import fastlm

        return {"model_type": "fastlm-classifier", "fastlm_version": fastlm.__version__, "backbone": model.config.to_dict(),
                "num_labels": model.head.out_features, "pooling": model.pooling}

    def model_from_checkpoint(self, config, state):
        labels = state.get("labels")
        if not isinstance(labels, list) or len(labels) != config.get("num_labels") or len(set(map(repr, labels))) != len(labels):
            raise ValueError(f"task.json's labels {labels!r} do not match config.json's num_labels {config.get('num_labels')!r}")
        self.labels, self.pooling = labels, config.get("pooling")
        return Classifier(gpt_from_config(config["backbone"]), len(labels), self.pooling)

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text as the model reads it, truncated to the context: ``[CLS] text [SEP]``
        with a tokenizer that has both (BERT's, every pooling); else the end-of-text token first (cls)
        or last (last)."""
        T = self.model.config.block_size
        eos, cls, sep = self.tokenizer.eos_id, self.tokenizer.cls_id, self.tokenizer.sep_id
        out = []
        for ids in self.tokenizer.encode_batch(list(texts)):
            if cls is not None and sep is not None:
                ids = [cls, *ids[: T - 2], sep] if T >= 2 else [cls]
            elif self.pooling == "cls":
                ids = [eos, *ids[: T - 1]]
            elif self.pooling == "last":
                ids = [*ids[: T - 1], eos]
            else:
                ids = ids[:T] or [eos]
            out.append(ids)
        return out

    def _label_ids(self, records, path) -> list[int]:
        index = {lab: i for i, lab in enumerate(self.labels)}
        out = []
        for r in records:
            if r["label"] not in index or type(r["label"]) is not type(self.labels[0]):
                raise ValueError(f"{path} line {r['_line']}: label {r['label']!r} is not one of the {len(self.labels)} labels "
                                 f"of the model ({', '.join(map(repr, self.labels[:10]))})")
            out.append(index[r["label"]])
        return out

    def load_data(self, tc, log) -> str:
        path = self._train_file(tc)
        records = getattr(self, "_all", None) or self._records(path)
        if self.options.eval_data:
            train_recs, val_recs, val_path = records, self._records(Path(self.options.eval_data)), self.options.eval_data
        else:
            tr, va = fdata.split_examples(len(records), tc.val_fraction, tc.seed, f"records in {path}")
            train_recs, val_recs, val_path = [records[i] for i in tr], [records[i] for i in va], path
        self.train_y = self._label_ids(train_recs, path)
        self.val_y = self._label_ids(val_recs, val_path)
        self.train_x = self.encode([r["text"] for r in train_recs])
        self.val_x = self.encode([r["text"] for r in val_recs])
        self.order = fdata.ExampleOrder(len(self.train_x), tc.seed)
        self.seq_len = self.model.config.block_size
        return (f"{path}: {len(self.train_x):,} train / {len(self.val_x):,} held-out texts, {len(self.labels)} labels, "
                f"pooling {self.pooling}")

    def _batch(self, xs, ys):
        idx, cu, longest = fdata.pack(xs)
        return {"idx": idx, "cu_seqlens": cu, "max_seqlen": longest, "labels": torch.tensor(ys)}

    def batch(self, position, n):
        ids = self.order.indices(position, n)
        return self._batch([self.train_x[i] for i in ids], [self.train_y[i] for i in ids])

    def loss(self, model, batch):
        logits = model(batch["idx"], batch["cu_seqlens"], batch["max_seqlen"])
        return F.cross_entropy(logits.float(), batch["labels"])

    def tokens(self, batch) -> int:
        return batch["idx"].numel()

    @torch.no_grad()
    def evaluate(self, model, batch_size, iters, device, autocast) -> dict:
        was = model.training
        model.eval()
        n = min(len(self.val_x), batch_size * iters)
        loss_sum, correct = 0.0, 0
        for i in range(0, n, batch_size):
            b = self.to_device(self._batch(self.val_x[i : min(n, i + batch_size)], self.val_y[i : min(n, i + batch_size)]), device)
            with autocast:
                logits = model(b["idx"], b["cu_seqlens"], b["max_seqlen"]).float()
            loss_sum += float(F.cross_entropy(logits, b["labels"], reduction="sum"))
            correct += int((logits.argmax(-1) == b["labels"]).sum())
        model.train(was)
        return {"eval_loss": loss_sum / n, "eval_accuracy": correct / n}

    def describe_eval(self, m: dict) -> str:
        return f"held-out loss {m['eval_loss']:.3f}, accuracy {m['eval_accuracy']:.3f}"

    @torch.no_grad()
    def predict(self, model, texts: list[str], device=None) -> list[dict]:
        """For each text {"label": the most probable label, "probabilities": {label: p}}."""
        device = device or next(model.parameters()).device
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("classify: expected one or more texts (strings)")
        was = model.training
        model.eval()
        idx, cu, longest = fdata.pack(self.encode(texts))
        probs = model(idx.to(device), cu.to(device), longest).float().softmax(-1).cpu()
        model.train(was)
        return [{"label": self.labels[int(p.argmax())], "probabilities": {lab: float(p[i]) for i, lab in enumerate(self.labels)}}
                for p in probs]


def _texts_of(path) -> str:
    return "\n".join(r["text"] for r in fdata.read_jsonl(path, {"text": str}))
