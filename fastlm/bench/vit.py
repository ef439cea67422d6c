"""Benchmark entry vit_train: one ViT training step at the presets' sizes.

("full") forward, loss, backward, gradient clipping and an AdamW step of the "vit-b16" preset
(ViT-B/16: 224 x 224 images, 197 tokens, 86.6M parameters) at B = 64 under bf16 autocast
(--sizes large: also the "tiny" preset, 32 x 32 images and 65 tokens, at B = 512). FLOPs per image
= T (6 N + 12 L H D T) with T the tokens per image (nanoGPT's estimate, full attention; the patch
convolution is inside N). Implementations: the fastlm kernel backends, the reference backend in
eager mode ("torch-eager") and under torch.compile ("torch-compile"); the run returns the step's
loss (before its update; the step is gpt_train's, fastlm.bench.gpt.train_impls), validated against the float64 reference on the same weights and images.
--quick (any device): a 1-layer 16 x 16 model, a harness check only.
"""

from __future__ import annotations

import copy

import torch

import fastlm
from fastlm.bench.gpt import train_impls
from fastlm.bench.registry import Case, Entry, register
from fastlm.models.vit import ViT, ViTConfig

QUICK_MODEL = dict(image_size=16, patch_size=4, n_layer=1, n_head=2, n_embd=32, num_classes=10)
SIZES = {"default": [("vit-b16", 64)], "large": [("vit-b16", 64), ("tiny", 512)], "quick": [("quick", 4)]}


def _config(name: str) -> ViTConfig:
    return ViTConfig(**QUICK_MODEL) if name == "quick" else ViTConfig.from_preset(name)


def _flops_per_image(model: ViT) -> float:
    c, T = model.config, model.config.n_tokens
    return T * (6 * model.num_params() + 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * T)


def _cases(dtype, mode, sizes, device, quick):
    table = SIZES["quick" if quick else (sizes if isinstance(sizes, str) and sizes in SIZES else "default")]
    if isinstance(sizes, list):
        table = [("quick" if quick else "vit-b16", b) for b in sizes]
    out = []
    for name, b in table:
        cfg = _config(name)
        with torch.device("meta"):
            fpi = _flops_per_image(ViT(cfg))

        def make(cfg=cfg, b=b):
            torch.manual_seed(0)
            model = ViT(cfg)
            g = torch.Generator().manual_seed(b)
            x = torch.randn(b, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
            y = torch.randint(0, cfg.num_classes, (b,), generator=g)
            return dict(model=model, x=x.to(device), y=y.to(device), dtype=getattr(torch, dtype), device=device)

        out.append(Case(f"{name} train B={b} T={cfg.n_tokens}", b, make, flops=fpi * b,
                        params=dict(B=b, T=cfg.n_tokens, images=b, tokens=b * cfg.n_tokens, layers=cfg.n_layer, d=cfg.n_embd)))
    return out


def _truth(inp, mode):
    model = copy.deepcopy(inp["model"]).to(device=inp["device"], dtype=torch.float64)
    with torch.no_grad(), fastlm.use_backend("torch"):
        return model(inp["x"].double(), inp["y"])[1]


register(Entry("vit_train", "flops", ("full",), _cases, train_impls, _truth, dtypes=("bfloat16", "float32"),
               description="ViT-B/16 training step (fwd, bwd, AdamW) at B=64 (224x224, 197 tokens) under bf16 autocast; TFLOP/s, MFU"))
