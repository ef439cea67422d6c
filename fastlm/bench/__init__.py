"""Benchmarks: one registry entry per op (fastlm/bench/<op>.py), run by `fastlm bench`."""

from fastlm.bench import attention, encoder, gpt, hf_llama, layer_norm, rotary, sampling, sinusoidal, vit  # noqa: F401
from fastlm.bench.registry import REGISTRY, Case, Entry, register

__all__ = ["REGISTRY", "Case", "Entry", "register"]
