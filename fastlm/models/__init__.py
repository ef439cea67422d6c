"""Models built on fastlm's ops: the thin GPT."""

from fastlm.models.gpt import GPT, PRESETS, GPTConfig

__all__ = ["GPT", "GPTConfig", "PRESETS"]
