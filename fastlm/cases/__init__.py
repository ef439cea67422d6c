"""Correctness cases shared by tests/ and `fastlm check`.

Each op module here exposes ``cases(device, full=False) -> list[Case]`` (a compact grid of awkward
shapes and every option; ``full`` adds the larger GPU shapes) and ``check(case, backend) ->
dict[str, float]``, which runs the case on ``backend``, compares every output and gradient with
the float64 truth by the tolerance rule of fastlm.testing, raises AssertionError on a failure and
returns each output's error ratio (<= 1 passes).
"""

from __future__ import annotations

import dataclasses
import importlib

OPS = ("attention", "decode_attention", "layer_norm", "rms_norm", "rotary", "apply_rotary_pos_emb", "sinusoidal_position_encoding", "embed_sinusoidal", "sample", "top_k_top_p_filter")
_MODULE = {"attention": "attention", "decode_attention": "attention", "layer_norm": "layer_norm", "rms_norm": "layer_norm", "rotary": "rotary", "apply_rotary_pos_emb": "rotary",
           "sinusoidal_position_encoding": "sinusoidal", "embed_sinusoidal": "sinusoidal",
           "sample": "sampling", "top_k_top_p_filter": "sampling"}


@dataclasses.dataclass(frozen=True)
class Case:
    op: str
    params: dict
    device: str = "cpu"

    @property
    def id(self) -> str:
        return "-".join(f"{k}={v}" for k, v in self.params.items())


def module(op: str):
    return importlib.import_module(f"fastlm.cases.{_MODULE[op]}")


def cases(op: str, device: str, full: bool = False) -> list[Case]:
    return [c for c in module(op).cases(device, full) if c.op == op]


def check(case: Case, backend: str) -> dict[str, float]:
    return module(case.op).check(case, backend)
