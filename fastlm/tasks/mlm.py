"""``--task mlm``: masked-language-model pretraining of the bidirectional GPT (BERT's objective).

Windows of seq_len tokens from the corpus (default: the Python standard library, as for lm), on a
GPT with ``causal=False`` and, unless ``--set positions=`` says otherwise, rotary positions: with
learned absolute positions a small encoder sits for hundreds of steps on the unigram plateau
(predicting the most frequent tokens whatever the context), with rotary ones it reads its
neighbours within the first hundred (measured on the tiny preset). In each window every token is chosen with probability ``mask_prob``
(at least one per window); a chosen token is replaced by ``<|mask|>`` with probability
``mask_token_prob``, by a uniformly random ordinary token with probability ``random_token_prob``,
and kept otherwise (BERT's 80/10/10). The loss is the cross-entropy of the original token at the
chosen positions only. The masking of training window p is drawn from a generator seeded by
(seed, p), so a resumed run masks exactly as one run would; held-out windows are masked from a
fixed seed, so every evaluation scores the same positions: eval_loss and eval_accuracy (the
fraction of chosen tokens predicted exactly).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from fastlm import data as fdata
from fastlm.tasks import register
from fastlm.tasks.lm import WindowTask, check_gpt_settings, corpus_tokenizer, gpt_from_config, new_gpt

MASK = "<|mask|>"


def mask_tokens(x: torch.Tensor, mask_id: int, n_random: int, generator: torch.Generator, mask_prob: float = 0.15,
                mask_token_prob: float = 0.8, random_token_prob: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) for token windows x (B, T): targets hold x at the chosen positions and
    -100 elsewhere; inputs hold mask_id / a random id in [0, n_random) / the token at the chosen
    positions (probabilities mask_token_prob / random_token_prob / the rest), x elsewhere. Every
    window has at least one chosen position. Draws only from ``generator``."""
    B, T = x.shape
    chosen = torch.rand(B, T, generator=generator) < mask_prob
    force = torch.randint(T, (B,), generator=generator)
    chosen[torch.arange(B), force] |= ~chosen.any(dim=1)
    r = torch.rand(B, T, generator=generator)
    random_ids = torch.randint(n_random, (B, T), generator=generator)
    inputs = torch.where(chosen & (r < mask_token_prob), torch.full_like(x, mask_id), x)
    inputs = torch.where(chosen & (r >= mask_token_prob) & (r < mask_token_prob + random_token_prob), random_ids, inputs)
    targets = torch.where(chosen, x, torch.full_like(x, -100))
    return inputs, targets


def with_mask_token(tokenizer):
    """The tokenizer with ``<|mask|>`` added as a special token (kept if already there)."""
    if tokenizer.tk.token_to_id(MASK) is None:
        tokenizer.tk.add_special_tokens([MASK])
    return tokenizer


@register
class MLMTask(WindowTask):
    name = "mlm"

    @dataclasses.dataclass
    class Options:
        mask_prob: float = 0.15  # the fraction of tokens chosen for prediction
        mask_token_prob: float = 0.8  # of the chosen: replaced by <|mask|>
        random_token_prob: float = 0.1  # of the chosen: replaced by a random token (the rest are kept)

        def __post_init__(self):
            num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            if not (num(self.mask_prob) and 0 < self.mask_prob <= 1):
                raise ValueError(f"mask_prob must lie in (0, 1], got {self.mask_prob!r}")
            for name in ("mask_token_prob", "random_token_prob"):
                v = getattr(self, name)
                if not (num(v) and 0 <= v <= 1):
                    raise ValueError(f"{name} must lie in [0, 1], got {v!r}")
            if self.mask_token_prob + self.random_token_prob > 1:
                raise ValueError(f"mask_token_prob + random_token_prob must be at most 1, got "
                                 f"{self.mask_token_prob} + {self.random_token_prob}")

    def check(self, tc) -> None:
        if tc.init_from:
            raise ValueError("--init-from: task mlm pretrains from scratch; it takes no initial weights")
        if tc.model.get("causal", False):
            raise ValueError("--task mlm trains a bidirectional encoder: --set causal=true contradicts it")
        check_gpt_settings(tc)

    def new_model(self, tc, log):
        self.files = fdata.find_files(tc.data)
        self.tokenizer = with_mask_token(corpus_tokenizer(tc, self.files))
        return new_gpt(tc, self.tokenizer, causal=False, **({} if "positions" in tc.model else {"positions": "rotary"}))

    def model_from_checkpoint(self, config, state):
        model = gpt_from_config(config)
        if model.config.causal:
            raise ValueError("an mlm model is bidirectional (causal=False), config.json says causal=true")
        return model

    @property
    def mask_id(self) -> int:
        return self.tokenizer.tk.token_to_id(MASK)

    def load_data(self, tc, log) -> str:
        cfg = self.model.config
        if self.tokenizer.tk.token_to_id(MASK) is None:
            raise ValueError(f"the tokenizer has no {MASK} token")
        T = self.seq_len = tc.seq_len or cfg.block_size
        if T > cfg.block_size:
            raise ValueError(f"--seq-len {T} is longer than the model's context (block_size {cfg.block_size})")
        files = getattr(self, "files", None) or fdata.find_files(tc.data)
        tokens = fdata.tokenize(files, self.tokenizer)
        self.train_tokens, self.val_tokens = fdata.split(tokens, T, tc.val_fraction)
        self.batches = fdata.Batches(self.train_tokens, T, tc.seed)
        self.seed = tc.seed
        return f"{len(files)} files, {self.train_tokens.numel():,} train / {self.val_tokens.numel():,} held-out tokens"

    def _mask(self, x, generator):
        o = self.options
        return mask_tokens(x, self.mask_id, self.mask_id, generator, o.mask_prob, o.mask_token_prob, o.random_token_prob)

    def batch(self, position, n):
        x, _ = self.batches.get(position, n)
        return self._mask(x, torch.Generator().manual_seed(self.seed * 1_000_003 + position))

    @torch.no_grad()
    def evaluate(self, model, batch_size, iters, device, autocast) -> dict:
        was = model.training
        model.eval()
        g = torch.Generator().manual_seed(0)
        loss_sum, correct, n = 0.0, 0, 0
        for x, _ in fdata.eval_batches(self.val_tokens, self.seq_len, batch_size, iters):
            inputs, targets = self._mask(x, g)
            targets = targets.to(device)
            with autocast:
                logits = model(inputs.to(device))
            chosen = targets != -100
            loss_sum += float(F.cross_entropy(logits.float()[chosen], targets[chosen], reduction="sum"))
            correct += int((logits.argmax(-1)[chosen] == targets[chosen]).sum())
            n += int(chosen.sum())
        model.train(was)
        return {"eval_loss": loss_sum / n, "eval_accuracy": correct / n}

    def describe_eval(self, m: dict) -> str:
        return f"held-out masked-token loss {m['eval_loss']:.3f}, accuracy {m['eval_accuracy']:.3f}"
