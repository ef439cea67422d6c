"""fastlm._C: the build imports and reports itself, launchers fail with CUDA error codes (not crashes)
where there is no GPU, and, on a GPU, the LayerNorm/RMSNorm launchers match a float64 computation.

The first group needs no GPU (CI builds _C with nvcc and imports it on every run); the `gpu` class
runs in `make gpu-check`.
"""

from __future__ import annotations

import pytest
import torch

import fastlm.cuda as fcuda
from fastlm.reference import layer_norm as ref
from fastlm.testing import assert_all_written, assert_close, poison_like

CUDA_ERROR_INVALID_VALUE = 1




def _null_fwd(C, M=1, N=1):
    return C.layer_norm_fwd(0, 0, 0, 0, 0, 0, 0, 0, M, N, N, N, N, N, 1e-5, False, 0, 0, 0)


def test_extension_imports(C):
    assert hasattr(C, "layer_norm_fwd") and hasattr(C, "layer_norm_bwd")
    assert not hasattr(C, "EMULATION"), "fastlm._C is the nvcc build; only fastlm._C_host is the emulation"


def test_built_archs(C):
    archs = C.built_archs()
    assert archs and all(isinstance(a, str) and a[:2].isdigit() for a in archs), archs


def test_runtime_info(C):
    assert C.cuda_runtime_version() >= 11000
    n = C.device_count()
    assert isinstance(n, int) and n >= 0


def test_error_string(C):
    assert C.error_string(0) == "no error"
    assert C.error_string(CUDA_ERROR_INVALID_VALUE) == "invalid argument"


def test_bad_arguments_return_invalid_value(C):
    assert _null_fwd(C) == CUDA_ERROR_INVALID_VALUE
    assert _null_fwd(C, M=-1) == CUDA_ERROR_INVALID_VALUE
    assert C.layer_norm_bwd(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, False, 0, 0, 0) == CUDA_ERROR_INVALID_VALUE
    fake = 1 << 20  # never dereferenced: the dtype pair is rejected first
    assert C.layer_norm_fwd(fake, 0, 0, 0, fake, 0, 0, fake, 1, 1, 1, 1, 1, 1, 1e-5, False, 0, 2, 0) == (
        CUDA_ERROR_INVALID_VALUE
    )


def test_empty_sizes_launch_nothing(C):
    assert _null_fwd(C, M=0, N=5) == 0
    assert _null_fwd(C, M=5, N=0) == 0
    assert C.layer_norm_bwd(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5, 5, 5, 5, 5, False, 0, 0, 0) == 0
    assert C.layer_norm_bwd_workspace_size(0, 5) == 0


def test_check_raises_with_cuda_error_string(C):
    code = _null_fwd(C)
    with pytest.raises(RuntimeError, match=r"layer_norm_fwd failed: CUDA error 1 \(invalid argument\)"):
        fcuda.check(code, "layer_norm_fwd")
    fcuda.check(0, "layer_norm_fwd")


def test_launch_without_gpu_returns_error_code(C):
    if C.device_count() > 0:
        pytest.skip("a CUDA device is present: a launch would run (the GPU tests cover that)")
    fake = 1 << 20  # well-formed arguments; with no device the launch fails before any access
    code = C.layer_norm_fwd(fake, 0, 0, 0, fake, 0, 0, fake, 1, 1, 1, 1, 1, 1, 1e-5, False, 0, 0, 0)
    assert code != 0
    msg = C.error_string(code)
    assert msg and msg != "no error"
    with pytest.raises(RuntimeError, match=f"CUDA error {code}"):
        fcuda.check(code, "layer_norm_fwd")
    assert C.layer_norm_bwd_workspace_size(4, 4) == -1


def test_python_launchers_reject_other_devices():
    """CUDA tensors run on fastlm._C, CPU tensors on fastlm._C_host (BackendUnavailableError where it
    is not built); any other device is a ValueError."""
    from fastlm.cuda import layer_norm as cln

    x = torch.randn(3, 8, device="meta")
    with pytest.raises(ValueError, match="CUDA tensors .* or CPU tensors .*, got meta"):
        cln.layer_norm_fwd(x, None, None, None, 1e-5, False, torch.empty_like(x), None, None, torch.empty(3, device="meta"))
    with pytest.raises(ValueError, match="CUDA tensors .* or CPU tensors .*, got meta"):
        cln.layer_norm_bwd(x, None, x, None, None, torch.empty(3, device="meta"), True, torch.empty_like(x), None, None)
    if fcuda.load_error("cpu"):
        x = torch.randn(3, 8)
        with pytest.raises(fcuda.BackendUnavailableError, match="fastlm._C_host is not built"):
            cln.layer_norm_fwd(x, None, None, None, 1e-5, False, torch.empty_like(x), None, None, torch.empty(3))


# ---------------------------------------------------------------------------------------------
# On a GPU: the launchers against float64 on CUDA tensors.

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NS = [1, 7, 97, 1023, 1025, 4096, 8192, 65536, 70000]
MS = [1, 3, 260]
VARIANTS = [
    pytest.param(dtype, residual, rms, w_fp32, bias,
                 id=f"{str(dtype)[6:]}-res{int(residual)}-{'rms' if rms else 'ln'}-w{'32' if w_fp32 else 'x'}-b{int(bias)}")
    for dtype in DTYPES
    for residual in (False, True)
    for rms in (False, True)
    for w_fp32 in ((False,) if dtype == torch.float32 else (False, True))
    for bias in (False, True)
]


def _truth(x, r, w, b, eps, rms):
    """float64 forward: (y, h, mean, rstd) with h = x + r exact."""
    h = x.double() + (r.double() if r is not None else 0)
    mean = h.mean(-1)
    c = h if rms else h - mean[:, None]
    rstd = torch.rsqrt(c.square().mean(-1) + eps)
    y = c * rstd[:, None]
    if w is not None:
        y = y * w.double()
    if b is not None:
        y = y + b.double()
    return y, h, mean, rstd


def _torch_same_dtype(x, r, w, b, eps, rms):
    """The reference computation in the kernel's dtype (the noise floor): h rounded to that dtype,
    fp32 statistics and arithmetic, y rounded once, as fastlm.reference does."""
    h = ((x.float() + r.float()).to(x.dtype)) if r is not None else x
    hf = h.float()
    mean = hf.mean(-1)
    c = hf if rms else hf - mean[:, None]
    rstd = torch.rsqrt(c.square().mean(-1) + eps)
    y = c * rstd[:, None] * w.float()
    if b is not None:
        y = y + b.float()
    return y.to(x.dtype), h, mean, rstd


def _grads(x, w, b, dy, dh, eps, rms, dtype):
    """Gradients of the norm of x (the normalized input) w.r.t. x, w, b, in `dtype` arithmetic
    (float64: the truth) with statistics in max(dtype, fp32) like the reference."""
    xd = x.to(dtype).detach().requires_grad_(True)
    wd = w.to(dtype if dtype == torch.float64 else w.dtype).detach().requires_grad_(True) if w is not None else None
    bd = b.to(dtype if dtype == torch.float64 else b.dtype).detach().requires_grad_(True) if b is not None else None
    if rms:
        y = ref.rms_norm(xd, (x.shape[-1],), wd, eps)
        if bd is not None:
            y = y + bd.to(y.dtype)
    else:
        y = ref.layer_norm(xd, (x.shape[-1],), wd, bd, eps)
    y.backward(dy.to(y.dtype))
    dx = xd.grad + (dh.to(dtype) if dh is not None else 0)
    return dx, (wd.grad if wd is not None else None), (bd.grad if bd is not None else None)


@pytest.mark.gpu
class TestLayerNormLaunchersOnGPU:
    @pytest.mark.slow
    @pytest.mark.parametrize("M", MS)
    @pytest.mark.parametrize("N", NS)
    @pytest.mark.parametrize("dtype,residual,rms,w_fp32,has_b", VARIANTS)
    def test_fwd_bwd_match_float64(self, C, dtype, residual, rms, w_fp32, has_b, N, M):
        from fastlm.cuda import layer_norm as cln

        dev, eps = "cuda", 1e-5
        wdt = torch.float32 if w_fp32 else dtype
        x = (torch.randn(M, N, device=dev) + 2.0).to(dtype)
        r = torch.randn(M, N, device=dev, dtype=dtype) if residual else None
        w = (1 + 0.5 * torch.randn(N, device=dev)).to(wdt)
        b = (0.5 * torch.randn(N, device=dev)).to(wdt) if has_b else None

        y, h = poison_like(x), (poison_like(x) if residual else None)
        mean = None if rms else torch.full((M,), float("nan"), device=dev)
        rstd = torch.full((M,), float("nan"), device=dev)
        x0, r0 = x.clone(), (r.clone() if r is not None else None)
        cln.layer_norm_fwd(x, r, w, b, eps, rms, y, h, mean, rstd)
        torch.cuda.synchronize()
        assert torch.equal(x, x0) and (r is None or torch.equal(r, r0)), "inputs were modified"

        y_t, h_t, mean_t, rstd_t = _truth(x, r, w, b, eps, rms)
        y_b, h_b, mean_b, rstd_b = _torch_same_dtype(x, r, w, b, eps, rms)
        for name, t in dict(y=y, h=h, mean=mean, rstd=rstd).items():
            if t is not None:
                assert_all_written(t, name)
        assert_close(y, y_t, y_b, name="y")
        if residual:
            assert torch.equal(h, h_b), "h must be x + residual rounded to the input dtype"
        # fp32 statistics: atol relative to their size (rstd = 1/sqrt(eps) ~ 316 for N=1 LayerNorm rows)
        if not rms:
            assert_close(mean, mean_t, mean_b, name="mean", atol=1e-5 * max(1.0, float(mean_t.abs().max())))
        assert_close(rstd, rstd_t, rstd_b, name="rstd", atol=1e-5 * max(1.0, float(rstd_t.abs().max())))

        xin = h if residual else x
        dy = torch.randn(M, N, device=dev, dtype=dtype)
        dh = torch.randn(M, N, device=dev, dtype=dtype) if residual else None
        dx, dw = poison_like(x), poison_like(w)
        db = poison_like(w) if has_b else None
        cln.layer_norm_bwd(dy, dh, xin, w, mean, rstd, rms, dx, dw, db)
        torch.cuda.synchronize()
        for name, t in dict(dx=dx, dweight=dw, dbias=db).items():
            if t is not None:
                assert_all_written(t, name)
        dx_t, dw_t, db_t = _grads(xin, w, b, dy, dh, eps, rms, torch.float64)
        dx_b, dw_b, db_b = _grads(xin, w, b, dy, dh, eps, rms, dtype)
        assert_close(dx, dx_t, dx_b.to(dtype), name="dx")
        assert_close(dw, dw_t, dw_b, name="dweight")
        if has_b:
            assert_close(db, db_t, db_b, name="dbias")

    @pytest.mark.sanitize
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("layout", ["padded", "misaligned"])
    def test_strided_rows_match_contiguous(self, C, dtype, layout):
        """Padded row strides (vector path) and a 1-element offset (scalar path) give the same bits."""
        from fastlm.cuda import layer_norm as cln

        M, N, dev = 37, 4096, "cuda"
        base = torch.randn(M, N + 8, device=dev).to(dtype)
        x = base[:, :N] if layout == "padded" else base.view(-1)[1 : 1 + M * N].view(M, N)
        xc = x.contiguous()
        w = torch.randn(N, device=dev, dtype=dtype)
        b = torch.randn(N, device=dev, dtype=dtype)
        outs = []
        for inp in (x, xc):
            y, mean, rstd = torch.empty_like(xc), torch.empty(M, device=dev), torch.empty(M, device=dev)
            cln.layer_norm_fwd(inp, None, w, b, 1e-5, False, y, None, mean, rstd)
            dy = torch.randn(M, N, device=dev, generator=torch.Generator(dev).manual_seed(1)).to(dtype)
            dx, dw, db = torch.empty_like(xc), torch.empty_like(w), torch.empty_like(b)
            cln.layer_norm_bwd(dy, None, inp, w, mean, rstd, False, dx, dw, db)
            outs.append((y, mean, rstd, dx, dw, db))
        exact = dict(rtol=0, atol=0) if layout == "padded" else {}  # the scalar path sums in another order
        for a, c in zip(*outs, strict=True):
            torch.testing.assert_close(a, c, **exact)

    @pytest.mark.parametrize("N", [1024, 16384, 70000])
    def test_backward_is_deterministic(self, C, N):
        from fastlm.cuda import layer_norm as cln

        M, dev, dtype = 3000, "cuda", torch.bfloat16
        x = torch.randn(M, N, device=dev, dtype=dtype)
        w = torch.randn(N, device=dev, dtype=torch.float32)
        b = torch.randn(N, device=dev, dtype=torch.float32)
        y, mean, rstd = torch.empty_like(x), torch.empty(M, device=dev), torch.empty(M, device=dev)
        cln.layer_norm_fwd(x, None, w, b, 1e-5, False, y, None, mean, rstd)
        dy = torch.randn_like(x)
        first = None
        for _ in range(10):
            dx, dw, db = torch.empty_like(x), torch.empty_like(w), torch.empty_like(b)
            cln.layer_norm_bwd(dy, None, x, w, mean, rstd, False, dx, dw, db)
            if first is None:
                first = (dx, dw, db)
            else:
                for a, c in zip(first, (dx, dw, db), strict=True):
                    assert torch.equal(a, c)

    @pytest.mark.sanitize
    def test_in_place_outputs(self, C):
        """y into x's buffer and h into residual's give the out-of-place results."""
        from fastlm.cuda import layer_norm as cln

        M, N, dev = 5, 20000, "cuda"
        x = torch.randn(M, N, device=dev, dtype=torch.bfloat16)
        r = torch.randn_like(x)
        w = torch.randn(N, device=dev, dtype=torch.bfloat16)
        y, h, rstd = torch.empty_like(x), torch.empty_like(x), torch.empty(M, device=dev)
        cln.layer_norm_fwd(x, r, w, None, 1e-6, True, y, h, None, rstd)
        x2, r2 = x.clone(), r.clone()
        cln.layer_norm_fwd(x2, r2, w, None, 1e-6, True, x2, r2, None, torch.empty(M, device=dev))
        assert torch.equal(x2, y) and torch.equal(r2, h)

    def test_on_a_non_default_stream(self, C):
        from fastlm.cuda import layer_norm as cln

        M, N, dev = 64, 4096, "cuda"
        x = torch.randn(M, N, device=dev, dtype=torch.float16)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            y, rstd = torch.empty_like(x), torch.empty(M, device=dev)
            cln.layer_norm_fwd(x, None, None, None, 1e-5, True, y, None, None, rstd)
        torch.cuda.current_stream().wait_stream(s)
        torch.testing.assert_close(y, ref.rms_norm(x, (N,), None, 1e-5))
