"""A Vision Transformer (ViT, Dosovitskiy et al. 2020) on the GPT's block stack with causal=False.

    images (B, C, H, W) -> patch embedding: a P x P stride-P conv, (B, N, D) with N = (H / P) (W / P)
                        -> [CLS] + patches, + positions (learned, or the fixed 2-D sinusoidal table)
                        -> n_layer x fastlm.models.gpt.Block (bidirectional attention, pre-norm, GELU MLP)
                        -> final norm -> pooled (the CLS token, or the mean of the patch tokens)
                        -> head: logits (B, num_classes)

2-D sinusoidal positions (MAE's form): the patch in row r, column c gets
    [PE(r) over n_embd / 2 channels, PE(c) over n_embd / 2 channels]
with PE the 1-D table of fastlm.ops.sinusoidal_position_encoding; the CLS token gets zeros (it is
itself learned). Every norm, attention and positional table goes through ``fastlm.ops`` (the blocks'
fused residual-add norms), so the model follows ``fastlm.use_backend``.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastlm import ops
from fastlm.models.gpt import Block, GPTConfig, _add_norm, _make_norm

VIT_PRESETS = {
    "tiny": dict(image_size=32, patch_size=4, n_layer=4, n_head=4, n_embd=128, num_classes=10),
    "vit-b16": dict(image_size=224, patch_size=16, n_layer=12, n_head=12, n_embd=768, num_classes=1000),
}


@dataclasses.dataclass
class ViTConfig:
    image_size: int = 224  # square images: H = W = image_size
    patch_size: int = 16
    in_channels: int = 3
    num_classes: int = 1000  # 0: no head (features only, as CLIP's image encoder)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    positions: str = "learned"  # "learned" | "sinusoidal" (the fixed 2-D table)
    pool: str = "cls"  # "cls" | "mean" (of the patch tokens)
    norm: str = "layernorm"  # "layernorm" | "rmsnorm"
    bias: bool = True
    dropout: float = 0.0
    norm_eps: float = 1e-6
    gelu: str = "none"  # "none" (exact erf, as ViT) | "tanh"

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v, t = getattr(self, f.name), str(f.type)
            if t == "int" and not (isinstance(v, int) and not isinstance(v, bool)):
                raise TypeError(f"ViTConfig: {f.name} must be an integer, got {v!r}")
            if t == "float" and not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)):
                raise TypeError(f"ViTConfig: {f.name} must be a finite number, got {v!r}")
            if t == "bool" and not isinstance(v, bool):
                raise TypeError(f"ViTConfig: {f.name} must be true or false, got {v!r}")
        sizes = {k: getattr(self, k) for k in ("image_size", "patch_size", "in_channels", "n_layer", "n_head", "n_embd")}
        if min(sizes.values()) <= 0 or self.num_classes < 0:
            bad = [f"{k}={v}" for k, v in sizes.items() if v <= 0] + ([f"num_classes={self.num_classes}"] if self.num_classes < 0 else [])
            raise ValueError(f"ViTConfig: sizes must be positive (num_classes >= 0), got {', '.join(bad)}")
        checks = [
            (self.image_size % self.patch_size == 0, f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}"),
            (self.positions in ("learned", "sinusoidal"), f"positions must be 'learned' or 'sinusoidal', got {self.positions!r}"),
            (self.positions != "sinusoidal" or self.n_embd % 4 == 0, f"2-D sinusoidal positions need n_embd a multiple of 4, got {self.n_embd}"),
            (self.pool in ("cls", "mean"), f"pool must be 'cls' or 'mean', got {self.pool!r}"),
            (0 <= self.dropout < 1, f"dropout must lie in [0, 1), got {self.dropout}"),
            (self.norm_eps > 0, f"norm_eps must be positive, got {self.norm_eps}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"ViTConfig: {msg}")
        self.block_config()  # norm, gelu, n_embd % n_head checked by GPTConfig

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def n_tokens(self) -> int:
        """The sequence the encoder sees: the CLS token and grid**2 patches."""
        return 1 + self.grid ** 2

    def block_config(self) -> GPTConfig:
        """The GPTConfig of the encoder blocks (bidirectional; vocab_size is unused)."""
        try:
            return GPTConfig(vocab_size=1, block_size=self.n_tokens, n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd,
                             norm=self.norm, causal=False, bias=self.bias, dropout=self.dropout, norm_eps=self.norm_eps, gelu=self.gelu)
        except ValueError as exc:
            raise ValueError(str(exc).replace("GPTConfig", "ViTConfig")) from None

    @classmethod
    def from_preset(cls, name: str, **overrides) -> ViTConfig:
        if name not in VIT_PRESETS:
            raise ValueError(f"unknown ViT preset {name!r}; presets: {', '.join(VIT_PRESETS)}")
        return cls(**{**VIT_PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ViTConfig:
        if not isinstance(d, dict):
            raise TypeError(f"ViTConfig.from_dict: expected a dict, got {type(d).__name__}")
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"ViTConfig: unknown field(s) {', '.join(sorted(unknown))}")
        return cls(**d)


def sinusoidal_2d(grid: int, dim: int, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """The (grid**2, dim) table: row r * grid + c is [PE(r) over dim / 2, PE(c) over dim / 2]."""
    r = torch.arange(grid, device=device).repeat_interleave(grid)
    c = torch.arange(grid, device=device).repeat(grid)
    return ops.sinusoidal_position_encoding(torch.stack([r, c]), dim // 2, dtype=dtype).permute(1, 0, 2).reshape(grid * grid, dim)


class ViT(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = cfg = config
        bcfg = cfg.block_config()
        self.patch_embed = nn.Conv2d(cfg.in_channels, cfg.n_embd, cfg.patch_size, stride=cfg.patch_size, bias=cfg.bias)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.n_embd))
        if cfg.positions == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, cfg.n_tokens, cfg.n_embd))
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList([Block(bcfg, i) for i in range(cfg.n_layer)])
        self.ln_f = _make_norm(bcfg)
        self.head = nn.Linear(cfg.n_embd, cfg.num_classes, bias=cfg.bias) if cfg.num_classes else None
        self.apply(self._init_weights)
        nn.init.normal_(self.cls_token, std=0.02)
        if cfg.positions == "learned":
            nn.init.normal_(self.pos_embed, std=0.02)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def check_images(self, images) -> None:
        """TypeError / ValueError unless images is a floating (B, in_channels, image_size, image_size) tensor."""
        cfg = self.config
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"ViT: images must be a tensor (B, C, H, W), got {type(images).__name__}")
        if not images.is_floating_point():
            raise TypeError(f"ViT: images must be a floating-point tensor (e.g. uint8 pixels / 255, normalised), got {images.dtype}")
        want = (cfg.in_channels, cfg.image_size, cfg.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != want:
            raise ValueError(f"ViT: images must have shape (B, {', '.join(map(str, want))}) (B, C, H, W), got {list(images.shape)}")

    def hidden_states(self, images: torch.Tensor) -> torch.Tensor:
        """The final normed hidden states (B, 1 + grid**2, n_embd); token 0 is CLS."""
        if not torch.compiler.is_compiling():
            self.check_images(images)
        cfg = self.config
        x = self.patch_embed(images.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)
        B, N, D = x.shape
        if cfg.positions == "sinusoidal":
            x = x + sinusoidal_2d(cfg.grid, D, dtype=x.dtype, device=x.device)
        x = torch.cat([self.cls_token.expand(B, 1, D), x], dim=1)
        if cfg.positions == "learned":
            x = x + self.pos_embed
        positions = torch.arange(N + 1, device=x.device)
        h, delta = self.drop(x), None
        for block in self.h:
            h, delta = block(h, delta, positions)
        y, _ = _add_norm(self.ln_f, h, delta)
        return y

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The pooled representation (B, n_embd): the CLS token, or the mean of the patch tokens."""
        y = self.hidden_states(images)
        return y[:, 0] if self.config.pool == "cls" else y[:, 1:].mean(dim=1)

    def forward(self, images: torch.Tensor, targets: torch.Tensor | None = None):
        """Logits (B, num_classes) for images (B, C, H, W); with targets (B,) also the mean cross-entropy."""
        if self.head is None:
            raise ValueError("ViT: num_classes is 0 (no head); use features(images)")
        logits = self.head(self.features(images))
        if targets is None:
            return logits
        return logits, F.cross_entropy(logits.float(), targets)
