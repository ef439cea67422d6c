"""``--task sft``: instruction fine-tuning of the causal GPT on prompt/response pairs.

Data: JSON lines ``{"prompt": str, "response": str}`` (--data FILE). Each pair becomes one
sequence, template(prompt) + response + end-of-text, where the template (``--task-set
template=...``, holding ``{instruction}`` once) is stored with the checkpoint, and
``fastlm generate --checkpoint DIR --instruction TEXT`` applies it. The loss is the next-token
cross-entropy on the response tokens and the end-of-text token only (the prompt's targets are
-100). A batch is packed: the sequences one after another with cu_seqlens, so attention never
crosses from one pair into another (fastlm.ops.attention_varlen) and nothing is spent on padding.
Without --data the built-in set is made from this Python's standard library: "What does
module.name do?" answered by the first paragraph of its docstring. Held out: ``eval_data`` or a
val_fraction split; eval_loss and eval_accuracy (the response tokens predicted exactly, greedy,
teacher-forced) on up to eval_iters x batch_size pairs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from fastlm import data as fdata
from fastlm.tasks import Task, register
from fastlm.tasks.classify import _one_file, builtin_data_file, init_backbone, stdlib_definitions
from fastlm.tasks.lm import check_gpt_settings, gpt_from_config, new_gpt

TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"


def apply_template(template: str, instruction: str) -> str:
    """The template with ``{instruction}`` replaced (no other brace is interpreted)."""
    return template.replace("{instruction}", instruction)


def builtin_pairs(limit: int = 1500) -> list[dict]:
    pairs = []
    for module, name, doc, _ in stdlib_definitions(limit):
        answer = doc.split("\n\n")[0].replace("\n", " ").strip()
        if 10 <= len(answer) <= 300:
            pairs.append({"prompt": f"What does {module}.{name} do?", "response": answer})
    if len(pairs) < 20:
        raise ValueError("the built-in instruction set needs the standard library's sources; too few were found: pass --data FILE")
    return pairs


def _pair_texts(path) -> str:
    return "\n".join(apply_template(TEMPLATE, r["prompt"]) + r["response"]
                     for r in fdata.read_jsonl(path, {"prompt": str, "response": str}))


@register
class SFTTask(Task):
    name = "sft"

    @dataclasses.dataclass
    class Options:
        template: str = TEMPLATE  # the prompt template; {instruction} marks where the prompt goes
        eval_data: str = ""  # a held-out JSON-lines file (default: a val_fraction split of --data)

        def __post_init__(self):
            if not isinstance(self.template, str) or self.template.count("{instruction}") != 1:
                raise ValueError(f"template must hold {{instruction}} exactly once, got {self.template!r}")
            if not isinstance(self.eval_data, str):
                raise ValueError(f"eval_data must be a path, got {self.eval_data!r}")

    def check(self, tc) -> None:
        if tc.init_from is None:
            check_gpt_settings(tc)
            if not tc.model.get("causal", True):
                raise ValueError("--task sft trains a generator: --set causal=false contradicts it")
        path = _one_file(tc, self.name)
        if path is not None and not path.exists():
            raise FileNotFoundError(f"data file {str(path)!r} does not exist")

    def _train_file(self, tc) -> Path:
        return _one_file(tc, self.name) or builtin_data_file("sft", builtin_pairs)

    def _records(self, path):
        return fdata.read_jsonl(path, {"prompt": str, "response": str})

    def new_model(self, tc, log):
        from fastlm.models.gpt import PRESETS
        from fastlm.tokenizer import Tokenizer, train_or_load_cached

        path = self._train_file(tc)
        self._all = self._records(path)
        if tc.init_from:
            model, self.tokenizer = init_backbone(tc.init_from, tc)
            if not model.config.causal:
                raise ValueError(f"--init-from {tc.init_from}: a bidirectional model (causal=False) cannot generate; sft needs a causal one")
            return model
        self.tokenizer = Tokenizer.load(tc.tokenizer) if tc.tokenizer else train_or_load_cached(
            [path], tc.vocab_size or min(2048, PRESETS[tc.preset]["vocab_size"]), _pair_texts)
        return new_gpt(tc, self.tokenizer)

    def state(self) -> dict:
        return {"template": self.options.template}

    def model_from_checkpoint(self, config, state):
        model = gpt_from_config(config)
        if not model.config.causal:
            raise ValueError("an sft model is causal, config.json says causal=false")
        return model

    def prompt_ids(self, instruction: str) -> list[int]:
        return self.tokenizer.encode(apply_template(self.options.template, instruction))

    def encode(self, records, path) -> list[tuple[list[int], int]]:
        """(ids, prompt length) per pair: template(prompt) + response + end-of-text, cut to the context."""
        eos = self.tokenizer.eos_id
        T = self.model.config.block_size
        out = []
        prompts = self.tokenizer.encode_batch([apply_template(self.options.template, r["prompt"]) for r in records])
        responses = self.tokenizer.encode_batch([r["response"] for r in records])
        for r, p, a in zip(records, prompts, responses, strict=True):
            if len(p) >= T:
                raise ValueError(f"{path} line {r['_line']}: the templated prompt is {len(p)} tokens, leaving no room for "
                                 f"the response in the model's context of {T} tokens")
            out.append(([*p, *a, eos][:T], len(p)))
        return out

    def load_data(self, tc, log) -> str:
        if self.tokenizer.eos_id is None:
            raise ValueError("the tokenizer has no end-of-text token (<|endoftext|>), which ends every response")
        path = self._train_file(tc)
        records = getattr(self, "_all", None) or self._records(path)
        if self.options.eval_data:
            val_path = Path(self.options.eval_data)
            train_recs, val_recs = records, self._records(val_path)
        else:
            tr, va = fdata.split_examples(len(records), tc.val_fraction, tc.seed, f"pairs in {path}")
            train_recs, val_recs, val_path = [records[i] for i in tr], [records[i] for i in va], path
        self.train_seqs = self.encode(train_recs, path)
        self.val_seqs = self.encode(val_recs, val_path)
        self.order = fdata.ExampleOrder(len(self.train_seqs), tc.seed)
        self.seq_len = self.model.config.block_size
        return f"{path}: {len(self.train_seqs):,} train / {len(self.val_seqs):,} held-out pairs"

    @staticmethod
    def _batch(seqs):
        """Packed ids (1, T), cu_seqlens, max_seqlen and next-token targets (1, T): -100 on the
        prompt and on each sequence's last token (no target crosses into the next pair)."""
        idx, cu, longest = fdata.pack([s for s, _ in seqs])
        targets = torch.full_like(idx, -100)
        start = 0
        for ids, p in seqs:
            L = len(ids)
            t = torch.tensor(ids[1:])
            keep = torch.arange(1, L) >= p
            targets[0, start : start + L - 1] = torch.where(keep, t, torch.full_like(t, -100))
            start += L
        return {"idx": idx, "cu_seqlens": cu, "max_seqlen": longest, "targets": targets}

    def batch(self, position, n):
        return self._batch([self.train_seqs[i] for i in self.order.indices(position, n)])

    def loss(self, model, batch):
        return model(batch["idx"], batch["targets"], cu_seqlens=batch["cu_seqlens"], max_seqlen=batch["max_seqlen"])[1]

    def tokens(self, batch) -> int:
        return batch["idx"].numel()

    @torch.no_grad()
    def evaluate(self, model, batch_size, iters, device, autocast) -> dict:
        was = model.training
        model.eval()
        n = min(len(self.val_seqs), batch_size * iters)
        loss_sum, correct, count = 0.0, 0, 0
        for i in range(0, n, batch_size):
            b = self.to_device(self._batch(self.val_seqs[i : min(n, i + batch_size)]), device)
            with autocast:
                logits = model(b["idx"], cu_seqlens=b["cu_seqlens"], max_seqlen=b["max_seqlen"]).float()
            keep = b["targets"] != -100
            loss_sum += float(torch.nn.functional.cross_entropy(logits[keep], b["targets"][keep], reduction="sum"))
            correct += int((logits.argmax(-1)[keep] == b["targets"][keep]).sum())
            count += int(keep.sum())
        model.train(was)
        return {"eval_loss": loss_sum / count, "eval_accuracy": correct / count}

    def describe_eval(self, m: dict) -> str:
        return f"held-out response loss {m['eval_loss']:.3f}, token accuracy {m['eval_accuracy']:.3f}"
