"""Models built on fastlm's ops: the thin GPT, the ViT and CLIP."""

from fastlm.models.clip import CLIP, CLIP_PRESETS, CLIPConfig
from fastlm.models.gpt import GPT, PRESETS, GPTConfig
from fastlm.models.vit import VIT_PRESETS, ViT, ViTConfig

__all__ = ["GPT", "GPTConfig", "PRESETS", "ViT", "ViTConfig", "VIT_PRESETS", "CLIP", "CLIPConfig", "CLIP_PRESETS"]
