"""Image data for the ViT and CLIP: loading, splits, built-in offline sets, and short training loops.

Images are loaded with Pillow, converted to RGB (or L for ``channels=1``), resized to
``image_size`` x ``image_size`` (bilinear; any source size or aspect), and normalised
    x = (pixel / 255 - 0.5) / 0.5        in [-1, 1], shape (C, image_size, image_size), float32.
Data sets are loaded eagerly into one tensor (the small sets these tasks train on).

- ``image_folder(root)``: ImageFolder layout, one sub-folder per class (the folder name is the
  label; classes sorted by name), image files by extension.
- ``image_pairs(path)``: a jsonl of ``{"image": path, "text": caption}`` lines, image paths
  relative to the jsonl's folder (or absolute).
- ``glyph_images`` / ``shape_pairs``: the built-in defaults, needing no download: glyphs and shapes
  drawn with Pillow in matplotlib's bundled DejaVu fonts at random offsets, sizes, rotations and
  colours (a synthetic MNIST; "a red circle", "the digit 7 in blue"), the same for the same seed.
- ``train_vit`` / ``train_clip``: AdamW for N steps on such a set (the default one without data),
  returning the model and its held-out accuracy / image-to-text top-1.
Importing this module registers the trainer's tasks ``vit`` and ``clip`` (fastlm.tasks.vit, .clip).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import torch

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
MEAN, STD = 0.5, 0.5
DIGITS = "0123456789"
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 235), "yellow": (235, 215, 40), "purple": (165, 60, 210)}
SHAPES = ("circle", "square", "triangle", "cross")
_FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf")


@dataclasses.dataclass
class ImageDataset:
    """images (N, C, S, S) normalised float32; labels (N,) int64 indices into classes."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index) -> ImageDataset:
        return ImageDataset(self.images[index], self.labels[index], self.classes)

    def split(self, val_fraction: float = 0.2, seed: int = 0) -> tuple[ImageDataset, ImageDataset]:
        """(train, held-out): a seeded random split, held-out = round(val_fraction N) >= 1 items."""
        train, held = split_indices(len(self), val_fraction, seed)
        return self.subset(train), self.subset(held)


@dataclasses.dataclass
class PairDataset:
    """images (N, C, S, S) normalised float32; texts: N captions."""

    images: torch.Tensor
    texts: list[str]

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, index) -> PairDataset:
        index = torch.as_tensor(index, dtype=torch.long)
        return PairDataset(self.images[index], [self.texts[i] for i in index.tolist()])

    def split(self, val_fraction: float = 0.2, seed: int = 0) -> tuple[PairDataset, PairDataset]:
        train, held = split_indices(len(self), val_fraction, seed)
        return self.subset(train), self.subset(held)


def split_indices(n: int, val_fraction: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded permutation of range(n) cut into (train, held-out), held-out round(val_fraction n) >= 1."""
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction!r}")
    if n < 2:
        raise ValueError(f"a train/held-out split needs at least 2 items, got {n}")
    n_val = min(n - 1, max(1, round(val_fraction * n)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:], perm[:n_val]


def _check_size(image_size, channels) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels!r}")


def to_tensor(image, image_size: int, channels: int = 3) -> torch.Tensor:
    """A PIL image resized to image_size x image_size and normalised: (channels, S, S) float32."""
    from PIL import Image

    image = image.convert("L" if channels == 1 else "RGB")
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.BILINEAR)
    x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(image_size, image_size, channels)
    return (x.permute(2, 0, 1).float() / 255 - MEAN) / STD


def to_pil(x: torch.Tensor):
    """The inverse of to_tensor (C, S, S) -> a PIL image (for saving and plots)."""
    from PIL import Image

    pixels = ((x.detach().float().cpu() * STD + MEAN).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0)
    return Image.fromarray(pixels.squeeze(-1).numpy() if pixels.shape[-1] == 1 else pixels.numpy())


def load_image(path, image_size: int = 32, channels: int = 3) -> torch.Tensor:
    """(channels, S, S) normalised; ValueError naming the file if Pillow cannot read it."""
    from PIL import Image, UnidentifiedImageError

    _check_size(image_size, channels)
    try:
        with Image.open(path) as im:
            im.load()
            return to_tensor(im, image_size, channels)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"unreadable image {path}: {type(exc).__name__}: {exc}") from None


def image_folder(root, image_size: int = 32, channels: int = 3) -> ImageDataset:
    """An ImageFolder directory: root/<class>/<image>. ValueError for no class folders, a class
    folder with no images, or an unreadable image."""
    _check_size(image_size, channels)
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a directory")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"image folder {root}: no class sub-folders (expected {root}/<class>/<image>.png, ...)")
    images, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not files:
            raise ValueError(f"image folder {root}: class {name!r} has no images ({', '.join(IMAGE_EXTENSIONS)})")
        images += [load_image(f, image_size, channels) for f in files]
        labels += [label] * len(files)
    return ImageDataset(torch.stack(images), torch.tensor(labels), classes)


def image_pairs(path, image_size: int = 32, channels: int = 3) -> PairDataset:
    """A jsonl of {"image": path, "text": caption}; ValueError (with the line number) for bad JSON,
    a missing or non-string field, an empty caption, an unreadable image, or no pairs."""
    _check_size(image_size, channels)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pairs file {path} does not exist")
    images, texts = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{path}:{n}: not JSON ({exc})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{n}: expected an object {{\"image\": ..., \"text\": ...}}, got {type(row).__name__}")
            for key in ("image", "text"):
                if not isinstance(row.get(key), str) or not row[key].strip():
                    raise ValueError(f"{path}:{n}: {key!r} must be a non-empty string, got {row.get(key)!r}")
            try:
                images.append(load_image(path.parent / row["image"], image_size, channels))
            except ValueError as exc:
                raise ValueError(f"{path}:{n}: {exc}") from None
            texts.append(row["text"])
    if not texts:
        raise ValueError(f"{path}: no pairs (expected lines {{\"image\": path, \"text\": caption}})")
    return PairDataset(torch.stack(images), texts)


def save_image_folder(data: ImageDataset, root) -> Path:
    """Write data as root/<class>/<i>.png (readable back by image_folder)."""
    root = Path(root)
    for i, (x, y) in enumerate(zip(data.images, data.labels.tolist(), strict=True)):
        d = root / data.classes[y]
        d.mkdir(parents=True, exist_ok=True)
        to_pil(x).save(d / f"{i:05d}.png")
    return root


def save_pairs(data: PairDataset, path) -> Path:
    """Write data as images/<i>.png beside path and path as the jsonl (readable back by image_pairs)."""
    path = Path(path)
    (path.parent / "images").mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i, (x, text) in enumerate(zip(data.images, data.texts, strict=True)):
            to_pil(x).save(path.parent / "images" / f"{i:05d}.png")
            f.write(json.dumps({"image": f"images/{i:05d}.png", "text": text}) + "\n")
    return path


# ---- the built-in sets ----------------------------------------------------------------------------


def _font(name: str, size: int):
    import matplotlib
    from PIL import ImageFont

    return ImageFont.truetype(os.path.join(matplotlib.get_data_path(), "fonts", "ttf", name), size)


def _luma(rgb) -> float:
    return (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]) / 255


def _draw(kind: str, what: str, fg, bg, S: int, rng):
    """One S x S RGB image: a glyph (kind "glyph") or a shape, randomly sized, placed and rotated."""
    from PIL import Image, ImageDraw

    mask = Image.new("L", (S, S), 0)
    d = ImageDraw.Draw(mask)
    size = S * (0.55 + 0.25 * float(rng.random()))
    cx, cy = (S / 2 + S * 0.08 * (2 * float(rng.random()) - 1) for _ in range(2))
    if kind == "glyph":
        d.text((cx, cy), what, font=_font(_FONTS[int(rng.integers(len(_FONTS)))], max(4, round(size))), fill=255, anchor="mm")
    else:
        r = size / 2
        if what == "circle":
            d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        elif what == "square":
            d.rectangle((cx - 0.85 * r, cy - 0.85 * r, cx + 0.85 * r, cy + 0.85 * r), fill=255)
        elif what == "triangle":
            d.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=255)
        else:
            w = 0.3 * r
            d.rectangle((cx - r, cy - w, cx + r, cy + w), fill=255)
            d.rectangle((cx - w, cy - r, cx + w, cy + r), fill=255)
    mask = mask.rotate(30 * (float(rng.random()) - 0.5), resample=Image.BILINEAR, center=(cx, cy))
    return Image.composite(Image.new("RGB", (S, S), fg), Image.new("RGB", (S, S), bg), mask)


def _rgb(rng, low=0, high=256):
    return tuple(int(v) for v in rng.integers(low, high, 3))


def glyph_images(n: int = 3000, image_size: int = 32, *, classes: str = DIGITS, channels: int = 3, seed: int = 0) -> ImageDataset:
    """n rendered glyphs (one class per character of ``classes``, balanced), each in a random font,
    size (55-80% of the image), offset (up to 8%), rotation (+-15 degrees) and colour pair: a
    random glyph colour on a random background at least 0.35 darker in luma (light on dark, as MNIST)."""
    import numpy as np

    _check_size(image_size, channels)
    if not isinstance(classes, str) or len(set(classes)) != len(classes) or len(classes) < 2:
        raise ValueError(f"classes must be a string of at least 2 distinct characters, got {classes!r}")
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(n):
        label = i % len(classes)
        fg, bg = _rgb(rng), _rgb(rng)
        while _luma(fg) - _luma(bg) < 0.35:
            fg, bg = _rgb(rng), _rgb(rng)
        images.append(to_tensor(_draw("glyph", classes[label], fg, bg, image_size, rng), image_size, channels))
        labels.append(label)
    return ImageDataset(torch.stack(images), torch.tensor(labels), list(classes))


def shape_pairs(n: int = 3000, image_size: int = 32, *, kinds=("shape", "digit"), seed: int = 0) -> PairDataset:
    """n rendered (image, caption) pairs: a coloured shape ("a red circle": 4 shapes x 5 colours)
    or a coloured digit ("the digit 7 in blue": 10 x 5), on a random dark grey background, sized,
    placed and rotated as glyph_images. The captions cycle through every combination."""
    import numpy as np

    kinds = tuple(kinds)
    if not kinds or set(kinds) - {"shape", "digit"}:
        raise ValueError(f"kinds must be a non-empty subset of ('shape', 'digit'), got {kinds!r}")
    _check_size(image_size, 3)
    combos = [("shape", s, c) for s in SHAPES for c in COLOURS if "shape" in kinds]
    combos += [("digit", d, c) for d in DIGITS for c in COLOURS if "digit" in kinds]
    rng = np.random.default_rng(seed)
    images, texts = [], []
    for i in range(n):
        kind, what, colour = combos[i % len(combos)]
        fg = tuple(int(np.clip(v + rng.integers(-20, 21), 0, 255)) for v in COLOURS[colour])
        bg = (int(rng.integers(10, 90)),) * 3
        images.append(to_tensor(_draw("glyph" if kind == "digit" else "shape", what, fg, bg, image_size, rng), image_size, 3))
        texts.append(f"a {colour} {what}" if kind == "shape" else f"the digit {what} in {colour}")
    return PairDataset(torch.stack(images), texts)


# ---- short training loops -------------------------------------------------------------------------


def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to lr / 10."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def _check_steps(steps, batch_size) -> None:
    for name, v in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")


def _optimizer(model, lr, weight_decay):
    """AdamW with weight decay on the matrices only (not on norms, biases, the CLS token and positions)."""
    groups = ([], [])
    for n, p in model.named_parameters():
        groups[p.dim() >= 2 and not n.endswith(("pos_embed", "cls_token"))].append(p)
    return torch.optim.AdamW([{"params": groups[1], "weight_decay": weight_decay}, {"params": groups[0], "weight_decay": 0.0}], lr=lr)


@torch.no_grad()
def evaluate_vit(model, data: ImageDataset, batch_size: int = 256) -> float:
    """Accuracy of argmax logits on data."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for i in range(0, len(data), batch_size):
        x, y = data.images[i:i + batch_size].to(device), data.labels[i:i + batch_size].to(device)
        correct += int((model(x).argmax(-1) == y).sum())
    model.train(was)
    return correct / max(1, len(data))


def train_vit(config="tiny", data=None, *, steps: int = 300, batch_size: int = 64, lr: float = 1e-3, weight_decay: float = 0.05,
              val_fraction: float = 0.2, seed: int = 0, device="cpu", eval_every: int = 0, callback=None) -> dict:
    """Train a ViT classifier; returns {"model", "eval_accuracy", "losses", "classes"}.

    config: a ViTConfig or a preset name (image_size, in_channels and num_classes follow the
    data). data: an ImageDataset, an ImageFolder directory, or None for glyph_images(). Follows
    fastlm.use_backend. ``callback(step, metrics)`` gets {"loss", "lr"} each step and also
    "eval_accuracy" every ``eval_every`` steps (0: only at the end)."""
    from fastlm.models.vit import ViT, ViTConfig

    _check_steps(steps, batch_size)
    cfg = ViTConfig.from_preset(config) if isinstance(config, str) else config
    if not isinstance(cfg, ViTConfig):
        raise TypeError(f"config must be a ViTConfig or a preset name, got {type(config).__name__}")
    if data is None:
        data = glyph_images(image_size=cfg.image_size, channels=cfg.in_channels, seed=seed)
    elif isinstance(data, (str, os.PathLike)):
        data = image_folder(data, cfg.image_size, cfg.in_channels)
    cfg = dataclasses.replace(cfg, image_size=data.images.shape[-1], in_channels=data.images.shape[1], num_classes=len(data.classes))
    train, held = data.split(val_fraction, seed)
    torch.manual_seed(seed)
    model = ViT(cfg).to(device)
    opt = _optimizer(model, lr, weight_decay)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps, lr, max(1, steps // 10))
        idx = torch.randint(0, len(train), (min(batch_size, len(train)),), generator=gen)
        _, loss = model(train.images[idx].to(device), train.labels[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if callback is not None:
            metrics = {"loss": losses[-1], "lr": opt.param_groups[0]["lr"]}
            if eval_every and (step + 1) % eval_every == 0:
                metrics["eval_accuracy"] = evaluate_vit(model, held)
            callback(step, metrics)
    return {"model": model, "eval_accuracy": evaluate_vit(model, held), "losses": losses, "classes": data.classes}


def caption_batches(texts: list[str], batch_size: int, generator: torch.Generator):
    """An endless stream of index batches whose captions are all distinct (a duplicate caption
    would be a false negative for the contrastive loss): batch_size captions drawn without
    replacement (at most the number of distinct captions), then one random pair of each."""
    by_text: dict[str, list[int]] = {}
    for i, t in enumerate(texts):
        by_text.setdefault(t, []).append(i)
    groups = list(by_text.values())
    k = min(batch_size, len(groups))
    while True:
        chosen = torch.randperm(len(groups), generator=generator)[:k].tolist()
        yield torch.tensor([groups[g][int(torch.randint(len(groups[g]), (1,), generator=generator))] for g in chosen])


def train_clip(config="tiny", data=None, *, steps: int = 300, batch_size: int = 64, lr: float = 1e-3, weight_decay: float = 0.05,
               val_fraction: float = 0.2, seed: int = 0, device="cpu", eval_every: int = 0, callback=None) -> dict:
    """Train CLIP contrastively; returns {"model", "eval_top1", "losses"}.

    config: a CLIPConfig or a preset name; data: a PairDataset, a pairs jsonl, or None for
    shape_pairs(). eval_top1 is image-to-text retrieval over the held-out pairs' distinct captions
    (CLIP.eval_top1). Batches hold distinct captions (caption_batches). Follows fastlm.use_backend."""
    from fastlm.models.clip import CLIP, CLIPConfig

    _check_steps(steps, batch_size)
    cfg = CLIPConfig.from_preset(config) if isinstance(config, str) else config
    if not isinstance(cfg, CLIPConfig):
        raise TypeError(f"config must be a CLIPConfig or a preset name, got {type(config).__name__}")
    if data is None:
        data = shape_pairs(image_size=cfg.vision.image_size, seed=seed)
    elif isinstance(data, (str, os.PathLike)):
        data = image_pairs(data, cfg.vision.image_size, cfg.vision.in_channels)
    vision = dataclasses.replace(cfg.vision, image_size=data.images.shape[-1], in_channels=data.images.shape[1])
    cfg = dataclasses.replace(cfg, vision=vision)
    train, held = data.split(val_fraction, seed)
    torch.manual_seed(seed)
    model = CLIP(cfg).to(device)
    opt = _optimizer(model, lr, weight_decay)
    tokens = model.tokenize(train.texts)
    batches = caption_batches(train.texts, batch_size, torch.Generator().manual_seed(seed))
    losses = []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps, lr, max(1, steps // 10))
        idx = next(batches)
        _, loss = model(train.images[idx].to(device), tokens[idx].to(device), return_loss=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if callback is not None:
            metrics = {"loss": losses[-1], "lr": opt.param_groups[0]["lr"], "logit_scale": float(model.scale().detach())}
            if eval_every and (step + 1) % eval_every == 0:
                metrics["eval_top1"] = model.eval_top1(held.images, held.texts)
            callback(step, metrics)
    return {"model": model, "eval_top1": model.eval_top1(held.images, held.texts), "losses": losses}


from fastlm.tasks import clip as _clip_task  # noqa: E402,F401  (registers --task clip)
from fastlm.tasks import vit as _vit_task  # noqa: E402,F401  (registers --task vit)
