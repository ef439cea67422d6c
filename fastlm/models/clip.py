"""CLIP (Radford et al. 2021) on fastlm's fused ops: a ViT image encoder and a GPT text encoder.

    image: ViT (num_classes=0) -> pooled features (B, Dv) -> visual_projection -> L2-normalise -> u
    text:  bytes + EOT -> GPT block stack (causal) -> final norm -> the state at EOT (B, Dt)
           -> text_projection -> L2-normalise -> w
    logits_per_image = s u w^T, s = exp(logit_scale) clamped to at most 100 (CLIP's clamp; the
    parameter starts at log(1 / 0.07) and gets no gradient while clamped); logits_per_text = its T.
    loss = (CE(logits_per_image, arange) + CE(logits_per_text, arange)) / 2   (symmetric InfoNCE)

Text is tokenised byte-level (UTF-8 bytes 0-255, EOT = 256, padding = 257 after it), truncated to
the context (text.block_size - 1 bytes, then EOT). The encoder is causal, so the EOT state has read
every byte of the caption and no padding: it is the caption's embedding (CLIP's own pooling).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastlm.models.gpt import GPT, GPTConfig
from fastlm.models.vit import ViT, ViTConfig

EOT, PAD = 256, 257
VOCAB = 258
MAX_LOGIT_SCALE = 100.0

CLIP_PRESETS = {
    "tiny": dict(
        vision=dict(image_size=32, patch_size=4, n_layer=4, n_head=4, n_embd=128),
        text=dict(block_size=32, n_layer=4, n_head=4, n_embd=128),
        embed_dim=128,
    ),
    "vit-b16": dict(
        vision=dict(image_size=224, patch_size=16, n_layer=12, n_head=12, n_embd=768),
        text=dict(block_size=77, n_layer=12, n_head=8, n_embd=512),
        embed_dim=512,
    ),
}


def _vision(v) -> ViTConfig:
    cfg = ViTConfig.from_dict(v) if isinstance(v, dict) else v
    if not isinstance(cfg, ViTConfig):
        raise TypeError(f"CLIPConfig: vision must be a ViTConfig or a dict, got {type(v).__name__}")
    return dataclasses.replace(cfg, num_classes=0)


def _text(t) -> GPTConfig:
    cfg = GPTConfig.from_dict({"vocab_size": VOCAB, **t}) if isinstance(t, dict) else t
    if not isinstance(cfg, GPTConfig):
        raise TypeError(f"CLIPConfig: text must be a GPTConfig or a dict, got {type(t).__name__}")
    if cfg.vocab_size != VOCAB or not cfg.causal:
        raise ValueError(f"CLIPConfig: the text encoder must be causal with vocab_size {VOCAB} (bytes, EOT, PAD), "
                         f"got causal={cfg.causal}, vocab_size={cfg.vocab_size}")
    if cfg.block_size < 2:
        raise ValueError(f"CLIPConfig: the text context (block_size) must hold at least one byte and EOT, got {cfg.block_size}")
    return cfg


@dataclasses.dataclass
class CLIPConfig:
    vision: ViTConfig = dataclasses.field(default_factory=lambda: ViTConfig(num_classes=0))
    text: GPTConfig = dataclasses.field(default_factory=lambda: GPTConfig(vocab_size=VOCAB, block_size=77, n_embd=512, n_head=8))
    embed_dim: int = 512
    init_logit_scale: float = math.log(1 / 0.07)

    def __post_init__(self):
        self.vision, self.text = _vision(self.vision), _text(self.text)
        if isinstance(self.embed_dim, bool) or not isinstance(self.embed_dim, int) or self.embed_dim <= 0:
            raise ValueError(f"CLIPConfig: embed_dim must be a positive int, got {self.embed_dim!r}")
        s = self.init_logit_scale
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or not 0 <= s <= math.log(MAX_LOGIT_SCALE):
            raise ValueError(f"CLIPConfig: init_logit_scale must lie in [0, log {MAX_LOGIT_SCALE:g}], got {s!r}")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> CLIPConfig:
        if name not in CLIP_PRESETS:
            raise ValueError(f"unknown CLIP preset {name!r}; presets: {', '.join(CLIP_PRESETS)}")
        p = CLIP_PRESETS[name]
        return cls(**{"vision": dict(p["vision"]), "text": dict(p["text"]), "embed_dim": p["embed_dim"], **overrides})

    def to_dict(self) -> dict:
        return {"vision": self.vision.to_dict(), "text": self.text.to_dict(), "embed_dim": self.embed_dim, "init_logit_scale": self.init_logit_scale}

    @classmethod
    def from_dict(cls, d: dict) -> CLIPConfig:
        if not isinstance(d, dict):
            raise TypeError(f"CLIPConfig.from_dict: expected a dict, got {type(d).__name__}")
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"CLIPConfig: unknown field(s) {', '.join(sorted(unknown))}")
        return cls(**d)


def contrastive_loss(logits_per_image: torch.Tensor) -> torch.Tensor:
    """The symmetric InfoNCE loss of a square (B, B) logit matrix whose matching pairs lie on the diagonal."""
    if logits_per_image.dim() != 2 or logits_per_image.shape[0] != logits_per_image.shape[1]:
        raise ValueError(f"contrastive_loss: expected a square (B, B) logit matrix (image i matches text i), got {list(logits_per_image.shape)}")
    logits = logits_per_image.float()
    target = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


class CLIP(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = cfg = config
        self.visual = ViT(cfg.vision)
        self.text = GPT(cfg.text)
        self.visual_projection = nn.Linear(cfg.vision.n_embd, cfg.embed_dim, bias=False)
        self.text_projection = nn.Linear(cfg.text.n_embd, cfg.embed_dim, bias=False)
        for proj, width in ((self.visual_projection, cfg.vision.n_embd), (self.text_projection, cfg.text.n_embd)):
            nn.init.normal_(proj.weight, std=width ** -0.5)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def tokenize(self, texts) -> torch.Tensor:
        """(N, block_size) int64 byte ids: each text's UTF-8 bytes (truncated to block_size - 1), EOT, PAD..."""
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise TypeError("CLIP.tokenize: expected a string or a list of strings")
        S = self.config.text.block_size
        out = torch.full((len(texts), S), PAD, dtype=torch.long)
        for i, t in enumerate(texts):
            b = list(t.encode("utf-8")[:S - 1]) + [EOT]
            out[i, :len(b)] = torch.tensor(b)
        return out

    def scale(self) -> torch.Tensor:
        """exp(logit_scale) clamped to at most MAX_LOGIT_SCALE."""
        return self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B, embed_dim) image embeddings (unit length unless normalize=False)."""
        z = self.visual_projection(self.visual.features(images))
        return F.normalize(z, dim=-1) if normalize else z

    def encode_text(self, ids: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B, embed_dim) text embeddings of token ids (B, S) from tokenize(): the state at each row's first EOT."""
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            raise ValueError(f"CLIP.encode_text: expected token ids (B, S) from CLIP.tokenize, got {getattr(ids, 'shape', type(ids).__name__)}")
        is_eot = ids == EOT
        if not torch.compiler.is_compiling() and not bool(is_eot.any(dim=1).all()):
            raise ValueError("CLIP.encode_text: every row needs an EOT token (id 256); build ids with CLIP.tokenize")
        h = self.text.hidden_states(ids)
        eot = is_eot.int().argmax(dim=1)
        z = self.text_projection(h[torch.arange(ids.shape[0], device=ids.device), eot])
        return F.normalize(z, dim=-1) if normalize else z

    def forward(self, images: torch.Tensor, ids: torch.Tensor, return_loss: bool = False):
        """logits_per_image (B_img, B_txt) = scale * cos(image i, text j); with return_loss (B_img =
        B_txt, pair i matching) also the symmetric contrastive loss."""
        u, w = self.encode_image(images), self.encode_text(ids)
        logits = self.scale() * u @ w.t().to(u.dtype)
        if not return_loss:
            return logits
        return logits, contrastive_loss(logits)

    @torch.no_grad()
    def _embed(self, images, texts, batch_size=256):
        device = self.logit_scale.device
        u = torch.cat([self.encode_image(images[i:i + batch_size].to(device)) for i in range(0, len(images), batch_size)])
        ids = self.tokenize(list(texts))
        w = torch.cat([self.encode_text(ids[i:i + batch_size].to(device)) for i in range(0, len(ids), batch_size)])
        return u, w

    @torch.no_grad()
    def similarity(self, images: torch.Tensor, texts) -> torch.Tensor:
        """Cosine similarities (N_img, N_txt) of images and caption strings."""
        was = self.training
        self.eval()
        u, w = self._embed(images, texts)
        self.train(was)
        return u @ w.t().to(u.dtype)

    def zero_shot(self, images: torch.Tensor, class_names, template: str = "a photo of {}") -> torch.Tensor:
        """Class probabilities (B, K): softmax over scale * cos(image, template.format(name)) for each class name."""
        if isinstance(class_names, str) or not class_names or not all(isinstance(c, str) for c in class_names):
            raise ValueError(f"CLIP.zero_shot: class_names must be a non-empty list of strings, got {class_names!r}")
        if not isinstance(template, str) or "{}" not in template:
            raise ValueError(f"CLIP.zero_shot: template must be a string with a '{{}}' for the class name, got {template!r}")
        sim = self.similarity(images, [template.format(c) for c in class_names])
        return torch.softmax(self.scale().detach() * sim.float(), dim=-1)

    def eval_top1(self, images: torch.Tensor, texts) -> float:
        """Image-to-text retrieval top-1 on held-out pairs: the share of images whose most similar
        caption, among the distinct captions of ``texts``, is their own (identical captions are one
        candidate, so a duplicate is never a false miss)."""
        texts = list(texts)
        if len(texts) != len(images) or not texts:
            raise ValueError(f"CLIP.eval_top1: expected as many captions as images (at least one), got {len(texts)} and {len(images)}")
        candidates = sorted(set(texts))
        index = {t: i for i, t in enumerate(candidates)}
        best = self.similarity(images, candidates).argmax(dim=1).cpu()
        return float((best == torch.tensor([index[t] for t in texts])).float().mean())


def plot_similarity(model: CLIP, images: torch.Tensor, texts, path, title: str = "cosine similarity") -> str:
    """Save the (images x captions) cosine-similarity matrix as a PNG heat map with the images
    along the left edge and the captions along the top; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fastlm.vision import to_pil

    texts = list(texts)
    sim = model.similarity(images, texts).float().cpu().numpy()
    n, m = sim.shape
    fig, ax = plt.subplots(figsize=(1.5 + 0.5 * m, 1.5 + 0.5 * n))
    ax.imshow(sim, vmin=-1, vmax=1, cmap="RdBu_r", extent=(0, m, n, 0))
    for i in range(n):
        ax.imshow(to_pil(images[i]), extent=(-1.05, -0.05, i + 1, i))
        for j in range(m):
            ax.text(j + 0.5, i + 0.5, f"{sim[i, j]:.2f}", ha="center", va="center", fontsize=6)
    ax.set_xlim(-1.1, m)
    ax.set_ylim(n, 0)
    ax.set_xticks([j + 0.5 for j in range(m)], texts, rotation=60, ha="left", fontsize=7)
    ax.xaxis.tick_top()
    ax.set_yticks([])
    fig.text(0.5, 0.01, title, ha="center", va="bottom")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)
