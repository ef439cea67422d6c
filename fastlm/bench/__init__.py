"""Benchmarks: one registry entry per op (fastlm/bench/<op>.py), run by `fastlm bench`."""

from fastlm.bench import layer_norm  # noqa: F401
from fastlm.bench.registry import REGISTRY, Case, Entry, register

__all__ = ["REGISTRY", "Case", "Entry", "register"]
