"""The benchmark registry: what each entry measures, and how.

An Entry describes one op. For a dtype, mode ("fwd", "bwd" or "full") and size preset it yields
Cases; a Case builds its inputs on the device and knows the fewest bytes the op must move and the
FLOPs it must do (performance.md's formulas), so every time becomes GB/s or TFLOP/s and a
percentage of the ceilings measured in the same run. ``impls(case)`` maps an implementation name
to a ``prepare(inputs) -> run`` function: prepare does untimed setup (a forward pass before a
timed backward, say) and returns the closure that is timed, whose return value is validated.
``truth(inputs)`` gives the float64 (or fp32-upcast) reference outputs; ``baseline`` names the
implementation whose error sets the tolerance (torch eager in the same dtype).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

MODES = ("fwd", "bwd", "full")
Prepare = Callable[[dict], Callable[[], Any]]


@dataclasses.dataclass
class Case:
    label: str  # e.g. "M=4096 N=1024"
    size: float  # the x axis of plots (hidden size, sequence length, ...)
    make: Callable[[], dict]  # builds the inputs on the device
    bytes: float = 0.0  # fewest bytes moved (GB/s = bytes / time)
    flops: float = 0.0  # FLOPs (TFLOP/s = flops / time)
    params: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Entry:
    name: str
    metric: str  # "bandwidth" or "flops"
    modes: tuple[str, ...]
    cases: Callable[..., list[Case]]  # cases(dtype, mode, sizes, device, quick) -> [Case]
    impls: Callable[..., dict[str, Prepare]]  # impls(mode, device, backends) -> {name: prepare}
    truth: Callable[..., Any]  # truth(inputs, mode) -> outputs (same structure as run())
    baseline: str = "torch-eager"
    factor: float = 2.0  # tolerance-rule factor for validation
    dtypes: tuple[str, ...] = ("bfloat16", "float16", "float32")
    description: str = ""


REGISTRY: dict[str, Entry] = {}


def register(entry: Entry) -> Entry:
    REGISTRY[entry.name] = entry
    return entry


def fastlm_impls(backends, call: Callable[[str], Prepare]) -> dict[str, Prepare]:
    """{"fastlm-<backend>": call(backend)} for each requested kernel backend."""
    return {f"fastlm-{b}": call(b) for b in backends if b != "torch"}
