"""fastlm.cuda on CPU tensors: ``lib("cpu")`` serves fastlm._C_host, ``ptr`` registers each CPU
tensor's extent for the next call (so the sanitizer sees an out-of-bounds global access, named by
the tensor it misses), ``check`` turns the sanitizer's codes into SanitizerError, and the launchers
never touch torch.cuda for CPU tensors."""

from __future__ import annotations

import pytest
import torch

import fastlm
import fastlm.cuda as fcuda
from fastlm.cuda import attention as cattn
from fastlm.ops._common import launcher
from fastlm.reference import attention as ref
from fastlm.testing import assert_close


def _rms_fwd(H, x, y, rstd, M):
    """The raw host launcher: rms_norm of M rows of x (row stride N) into y, through ptr()."""
    N = x.shape[1]
    return H.layer_norm_fwd(fcuda.ptr(x), 0, 0, 0, fcuda.ptr(y), 0, 0, fcuda.ptr(rstd), M, N, x.stride(0), 0,
                            y.stride(0), 0, 1e-5, True, 0, 0, 0)


def test_extent_spans_every_element_of_a_strided_view():
    base = torch.empty(2, 4, 8, 16, dtype=torch.float16)
    view = base[:, :, ::2]  # strides (512, 128, 32, 1): the last element is 1007 elements in
    fcuda._pending.extents.clear()
    fcuda.ptr(base)
    fcuda.ptr(view)
    fcuda.ptr(torch.empty(0, 3))  # no elements: nothing to register
    fcuda.ptr(None)
    assert fcuda._pending.extents == [
        (base.data_ptr(), base.numel() * 2, "float16[2, 4, 8, 16] #0"),
        (view.data_ptr(), 1008 * 2, "float16[2, 4, 4, 16] #1"),
    ]
    fcuda._pending.extents.clear()


def test_out_of_bounds_store_is_a_sanitizer_error_naming_the_tensor(C_host):
    x, rstd = torch.randn(4, 64), torch.empty(4)
    short = torch.empty(2, 64)
    code = _rms_fwd(C_host, x, short, rstd, 4)
    assert code == 700
    with pytest.raises(fcuda.SanitizerError, match=r"(?s)CUDA error 700.*out-of-bounds global store.*float32\[2, 64\] #1") as info:
        fcuda.check(code, "layer_norm_fwd")
    assert info.value.code == 700 and "layer_norm_fwd" in info.value.report
    assert fcuda._pending.extents == []
    # positive control: the same launch into a big enough strided view passes (its extent spans the rows)
    y = torch.empty(4, 128)[:, :64]
    code = _rms_fwd(C_host, x, y, rstd, 4)
    fcuda.check(code, "layer_norm_fwd")
    rms = torch.nn.functional.rms_norm
    assert_close(y, rms(x.double(), (64,), eps=1e-5), rms(x, (64,), eps=1e-5), name="y")


def test_invalid_arguments_are_a_runtime_error_not_a_sanitizer_error(C_host):
    code = C_host.layer_norm_fwd(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1e-5, False, 0, 0, 0)
    assert code == 1
    with pytest.raises(RuntimeError, match=r"CUDA error 1 \(invalid argument\)") as info:
        fcuda.check(code, "layer_norm_fwd")
    assert not isinstance(info.value, fcuda.SanitizerError)


def test_modules_per_device(C_host):
    assert fcuda.load_error("cpu") is None
    assert fcuda.lib("cpu").EMULATION is True and list(fcuda.lib("cpu").built_archs()) == ["host"]
    assert fastlm.backend.why_unavailable("cuda", "cpu") is None
    assert fastlm.backend.why_unavailable("cuda") is None
    assert "cuda" in fastlm.available_backends("cpu")
    assert fcuda.stream_handle(torch.empty(1)) == 0
    with pytest.raises(fastlm.BackendUnavailableError, match="CUDA tensors .* and on CPU tensors .*, got meta tensors"):
        fcuda.lib("meta")
    assert "got meta tensors" in fastlm.backend.why_unavailable("cuda", "meta")


def test_decode_splits_follow_the_emulated_sm_count(C_host):
    before = C_host.emulation_sm_count()
    try:
        C_host.emulation_set_sm_count(4)
        assert cattn.num_splits_for(1, 1, 10_000, torch.device("cpu")) == 8  # 2 * 4 SMs / 1 block
        C_host.emulation_set_sm_count(132)
        assert cattn.num_splits_for(1, 1, 10_000, torch.device("cpu")) == 64
    finally:
        C_host.emulation_set_sm_count(before)


def _attention_case(dtype):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 33, 80, generator=g).to(dtype) for _ in range(3))
    return q, k, v


def test_triton_fallback_on_cpu_needs_the_interpreter(C_host, monkeypatch):
    q, k, v = _attention_case(torch.float32)  # fp32, head dim 80: a Triton case
    assert not cattn.fwd_runs_cuda(q, k, v, True, -1, -1, q)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(fastlm.BackendUnavailableError, match="TRITON_INTERPRET=1"):
        cattn.attention_fwd(q, k, v, True, 80**-0.5, -1, -1, torch.empty_like(q), torch.empty(1, 2, 33))


def test_bf16_triton_fallback_on_cpu_matches_the_reference(C_host):
    """The interpreter's bf16 arithmetic is wrong: the cuda launchers run a bf16 Triton fallback on
    fp32 copies (forward and backward), within the tolerance rule of the float64 truth."""
    q, k, v = _attention_case(torch.bfloat16)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = fastlm.ops.attention(*leaves, causal=True, backend="cuda")
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    grads = torch.autograd.grad(out, leaves, do)
    truth_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    truth = ref.attention(*truth_leaves, causal=True)
    truth_grads = torch.autograd.grad(truth, truth_leaves, do.double())
    base_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    base = ref.attention(*base_leaves, causal=True)
    base_grads = torch.autograd.grad(base, base_leaves, do)
    assert_close(out, truth, base, name="out")
    for name, a, t, b in zip(("dq", "dk", "dv"), grads, truth_grads, base_grads, strict=True):
        assert_close(a, t, b, name=name, factor=fastlm.testing.GRAD_FACTOR_ATTENTION)


def test_decode_runs_the_host_kernel_on_cpu(C_host, monkeypatch):
    """fp16 at head dim 64 is a CUDA decode case: it runs fastlm._C_host, not Triton."""
    monkeypatch.setattr(cattn, "_triton", lambda device: pytest.fail("the Triton fallback ran"))
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, 1, 64, generator=g).half()
    kc, vc = (torch.randn(2, 2, 40, 64, generator=g).half() for _ in range(2))
    lens = torch.tensor([40, 7], dtype=torch.int32)
    out, lse = torch.full_like(q, float("nan")), torch.full((2, 4, 1), float("nan"))
    launcher("cuda", "attention").decode_attention_fwd(q, kc, vc, lens, 0.125, -1, -1, out, lse)
    for b, L in enumerate((40, 7)):
        want = ref.attention(q[b : b + 1].double(), kc[b : b + 1, :, :L].double(), vc[b : b + 1, :, :L].double(), scale=0.125,
                             causal=False)
        base = ref.attention(q[b : b + 1], kc[b : b + 1, :, :L], vc[b : b + 1, :, :L], scale=0.125, causal=False)
        assert_close(out[b : b + 1], want, base, name=f"out[{b}]")
