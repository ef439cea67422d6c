"""Backend selection: backend= argument, use_backend, FASTLM_BACKEND, then the default."""

import pytest
import torch
from conftest import DEVICE

import fastlm
from fastlm import backend
from fastlm.triton import layer_norm as tln


def _count_triton_calls(monkeypatch):
    calls = []
    real = tln.layer_norm_fwd
    monkeypatch.setattr(tln, "layer_norm_fwd", lambda *a: (calls.append(1), real(*a))[1])
    return calls


def test_order_argument_then_context_then_env_then_default(monkeypatch):
    x = torch.randn(2, 16, device=DEVICE)
    calls = _count_triton_calls(monkeypatch)
    monkeypatch.delenv("FASTLM_BACKEND", raising=False)
    fastlm.ops.layer_norm(x, (16,), backend="torch")
    assert calls == []
    fastlm.ops.layer_norm(x, (16,), backend="triton")
    assert len(calls) == 1
    with fastlm.use_backend("triton"):
        assert fastlm.current_backend() == "triton"
        fastlm.ops.layer_norm(x, (16,))
        fastlm.ops.layer_norm(x, (16,), backend="torch")  # the argument wins over the context
        with fastlm.use_backend("torch"):
            fastlm.ops.layer_norm(x, (16,))
    assert len(calls) == 2
    monkeypatch.setenv("FASTLM_BACKEND", "torch")
    fastlm.ops.layer_norm(x, (16,))
    assert len(calls) == 2
    with fastlm.use_backend("triton"):  # the context wins over the environment
        fastlm.ops.layer_norm(x, (16,))
    assert len(calls) == 3
    monkeypatch.setenv("FASTLM_BACKEND", "triton")
    fastlm.ops.layer_norm(x, (16,))
    assert len(calls) == 4


def test_default_backend(monkeypatch):
    monkeypatch.delenv("FASTLM_BACKEND", raising=False)
    assert backend.default_backend(torch.device("cpu")) == ("triton" if backend.interpreter_on() else "torch")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert backend.default_backend(torch.device("cpu")) == "torch"
    assert backend.resolve(None, torch.device("cpu"), "layer_norm") == "torch"


def test_available_and_errors(monkeypatch):
    assert "torch" in fastlm.available_backends()
    assert fastlm.available_backends("cpu")[0] == "torch"
    with pytest.raises(ValueError, match="unknown fastlm backend 'jax'"):
        with fastlm.use_backend("jax"):
            pass
    monkeypatch.setenv("FASTLM_BACKEND", "jax")
    with pytest.raises(ValueError, match="FASTLM_BACKEND='jax' is not a fastlm backend"):
        fastlm.ops.layer_norm(torch.randn(2, 4), (4,))
    monkeypatch.delenv("FASTLM_BACKEND")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not torch.cuda.is_available():
        with pytest.raises(fastlm.BackendUnavailableError, match="triton kernels need CUDA tensors.*TRITON_INTERPRET=1"):
            fastlm.ops.layer_norm(torch.randn(2, 4), (4,), backend="triton")
        host_err = fastlm.cuda.load_error("cpu")
        assert ("cuda" in fastlm.available_backends("cpu")) == (host_err is None)
        assert backend.why_unavailable("cuda", "cpu") == host_err


def test_use_backend_is_restored_after_an_exception():
    with pytest.raises(RuntimeError):
        with fastlm.use_backend("torch"):
            raise RuntimeError("boom")
    assert fastlm.current_backend() is None and backend._overrides.stack == []
