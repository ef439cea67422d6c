"""``--task lm`` (the default): next-token prediction of the GPT on a text corpus.

Windows of seq_len + 1 tokens from the token stream (fastlm.data.Batches: an order that is a
function of (seed, position)); the loss is the mean next-token cross-entropy; held out: the last
val_fraction of the stream, reported as eval_loss and eval_ppl.
"""

from __future__ import annotations

import math

import torch

from fastlm import data as fdata
from fastlm.tasks import Task, register


def check_gpt_settings(tc) -> None:
    """The GPT a new run would build from --preset / --set is valid and within limits, and
    --seq-len fits its context (before any data is read)."""
    from fastlm.models.gpt import PRESETS, GPTConfig, check_limits

    if tc.preset not in PRESETS:
        raise ValueError(f"unknown GPT preset {tc.preset!r}; presets: {', '.join(PRESETS)}")
    try:
        cfg = GPTConfig.from_preset(tc.preset, **{"vocab_size": tc.vocab_size or PRESETS[tc.preset]["vocab_size"], **tc.model})
        check_limits(cfg)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"--set: {exc}") from None
    if tc.seq_len and tc.seq_len > cfg.block_size:
        raise ValueError(f"--seq-len {tc.seq_len} is longer than the model's context (block_size {cfg.block_size}); "
                         f"a longer context is --set block_size={tc.seq_len}")


def corpus_tokenizer(tc, files):
    """--tokenizer, else the byte-level BPE of ``files`` at --vocab-size (default the preset's), cached."""
    from fastlm.models.gpt import PRESETS
    from fastlm.tokenizer import Tokenizer, train_or_load_cached

    if tc.tokenizer:
        return Tokenizer.load(tc.tokenizer)
    return train_or_load_cached(files, tc.vocab_size or PRESETS[tc.preset]["vocab_size"], fdata.read_text)


def new_gpt(tc, tokenizer, **overrides):
    """The GPT of --preset / --set with the tokenizer's vocabulary (``overrides`` win over both)."""
    from fastlm.models.gpt import GPT, GPTConfig

    cfg = GPTConfig.from_preset(tc.preset, **{"vocab_size": tokenizer.vocab_size, **tc.model, **overrides})
    if cfg.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"--set vocab_size={cfg.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} tokens")
    return GPT(cfg)


def gpt_from_config(config: dict):
    """The GPT of a checkpoint's config.json (model_type and version keys ignored)."""
    from fastlm.models.gpt import GPT, GPTConfig, check_limits

    cfg = GPTConfig.from_dict({k: v for k, v in config.items() if k not in ("model_type", "fastlm_version")})
    check_limits(cfg)
    return GPT(cfg)


class WindowTask(Task):
    """What the corpus-window tasks (lm, mlm) share: batches (x, y) of seq_len tokens, the GPT's own loss."""

    def loss(self, model, batch):
        x, y = batch
        return model(x, y)[1]

    def tokens(self, batch) -> int:
        return batch[0].numel()

    def flops_per_token(self, model) -> float:
        return model.flops_per_token(self.seq_len)


@register
class LMTask(WindowTask):
    name = "lm"

    def check(self, tc) -> None:
        check_gpt_settings(tc)

    def new_model(self, tc, log):
        self.files = fdata.find_files(tc.data)
        self.tokenizer = corpus_tokenizer(tc, self.files)
        return new_gpt(tc, self.tokenizer)

    def model_from_checkpoint(self, config, state):
        return gpt_from_config(config)

    def load_data(self, tc, log) -> str:
        cfg = self.model.config
        if not cfg.causal:
            raise ValueError("fastlm train is next-token prediction and needs a causal model (causal=True)")
        T = self.seq_len = tc.seq_len or cfg.block_size
        if T > cfg.block_size:
            raise ValueError(f"--seq-len {T} is longer than the model's context (block_size {cfg.block_size}); "
                             f"a longer context is --set block_size={T} (for a new run)")
        files = getattr(self, "files", None) or fdata.find_files(tc.data)
        tokens = fdata.tokenize(files, self.tokenizer)
        self.train_tokens, self.val_tokens = fdata.split(tokens, T, tc.val_fraction)
        self.batches = fdata.Batches(self.train_tokens, T, tc.seed)
        return f"{len(files)} files, {self.train_tokens.numel():,} train / {self.val_tokens.numel():,} held-out tokens"

    def batch(self, position, n):
        return self.batches.get(position, n)

    @torch.no_grad()
    def evaluate(self, model, batch_size, iters, device, autocast) -> dict:
        was = model.training
        model.eval()
        losses = []
        for x, y in fdata.eval_batches(self.val_tokens, self.seq_len, batch_size, iters):
            with autocast:
                _, loss = model(x.to(device), y.to(device))
            losses.append(float(loss))
        model.train(was)
        loss = sum(losses) / len(losses)
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50))}

    def describe_eval(self, m: dict) -> str:
        return f"held-out loss {m['eval_loss']:.3f}, perplexity {m['eval_ppl']:.1f}"
