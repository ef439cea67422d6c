"""``--task clip``: contrastive image-text training of CLIP (fastlm.models.clip) on caption pairs.

Data: ``--data FILE``, a jsonl of ``{"image": path, "text": caption}`` (fastlm.vision.image_pairs;
paths relative to the file); held out: ``--task-set eval_data=FILE`` or a ``val_fraction`` split.
Without --data: fastlm.vision.shape_pairs (rendered coloured shapes and digits with their
captions, no download; ``--task-set images=N``). The model: ``--preset`` one of CLIP_PRESETS,
``--set vision.FIELD=...`` / ``text.FIELD=...`` / ``embed_dim=...``. Text is byte-level (no
tokenizer file). A batch holds distinct captions where the data allows (a duplicate would be a
false negative): each example is one caption group of the training order, with one of its images.
Held-out metrics: eval_loss (the symmetric loss over batches of distinct captions) and eval_top1
(image-to-text retrieval among the held-out distinct captions, CLIP.eval_top1); each evaluation
also writes the held-out similarity matrix of up to 12 images to ``out/similarity.png``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from fastlm import data as fdata
from fastlm.tasks import Task, register
from fastlm.tasks.vit import model_type_config, typed_setting


def _one_file(tc, what: str) -> Path | None:
    if not tc.data:
        return None
    if len(tc.data) != 1:
        raise ValueError(f"--data: task {what} reads one jsonl file, got {len(tc.data)} paths")
    return Path(tc.data[0])


def clip_config(tc):
    """The CLIPConfig of --preset and --set (keys vision.X, text.X, embed_dim, init_logit_scale)."""
    from fastlm.models.clip import CLIP_PRESETS, CLIPConfig

    if tc.preset not in CLIP_PRESETS:
        raise ValueError(f"--preset {tc.preset!r}: not a CLIP preset; presets: {', '.join(CLIP_PRESETS)}")
    p = CLIP_PRESETS[tc.preset]
    parts = {"vision": dict(p["vision"]), "text": dict(p["text"]), "embed_dim": p["embed_dim"]}
    for key, value in tc.model.items():
        head, _, field = key.partition(".")
        if head in ("vision", "text") and field:
            parts[head][field] = value
        elif key in ("embed_dim", "init_logit_scale"):
            parts[key] = value
        else:
            raise ValueError(f"--set {key}: a CLIP setting is vision.FIELD, text.FIELD, embed_dim or init_logit_scale")
    try:
        return CLIPConfig(**parts)
    except TypeError as exc:
        raise ValueError(f"--set: {exc}") from None


@register
class CLIPTask(Task):
    name = "clip"
    has_tokenizer = False

    @dataclasses.dataclass
    class Options:
        eval_data: str = ""  # a held-out pairs jsonl (default: a val_fraction split of --data)
        images: int = 3000  # the size of the built-in pair set (without --data)

        def __post_init__(self):
            if not isinstance(self.eval_data, str):
                raise ValueError(f"eval_data must be a path, got {self.eval_data!r}")
            if isinstance(self.images, bool) or not isinstance(self.images, int) or self.images < 20:
                raise ValueError(f"images must be an integer >= 20, got {self.images!r}")

    @staticmethod
    def parse_sets(items) -> dict:
        """--set KEY=VALUE items (vision.FIELD, text.FIELD, embed_dim, init_logit_scale), typed by
        ViTConfig, GPTConfig and CLIPConfig (what tc.model holds)."""
        from fastlm.models.clip import CLIPConfig
        from fastlm.models.gpt import GPTConfig
        from fastlm.models.vit import ViTConfig

        out = {}
        for item in items:
            key, sep, value = item.partition("=")
            head, _, field = key.partition(".")
            if not sep or (head not in ("vision", "text") and key not in ("embed_dim", "init_logit_scale")):
                raise ValueError(f"--set {item!r}: expected KEY=VALUE with KEY vision.FIELD, text.FIELD, embed_dim or init_logit_scale")
            if field:
                out[key] = typed_setting({"vision": ViTConfig, "text": GPTConfig}[head], field, value, item)
            else:
                out[key] = typed_setting(CLIPConfig, key, value, item)
        return out

    def check(self, tc) -> None:
        clip_config(tc)
        path = _one_file(tc, self.name)
        if path is not None and not path.is_file():
            raise FileNotFoundError(f"data file {str(path)!r} does not exist")
        if self.options.eval_data and not Path(self.options.eval_data).is_file():
            raise FileNotFoundError(f"eval_data {self.options.eval_data!r} does not exist")
        self.out = Path(tc.out)

    def new_model(self, tc, log):
        from fastlm.models.clip import CLIP

        return CLIP(clip_config(tc))

    def model_config(self, model) -> dict:
        import fastlm

        return {"model_type": "fastlm-clip", "fastlm_version": fastlm.__version__, **model.config.to_dict()}

    def model_from_checkpoint(self, config, state):
        from fastlm.models.clip import CLIP, CLIPConfig

        return CLIP(CLIPConfig.from_dict(model_type_config(config, "fastlm-clip")))

    def load_data(self, tc, log) -> str:
        from fastlm import vision

        v = self.model.config.vision
        path = _one_file(tc, self.name)
        where = str(path) if path else "built-in shape pairs"
        data = vision.image_pairs(path, v.image_size, v.in_channels) if path else vision.shape_pairs(self.options.images, v.image_size, seed=tc.seed)
        if self.options.eval_data:
            train, held = data, vision.image_pairs(self.options.eval_data, v.image_size, v.in_channels)
        else:
            tr, va = fdata.split_examples(len(data), tc.val_fraction, tc.seed, f"pairs in {where}")
            train, held = data.subset(tr), data.subset(va)
        self.train, self.held = train, held
        self.tokens_train, self.tokens_held = self.model.tokenize(train.texts), self.model.tokenize(held.texts)
        self.groups = _groups(train.texts)
        self.order = fdata.ExampleOrder(len(self.groups), tc.seed)
        self.seq_len = self.model.config.text.block_size
        self.out = Path(tc.out)
        return (f"{where}: {len(train):,} train / {len(held):,} held-out pairs, {len(self.groups):,} distinct training captions, "
                f"{v.image_size} x {v.image_size}")

    def batch(self, position, n):
        """Examples position .. position + n - 1: caption groups in the run's order, and in each the
        image chosen by (seed, position). Distinct captions unless n exceeds their number."""
        idx = []
        for p, g in zip(range(position, position + n), self.order.indices(position, n), strict=True):
            members = self.groups[g]
            idx.append(members[p // len(self.groups) % len(members)])
        idx = torch.tensor(idx)
        return self.train.images[idx], self.tokens_train[idx]

    def loss(self, model, batch):
        images, ids = batch
        return model(images, ids, return_loss=True)[1]

    @torch.no_grad()
    def evaluate(self, model, batch_size, iters, device, autocast) -> dict:
        from fastlm.models.clip import contrastive_loss

        was = model.training
        model.eval()
        groups = _groups(self.held.texts)
        first = torch.tensor([g[0] for g in groups])
        losses = []
        for i in range(0, min(len(first), batch_size * iters), batch_size):
            idx = first[i:i + batch_size]
            if len(idx) < 2:
                break
            with autocast:
                losses.append(float(contrastive_loss(model(self.held.images[idx].to(device), self.tokens_held[idx].to(device)))))
        top1 = model.eval_top1(self.held.images, self.held.texts)
        if _is_main():
            from fastlm.models.clip import plot_similarity

            k = first[:12]
            self.out.mkdir(parents=True, exist_ok=True)
            tmp = self.out / ".similarity.tmp.png"
            plot_similarity(model, self.held.images[k], [self.held.texts[int(i)] for i in k], tmp, title="held-out cosine similarity")
            os.replace(tmp, self.out / "similarity.png")
        model.train(was)
        return {"eval_loss": sum(losses) / len(losses) if losses else float("nan"), "eval_top1": top1}

    def describe_eval(self, m: dict) -> str:
        return f"held-out loss {m['eval_loss']:.3f}, image-to-text top-1 {m['eval_top1']:.3f}"


def _groups(texts: list[str]) -> list[list[int]]:
    """Indices of each distinct caption, in order of first appearance."""
    by_text: dict[str, list[int]] = {}
    for i, t in enumerate(texts):
        by_text.setdefault(t, []).append(i)
    return list(by_text.values())


def _is_main() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
