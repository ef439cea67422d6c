"""The device guard of fastlm.ops._common.launcher: every launcher the ops reach runs with the device
of its first CUDA tensor argument current, so a model spread over cuda:0..N launches each kernel on
its own tensors' device. On the CPU, a tensor that reports cuda:1 and a recorder in place of
torch.cuda.device show which device each launch ran under."""

from __future__ import annotations

import contextlib
import importlib
import inspect
import re
from pathlib import Path

import pytest
import torch

import fastlm.ops
from fastlm.ops._common import launcher

BACKENDS = ("triton", "cuda")


class _Reports(torch.Tensor):
    """A CPU tensor that says it lives on another device (set by ``on``)."""

    __torch_function__ = torch._C._disabled_torch_function_impl
    _device = torch.device("cpu")

    @property
    def device(self):
        return self._device

    @property
    def is_cuda(self):
        return self._device.type == "cuda"


def on(index: int) -> torch.Tensor:
    t = torch.zeros(2).as_subclass(_Reports)
    t._device = torch.device("cuda", index)
    return t


class _Recorder:
    """Stands in for torch.cuda.device: ``current`` is the innermost device entered (None outside)."""

    def __init__(self):
        self.stack: list[torch.device] = []
        self.entered: list[torch.device] = []

    @property
    def current(self):
        return self.stack[-1] if self.stack else None

    @contextlib.contextmanager
    def __call__(self, device):
        self.entered.append(torch.device(device))
        self.stack.append(torch.device(device))
        try:
            yield
        finally:
            self.stack.pop()


@pytest.fixture
def recorder(monkeypatch):
    rec = _Recorder()
    monkeypatch.setattr(torch.cuda, "device", rec)
    return rec


def _called_by_ops() -> set[tuple[str, str]]:
    """(module, function) for every ``launcher(backend, "module").function`` in fastlm/ops."""
    pairs = set()
    for path in Path(fastlm.ops.__file__).parent.glob("*.py"):
        text = path.read_text()
        found = re.findall(r'launcher\(backend, "(\w+)"\)\s*\.\s*(\w+)', text)
        calls = len(re.findall(r"(?<![\w.])launcher\(", text)) - len(re.findall(r"def launcher\(", text))
        assert calls == len(found), f"{path.name}: a launcher(...) use this test does not enumerate"
        pairs |= set(found)
    return pairs


OPS_LAUNCHERS = sorted(_called_by_ops())
MODULES = sorted({m for m, _ in OPS_LAUNCHERS})


def _public_functions(backend: str, module: str) -> list[str]:
    """The public functions of fastlm.<backend>.<module> defined in the backend's kernel modules
    (launchers and their helpers; fastlm.cuda's pointer/stream utilities and names imported from
    outside the backend are left out)."""
    mod = importlib.import_module(f"fastlm.{backend}.{module}")
    return sorted(
        name for name, fn in inspect.getmembers(mod, inspect.isfunction)
        if not name.startswith("_") and fn.__module__.startswith(f"fastlm.{backend}.")
    )


CASES = [(b, m, f) for b in BACKENDS for m in MODULES for f in _public_functions(b, m)]


def test_the_ops_launchers_are_enumerated():
    """Every launcher the ops call exists in both backends and is among the functions tested below."""
    assert len(OPS_LAUNCHERS) >= 13, OPS_LAUNCHERS  # attention 3, norms 2, rotary 4, sinusoidal 3, sampling 2
    assert {"attention", "layer_norm", "rotary", "sinusoidal", "sampling"} <= set(MODULES)
    for b in BACKENDS:
        for m, f in OPS_LAUNCHERS:
            assert (b, m, f) in CASES, f"fastlm.{b}.{m}.{f}"


@pytest.mark.parametrize("backend, module, name", CASES)
def test_launcher_runs_under_its_tensors_device(monkeypatch, recorder, backend, module, name):
    """The stubbed launcher runs inside torch.cuda.device(cuda:1), the device of the first CUDA tensor
    (positional, then keyword): a CPU tensor before it and a cuda:2 tensor after it are passed over."""
    mod = importlib.import_module(f"fastlm.{backend}.{module}")
    seen = []

    def stub(*args, **kwargs):
        seen.append(recorder.current)
        return "result"

    monkeypatch.setattr(mod, name, stub)
    fn = getattr(launcher(backend, module), name)
    assert fn(torch.zeros(1), 3, on(1), on(2), out=on(2)) == "result"
    assert fn(torch.zeros(1), None, x=on(1), y=on(2)) == "result"
    assert seen == [torch.device("cuda", 1)] * 2
    assert recorder.stack == []


@pytest.mark.parametrize("backend, module, name", [c for c in CASES if c[1:] in OPS_LAUNCHERS])
def test_cpu_tensors_enter_no_guard(monkeypatch, recorder, backend, module, name):
    """Positive control: with only CPU tensors (the interpreter path) the launcher is called directly."""
    mod = importlib.import_module(f"fastlm.{backend}.{module}")
    seen = []
    monkeypatch.setattr(mod, name, lambda *a, **k: seen.append((a, k, recorder.current)))
    x = torch.zeros(3)
    getattr(launcher(backend, module), name)(x, 1.5, out=x)
    assert seen == [((x, 1.5), {"out": x}, None)]
    assert recorder.entered == []


def test_nested_guards_restore_the_outer_device(monkeypatch, recorder):
    """A launcher calling another through the guard (CUDA attention's Triton fallback, say) runs the
    inner one under its tensors' device and gets its own device back after it."""
    import fastlm.cuda.attention as ca
    import fastlm.triton.attention as ta

    seen = []
    monkeypatch.setattr(ta, "attention_fwd", lambda *a: seen.append(("inner", recorder.current)))

    def outer(*a):
        seen.append(("outer", recorder.current))
        launcher("triton", "attention").attention_fwd(on(1))
        seen.append(("outer", recorder.current))

    monkeypatch.setattr(ca, "attention_fwd", outer)
    launcher("cuda", "attention").attention_fwd(on(3))
    cuda = lambda i: torch.device("cuda", i)  # noqa: E731
    assert seen == [("outer", cuda(3)), ("inner", cuda(1)), ("outer", cuda(3))]
    assert recorder.stack == []


def test_non_functions_pass_through_unchanged():
    """Constants, Triton kernels and classes read through the guard are the module's own objects."""
    import fastlm.cuda.attention as ca
    import fastlm.triton.rotary as tr

    assert launcher("cuda", "attention").CUDA_COVERAGE == ca.CUDA_COVERAGE
    assert launcher("triton", "rotary")._rotary_kernel is tr._rotary_kernel
    assert launcher("cuda", "attention").BackendUnavailableError is ca.BackendUnavailableError
    assert "rotary_fwd" in dir(launcher("triton", "rotary"))
    with pytest.raises(AttributeError):
        getattr(launcher("triton", "rotary"), "no_such_launcher")  # noqa: B009


def test_patching_through_the_guard_patches_the_module():
    """monkeypatch on launcher(...) (as tests/test_gpt.py does) writes to the module, and undoing it
    restores the module's own function, not a guarded wrapper of it."""
    import fastlm.triton.layer_norm as tln

    original = tln.layer_norm_fwd
    view = launcher("triton", "layer_norm")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(view, "layer_norm_fwd", lambda *a: "patched")
        assert view.layer_norm_fwd(torch.zeros(1)) == "patched"
        assert tln.layer_norm_fwd(torch.zeros(1)) == "patched"
    assert tln.layer_norm_fwd is original
