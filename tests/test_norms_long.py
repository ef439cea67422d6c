"""Long rows (N > 16384, the chunked paths) of LayerNorm and RMSNorm on both backends: the case
check (outputs and every gradient by the tolerance rule), large-mean inputs that a naive
E[x^2] - E[x]^2 variance fails, NaN-poisoned outputs fully written, and the pass-count bound of
the forward (x read at most twice per row; the residual once, h written in pass 1 and re-read).

M is 2-3 rows: the interpreter and the host tier are slow."""

import pytest
import torch
from conftest import DEVICE, kernel_backends

import fastlm
from fastlm import cases
from fastlm.cases import Case
from fastlm.testing import assert_all_written, poison_like

BACKENDS = kernel_backends()

# (op, n, dtype, weight, bias, residual, shift): a covering set of the flags at the three lengths;
# shift 1e3 with scale 1 is the large-mean input (mean 1e3, std 1).
LONG = [
    ("layer_norm", 16385, "float32", "same", True, True, 1e3),
    ("layer_norm", 32775, "float16", "fp32", True, False, 1e3),
    ("layer_norm", 32775, "float32", "same", False, False, 1e3),
    ("layer_norm", 65536, "float32", "none", False, False, 0.5),
    ("layer_norm", 65536, "float16", "same", True, True, 0.5),
    ("rms_norm", 16385, "float16", "none", False, True, 0.5),
    ("rms_norm", 32775, "float32", "same", False, False, 1e3),
    ("rms_norm", 65536, "float32", "fp32", False, True, 0.5),
    ("rms_norm", 65536, "float16", "same", False, False, 0.5),
]
# bf16 arithmetic is wrong in the Triton interpreter; the CUDA host tier runs it.
LONG_BF16 = [
    ("layer_norm", 32775, "bfloat16", "same", True, True, 1e3),
    ("rms_norm", 65536, "bfloat16", "fp32", False, False, 0.5),
]


def _case(op, n, dtype, weight, bias, residual, shift):
    scale = 1.0 if shift == 1e3 else 2.0
    params = dict(lead=(2,), n=n, dtype=dtype, weight=weight, bias=bias, residual=residual, shift=shift, scale=scale)
    return Case(op, params, DEVICE)


def _grid():
    out = [pytest.param(b, c, id=f"{b}-{c[0]}-{c[1]}-{c[2]}-w{c[3]}-b{int(c[4])}-r{int(c[5])}-s{c[6]:g}")
           for b in BACKENDS for c in LONG]
    for c in LONG_BF16:
        if "cuda" in BACKENDS or DEVICE == "cuda":
            for b in BACKENDS if DEVICE == "cuda" else ["cuda"]:
                out.append(pytest.param(b, c, id=f"{b}-{c[0]}-{c[1]}-{c[2]}-w{c[3]}-b{int(c[4])}-r{int(c[5])}-s{c[6]:g}"))
    return out


@pytest.mark.parametrize(("backend", "spec"), _grid())
def test_long_rows_match_reference(backend, spec):
    """y (and h), dx, dweight, dbias, dresidual against the float64 truth by the tolerance rule."""
    cases.check(_case(*spec), backend)


def _stats_truth(h: torch.Tensor, is_rms: bool):
    h = h.double()
    if is_rms:
        return None, torch.rsqrt(h.pow(2).mean(-1) + 1e-5)
    return h.mean(-1), torch.rsqrt(h.var(-1, unbiased=False) + 1e-5)


@pytest.mark.sanitize
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("is_rms", [False, True])
@pytest.mark.parametrize("n", [16385, 32775])
def test_long_rows_write_every_output(backend, is_rms, n):
    """NaN-poisoned y, h, mean, rstd, dx, dweight, dbias are fully written; on a large-mean row
    (mean 1e3, std 1) mean and rstd are fp32-accurate, where E[x^2] - E[x]^2 in fp32 loses about
    1e6 * 2^-24 of a unit variance."""
    mod = fastlm.ops._common.launcher(backend, "layer_norm")
    M = 3
    x = torch.randn(M, n, device=DEVICE) + 1e3
    r = torch.randn(M, n, device=DEVICE)
    w, b = torch.randn(n, device=DEVICE), torch.randn(n, device=DEVICE)
    y, h = poison_like(x), poison_like(x)
    mean = None if is_rms else torch.full((M,), float("nan"), device=DEVICE)
    rstd = torch.full((M,), float("nan"), device=DEVICE)
    mod.layer_norm_fwd(x, r, w, None if is_rms else b, 1e-5, is_rms, y, h, mean, rstd)
    for name, t in dict(y=y, h=h, mean=mean, rstd=rstd).items():
        if t is not None:
            assert_all_written(t, name)
    assert torch.equal(h, x + r)
    mean_t, rstd_t = _stats_truth(h, is_rms)
    if not is_rms:
        assert (mean.double() - mean_t).abs().max() <= 1e3 * 2**-20, (mean, mean_t)
    assert ((rstd.double() - rstd_t) / rstd_t).abs().max() <= 2**-18, (rstd, rstd_t)
    dy, dh = torch.randn_like(x), torch.randn_like(x)
    dx, dw = poison_like(x), poison_like(w)
    db = None if is_rms else poison_like(b)
    mod.layer_norm_bwd(dy, dh, h, w, mean, rstd, is_rms, dx, dw, db)
    for name, t in dict(dx=dx, dweight=dw, dbias=db).items():
        if t is not None:
            assert_all_written(t, name)


def _loads(backend, x, r, is_rms):
    """[elements of the row stream (x, and h when re-read), elements of the residual] the forward
    loaded: the Triton kernel's COUNT_LOADS counter, or the host tier's probe in csrc."""
    M, N = x.shape
    y = torch.empty_like(x)
    h = torch.empty_like(x) if r is not None else None
    mean = None if is_rms else torch.empty(M, device=x.device)
    rstd = torch.empty(M, device=x.device)
    if backend == "triton":
        from fastlm.triton import layer_norm as LN

        loads = torch.zeros(M, 3, dtype=torch.int32, device=x.device)
        LN.layer_norm_fwd(x, r, None, None, 1e-5, is_rms, y, h, mean, rstd, loads=loads)
        per = loads.sum(0).tolist()
        return [per[0] + per[2], per[1]]
    from fastlm.cuda import layer_norm as CL
    from fastlm.cuda import lib

    C = lib(x.device)
    C.layer_norm_fwd_host_loads()
    CL.layer_norm_fwd(x, r, None, None, 1e-5, is_rms, y, h, mean, rstd)
    return list(C.layer_norm_fwd_host_loads())


@pytest.mark.skipif(DEVICE != "cpu", reason="the load counters run in the interpreter and the host tier")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("is_rms", [False, True])
def test_forward_reads_a_long_row_at_most_twice(backend, residual, is_rms):
    """Pass count: a one-tile row (N = 4096) is read exactly once; a long row (N = 65536 + 8, odd
    tile count, and 32775, the scalar path) at most twice: x (or x then h) and the residual once."""
    for n in (4096, 65544, 32775):
        x = torch.randn(2, n)
        r = torch.randn(2, n) if residual else None
        stream, res = _loads(backend, x, r, is_rms)
        assert res == (x.numel() if residual else 0), (n, res)
        if n == 4096:
            assert stream == x.numel(), (n, stream)
        else:
            assert stream == 2 * x.numel(), (n, stream)


@pytest.mark.parametrize("sm_count", [None, 108, 132])
@pytest.mark.parametrize("M, N", [(1, 16385), (3, 65536), (8192, 32768), (2**20, 65536)])
def test_long_row_backward_plan(sm_count, M, N):
    """The long-row dx kernel's grid covers every (column block, row) once: column blocks of
    BWD_BLOCK_N, row groups of rows_per_program (none empty), grid y within 65535."""
    from fastlm.triton import layer_norm as LN

    col_blocks, groups, rows = LN._bwd_long_plan(M, N, sm_count)
    assert (col_blocks - 1) * LN.BWD_BLOCK_N < N <= col_blocks * LN.BWD_BLOCK_N
    assert (groups - 1) * rows < M <= groups * rows and groups <= 65535
    assert col_blocks * groups < (4 if sm_count is None else 2 * sm_count) + col_blocks


def test_compile_plan_covers_long_rows():
    """The compile tier compiles N = 32768 and 65536 in every long-row kernel (fwd, dots, dx)."""
    from fastlm.audit import triton_kernels

    plans = triton_kernels.layer_norm_plans()
    for n in (32768, 65536):
        got = {p.name for p in plans if p.config.startswith(f"N={n} ")}
        assert got == {"_layer_norm_fwd_kernel", "_layer_norm_bwd_dots_kernel", "_layer_norm_bwd_dx_kernel"}, (n, got)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("is_rms", [False, True])
def test_long_rows_in_place(backend, is_rms):
    """h may be x and y the residual (the in-place residual stream) on the two-pass path: pass 1
    writes h over x after reading it, pass 2 reads h only; the results equal separate buffers."""
    mod = fastlm.ops._common.launcher(backend, "layer_norm")
    M, n = 2, 32776
    x = torch.randn(M, n, device=DEVICE) * 3 + 50
    r = torch.randn(M, n, device=DEVICE)
    w, b = torch.randn(n, device=DEVICE), torch.randn(n, device=DEVICE)
    stats = lambda: (None if is_rms else torch.empty(M, device=DEVICE), torch.empty(M, device=DEVICE))
    y, h = torch.empty_like(x), torch.empty_like(x)
    mean, rstd = stats()
    mod.layer_norm_fwd(x, r, w, b, 1e-5, is_rms, y, h, mean, rstd)
    x2, r2 = x.clone(), r.clone()
    mean2, rstd2 = stats()
    mod.layer_norm_fwd(x2, r2, w, b, 1e-5, is_rms, r2, x2, mean2, rstd2)
    assert torch.equal(x2, h) and torch.equal(r2, y) and torch.equal(rstd2, rstd)
