import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, kernel_backends

import fastlm
from fastlm import cases
from fastlm.reference import layer_norm as ref
from fastlm.testing import assert_all_written, assert_close, poison_like

BACKENDS = kernel_backends()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", cases.cases("layer_norm", DEVICE) + cases.cases("rms_norm", DEVICE), ids=lambda c: f"{c.op}-{c.id}")
def test_norm_matches_reference(case, backend):
    cases.check(case, backend)


@pytest.mark.sanitize
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("is_rms", [False, True])
@pytest.mark.parametrize("n", [7, 1025, 20000])
def test_launchers_write_every_output(backend, is_rms, n):
    """NaN-poisoned outputs: every element of y, h, mean, rstd, dx, dweight, dbias is written."""
    mod = fastlm.ops._common.launcher(backend, "layer_norm")
    M = 9
    x = torch.randn(M, n, device=DEVICE)
    r = torch.randn(M, n, device=DEVICE)
    w = torch.randn(n, device=DEVICE)
    b = torch.randn(n, device=DEVICE)
    y, h = poison_like(x), poison_like(x)
    mean = None if is_rms else torch.full((M,), float("nan"), device=DEVICE)
    rstd = torch.full((M,), float("nan"), device=DEVICE)
    mod.layer_norm_fwd(x, r, w, None if is_rms else b, 1e-5, is_rms, y, h, mean, rstd)
    for name, t in dict(y=y, h=h, mean=mean, rstd=rstd).items():
        if t is not None:
            assert_all_written(t, name)
    dy, dh = torch.randn_like(x), torch.randn_like(x)
    dx, dw = poison_like(x), poison_like(w)
    db = None if is_rms else poison_like(b)
    mod.layer_norm_bwd(dy, dh, h, w, mean, rstd, is_rms, dx, dw, db)
    for name, t in dict(dx=dx, dweight=dw, dbias=db).items():
        if t is not None:
            assert_all_written(t, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_size(backend):
    x = torch.randn(0, 5, 16, device=DEVICE, requires_grad=True)
    w = torch.randn(16, device=DEVICE, requires_grad=True)
    b = torch.randn(16, device=DEVICE, requires_grad=True)
    y = fastlm.ops.layer_norm(x, (16,), w, b, backend=backend)
    assert y.shape == x.shape
    y.sum().backward()
    assert w.grad.shape == (16,) and torch.equal(w.grad, torch.zeros_like(w))
    assert torch.equal(b.grad, torch.zeros_like(b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_dim_normalized_shape(backend):
    x = torch.randn(3, 4, 5, 6, device=DEVICE)
    w = torch.randn(5, 6, device=DEVICE)
    b = torch.randn(5, 6, device=DEVICE)
    got = fastlm.ops.layer_norm(x, (5, 6), w, b, backend=backend)
    truth = ref.layer_norm(x.double(), (5, 6), w.double(), b.double())
    assert_close(got, truth, F.layer_norm(x, (5, 6), w, b))
    got = fastlm.ops.rms_norm(x, [5, 6], w, backend=backend)
    assert_close(got, ref.rms_norm(x.double(), (5, 6), w.double(), torch.finfo(torch.float32).eps), F.rms_norm(x, (5, 6), w))


@pytest.mark.parametrize("backend", ["torch"] + BACKENDS)
def test_same_results_as_torch_functional(backend):
    """The drop-in promise: torch's signature, defaults (rms eps=None) and results."""
    x = torch.randn(4, 33, device=DEVICE) * 3 + 1
    w = torch.randn(33, device=DEVICE)
    b = torch.randn(33, device=DEVICE)
    torch.testing.assert_close(fastlm.ops.layer_norm(x, [33], w, b, backend=backend), F.layer_norm(x, [33], w, b))
    torch.testing.assert_close(fastlm.ops.layer_norm(x, 33, backend=backend), F.layer_norm(x, [33]))
    torch.testing.assert_close(fastlm.ops.rms_norm(x, [33], w, backend=backend), F.rms_norm(x, [33], w))
    torch.testing.assert_close(fastlm.ops.rms_norm(x, [33], backend=backend), F.rms_norm(x, [33]))


def test_nan_propagates_like_torch():
    """NaN in a row gives NaN in that row only (as torch does); other rows are untouched."""
    for backend in ["torch"] + BACKENDS:
        x = torch.randn(3, 40, device=DEVICE)
        x[1, 5] = float("nan")
        y = fastlm.ops.layer_norm(x, (40,), backend=backend)
        assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2]]).all()


# ---- bad input: each error beside a passing positive control ---------------------------------


def test_errors_wrong_dtype():
    x = torch.randn(2, 8, device=DEVICE)
    fastlm.ops.layer_norm(x, (8,))
    with pytest.raises(TypeError, match="input must have dtype"):
        fastlm.ops.layer_norm(x.to(torch.int32), (8,))
    with pytest.raises(TypeError, match=r"weight must be .*float32"):
        fastlm.ops.layer_norm(x.half(), (8,), torch.randn(8, device=DEVICE, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        fastlm.ops.layer_norm([1.0, 2.0], (2,))
    with pytest.raises(TypeError, match="supports float32, float16 and bfloat16"):
        fastlm.ops.layer_norm(x.double(), (8,), backend="triton")
    fastlm.ops.layer_norm(x.double(), (8,), backend="torch")


def test_errors_wrong_shape():
    x = torch.randn(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"normalized_shape \[4\] must equal the trailing dims of input shape \[2, 8\]"):
        fastlm.ops.layer_norm(x, (4,))
    with pytest.raises(ValueError, match="weight must have shape"):
        fastlm.ops.layer_norm(x, (8,), torch.randn(7, device=DEVICE))
    with pytest.raises(ValueError, match="bias must have shape"):
        fastlm.ops.layer_norm(x, (8,), torch.randn(8, device=DEVICE), torch.randn(2, 8, device=DEVICE))
    with pytest.raises(ValueError, match="residual shape"):
        fastlm.ops.add_rms_norm(x, torch.randn(2, 7, device=DEVICE))
    with pytest.raises(ValueError, match="at least 1 dims"):
        fastlm.ops.rms_norm(torch.tensor(1.0), ())
    with pytest.raises(ValueError, match="eps must be"):
        fastlm.ops.layer_norm(x, (8,), eps=-1.0)
    with pytest.raises(TypeError, match="residual must be a tensor"):
        fastlm.ops.add_layer_norm(x, None)


def test_errors_device_and_backend():
    x = torch.randn(2, 8)
    w = torch.randn(8, device="meta")
    with pytest.raises(ValueError, match="weight is on meta but input is on cpu"):
        fastlm.ops.layer_norm(x, (8,), w)
    if fastlm.cuda.load_error("cpu"):
        with pytest.raises(fastlm.BackendUnavailableError, match="backend 'cuda' is unavailable"):
            fastlm.ops.layer_norm(x, (8,), backend="cuda")
    with pytest.raises(ValueError, match="unknown fastlm backend 'tpu'"):
        fastlm.ops.layer_norm(x, (8,), backend="tpu")


# ---- modules ------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch"] + BACKENDS)
def test_modules_load_torch_state_dict(backend):
    for torch_mod, fast_mod in (
        (torch.nn.LayerNorm(48), fastlm.nn.LayerNorm(48, backend=backend)),
        (torch.nn.LayerNorm((4, 12), bias=False), fastlm.nn.LayerNorm((4, 12), bias=False, backend=backend)),
        (torch.nn.RMSNorm(48, eps=1e-6), fastlm.nn.RMSNorm(48, eps=1e-6, backend=backend)),
        (torch.nn.RMSNorm(48, elementwise_affine=False), fastlm.nn.RMSNorm(48, elementwise_affine=False, backend=backend)),
    ):
        with torch.no_grad():
            for p in torch_mod.parameters():
                p.normal_()
        torch_mod.to(DEVICE)
        fast_mod.to(DEVICE)
        assert fast_mod.state_dict().keys() == torch_mod.state_dict().keys()
        fast_mod.load_state_dict(torch_mod.state_dict())
        x = torch.randn(3, *torch_mod.normalized_shape, device=DEVICE)
        torch.testing.assert_close(fast_mod(x), torch_mod(x))


# ---- torch integration --------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    x = torch.randn(5, 24, device=DEVICE, requires_grad=True)
    r = torch.randn(5, 24, device=DEVICE, requires_grad=True)
    w = torch.randn(24, device=DEVICE, requires_grad=True)
    b = torch.randn(24, device=DEVICE, requires_grad=True)
    for args in ((x, None, w, b, 1e-5, False, backend), (x, r, w, None, 1e-6, True, backend), (x, None, None, None, 1e-5, False, backend)):
        torch.library.opcheck(torch.ops.fastlm.layer_norm_fwd.default, args)
    mean, rstd = torch.randn(5, device=DEVICE), torch.rand(5, device=DEVICE) + 0.5
    dy = torch.randn(5, 24, device=DEVICE)
    torch.library.opcheck(
        torch.ops.fastlm.layer_norm_bwd.default, (dy, dy.clone(), x.detach(), w.detach(), mean, rstd, False, True, backend),
        test_utils=("test_schema", "test_faketensor"),
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    ln = fastlm.nn.LayerNorm(64, backend=backend).to(DEVICE)
    rms = fastlm.nn.RMSNorm(64, backend=backend).to(DEVICE)

    def f(x, r):
        y, h = fastlm.ops.add_rms_norm(x, r, rms.weight, backend=backend)
        return ln(y) + h

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if DEVICE == "cpu" else "inductor")
    x = torch.randn(4, 64, device=DEVICE, requires_grad=True)
    r = torch.randn(4, 64, device=DEVICE)
    out = compiled(x, r)
    torch.testing.assert_close(out, f(x, r))
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
