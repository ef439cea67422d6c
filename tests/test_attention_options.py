"""The attention options (softcap, ALiBi, dropout) in the kernels: attention, attention_varlen, decode_attention.

Truth: the reference (fastlm/reference/attention.py, the contract) in float64 with the same seed;
baseline: the reference in the kernel's dtype. Outputs and LSE by the factor-2 rule, dq, dk, dv by
the attention gradient factor (fastlm.testing). Dropout drops exactly the reference's entries (the
mask is a function of the seed and the packed rows), so it is held to the same rule; its mask is
also read back from the output exactly (v = one-hot rows) and its kept fraction tested
statistically. GQA 4:2, Sq != Sk both ways (a causal Sq > Sk has rows that see no key), windows,
head dims 32 and 80 (fp32, fp16; bf16 only on the GPU: the interpreter's bf16 is wrong).
"""

import math

import pytest
import torch
from conftest import DEVICE, kernel_backends

import fastlm
from fastlm.reference import attention as ref
from fastlm.testing import GRAD_FACTOR_ATTENTION, assert_all_written, assert_close, poison_like

BACKENDS = kernel_backends()
HQ, HKV = 4, 2
SEED = torch.tensor([0x1234_5678_9ABC, 7], dtype=torch.int64, device=DEVICE)
MASKS = {"full": dict(), "causal": dict(causal=True), "window": dict(window=(9, 4)), "causal-window": dict(causal=True, window=(6, -1))}


@pytest.fixture(autouse=True)
def _no_autotune(monkeypatch):
    monkeypatch.setenv("FASTLM_AUTOTUNE", "0")


def _slopes(shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g) * 0.5 + 0.05).to(DEVICE)


def _options(name, batch):
    return {
        "softcap": dict(softcap=2.5),
        "alibi": dict(alibi_slopes=_slopes(HQ)),
        "alibi-batch": dict(alibi_slopes=_slopes((batch, HQ))),
        "dropout": dict(dropout_p=0.3, seed=SEED),
        "all": dict(softcap=1.7, alibi_slopes=_slopes((batch, HQ)), dropout_p=0.2, seed=SEED),
    }[name]


def _rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dtype)


def _run(fn, q, k, v, do, dlse, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = fn(*leaves, return_lse=True, **kw)
    torch.autograd.backward([out, lse], [do.to(out.dtype), dlse.to(lse.dtype)])
    return dict(out=out.detach(), lse=lse.detach(), dq=leaves[0].grad, dk=leaves[1].grad, dv=leaves[2].grad)


def _check(got, truth, base, dtype, what):
    for name in ("out", "lse", "dq", "dk", "dv"):
        factor = GRAD_FACTOR_ATTENTION if name.startswith("d") else 2.0
        assert_close(got[name], truth[name], base[name], name=f"{what} {name}", factor=factor, dtype=dtype)


def _dense_case(b, sq, sk, d, dtype, seed=0):
    q, k, v = _rand(b, HQ, sq, d, dtype=dtype, seed=seed), _rand(b, HKV, sk, d, dtype=dtype, seed=seed + 1), _rand(b, HKV, sk, d, dtype=dtype, seed=seed + 2)
    return q, k, v, _rand(b, HQ, sq, d, dtype=dtype, seed=seed + 3), _rand(b, HQ, sq, seed=seed + 4)


def _check_dense(backend, opts, mask, b, sq, sk, d, dtype):
    q, k, v, do, dlse = _dense_case(b, sq, sk, d, dtype)
    kw = dict(MASKS[mask], **opts)
    got = _run(fastlm.ops.attention, q, k, v, do, dlse, backend=backend, **kw)
    base = _run(ref.attention, q, k, v, do, dlse, **kw)
    truth = _run(ref.attention, q.double(), k.double(), v.double(), do.double(), dlse.double(), **kw)
    _check(got, truth, base, dtype, f"attention {sorted(opts)} {mask}")


# each option alone under one mask, all of them together under three
DENSE = [("softcap", "full"), ("alibi", "causal"), ("alibi-batch", "window"), ("dropout", "causal-window"), ("all", "full"),
         ("all", "causal"), ("all", "window")]


@pytest.mark.parametrize("option,mask", DENSE)
def test_attention_option_matches_reference(option, mask):
    sq, sk = (26, 17) if mask == "causal" else (17, 26)  # causal Sq > Sk: rows that see no key
    b = 2 if option in ("alibi-batch", "all") else 1  # (B, Hq) slopes and the packed rows b Sq + i need a batch
    _check_dense("triton", _options(option, b), mask, b, sq, sk, 32, torch.float32)


@pytest.mark.parametrize("option", ["all"])
def test_attention_option_fp16_head_dim_80(option):
    _check_dense("triton", _options(option, 1), "causal-window", 1, 29, 41, 80, torch.float16)


def test_every_output_element_written():
    q, k, v, do, _ = _dense_case(2, 17, 26, 32, torch.float32)
    from fastlm.triton import attention as A

    opts = dict(softcap=2.0, alibi_slopes=_slopes((2, HQ)), dropout_p=0.25, seed=SEED)
    out, lse = poison_like(q), poison_like(q[..., 0])
    A.attention_fwd(q, k, v, True, 0.2, -1, -1, out, lse, **opts)
    assert_all_written(out, "out")
    dq, dk, dv = poison_like(q), poison_like(k), poison_like(v)
    A.attention_bwd(do, None, q, k, v, out, lse, True, 0.2, -1, -1, dq, dk, dv, **opts)
    for name, t in (("dq", dq), ("dk", dk), ("dv", dv)):
        assert_all_written(t, name)


# ---- varlen --------------------------------------------------------------------------------------


def _cu(lens):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("option", ["alibi", "all"])
def test_varlen_option_matches_reference(option):
    lq, lk = [0, 1, 19, 7, 12], [3, 1, 1, 0, 21]
    d, dtype = 32, torch.float32
    q, k, v = _rand(sum(lq), HQ, d), _rand(sum(lk), HKV, d, seed=1), _rand(sum(lk), HKV, d, seed=2)
    do, dlse = _rand(sum(lq), HQ, d, seed=3), _rand(HQ, sum(lq), seed=4)
    kw = dict(causal=True, window=(8, -1), **_options(option, len(lq)))
    cu = (_cu(lq), _cu(lk))

    def var(*t, **a):
        return fastlm.ops.attention_varlen(*t, *cu, max(lq), max(lk), backend="triton", **a)

    def refv(*t, **a):
        return ref.attention_varlen(*t, *cu, **a)

    got = _run(var, q, k, v, do, dlse, **kw)
    base = _run(refv, q, k, v, do, dlse, **kw)
    truth = _run(refv, q.double(), k.double(), v.double(), do.double(), dlse.double(), **kw)
    _check(got, truth, base, dtype, f"attention_varlen {option}")


def test_varlen_drops_the_entries_of_the_batched_layout():
    """Equal lengths packed (T, H, D) and batched (B, H, S, D): the same seed drops the same entries
    (the mask is by packed row), so the results agree to rounding."""
    b, s, d = 3, 17, 32
    q, k, v = _rand(b, HQ, s, d), _rand(b, HKV, s, d, seed=1), _rand(b, HKV, s, d, seed=2)
    kw = dict(causal=True, dropout_p=0.4, seed=SEED, alibi_slopes=_slopes((b, HQ)), softcap=3.0)
    dense = fastlm.ops.attention(q, k, v, backend="triton", **kw)
    pack = lambda t: t.transpose(1, 2).reshape(b * s, t.shape[1], d)  # noqa: E731
    cu = _cu([s] * b)
    packed = fastlm.ops.attention_varlen(pack(q), pack(k), pack(v), cu, cu, s, s, backend="triton", **kw)
    torch.testing.assert_close(packed, pack(dense), atol=1e-6, rtol=1e-5)


# ---- decode --------------------------------------------------------------------------------------


@pytest.mark.parametrize("option,paged", [("softcap", False), ("alibi", True), ("alibi-batch", False), ("softcap+alibi", True)])
def test_decode_option_matches_reference(option, paged):
    b, sq, s_max, d = 3, 2, 64, 32
    opts = {"softcap": dict(softcap=2.0), "alibi": dict(alibi_slopes=_slopes(HQ)), "alibi-batch": dict(alibi_slopes=_slopes((b, HQ))),
            "softcap+alibi": dict(softcap=1.5, alibi_slopes=_slopes((b, HQ)))}[option]
    q = _rand(b, HQ, sq, d)
    kc, vc = _rand(b, HKV, s_max, d, seed=1), _rand(b, HKV, s_max, d, seed=2)
    lens = torch.tensor([2, 37, 64], dtype=torch.int32, device=DEVICE)
    kw = dict(window=(20, -1), **opts)
    table = None
    if paged:
        ps = 16
        perm = torch.randperm(b * s_max // ps, generator=torch.Generator().manual_seed(3)).to(DEVICE)
        table = perm.view(b, s_max // ps).int()
        kp, vp = torch.empty(b * s_max // ps, HKV, ps, d, device=DEVICE), torch.empty(b * s_max // ps, HKV, ps, d, device=DEVICE)
        for src, dst in ((kc, kp), (vc, vp)):
            dst[perm] = src.view(b, HKV, s_max // ps, ps, d).transpose(1, 2).reshape(-1, HKV, ps, d)
        got = fastlm.ops.decode_attention(q, kp, vp, lens, block_table=table, backend="triton", **kw)
    else:
        got = fastlm.ops.decode_attention(q, kc, vc, lens, backend="triton", **kw)
    base = ref.decode_attention(q, kc, vc, lens, **kw)
    truth = ref.decode_attention(q.double(), kc.double(), vc.double(), lens, **kw)
    assert_close(got, truth, base, name=f"decode {option}", dtype=q.dtype)


# ---- dropout: the mask, reproducibility, p = 0 ---------------------------------------------------


def _kept(out, sk):
    """With v = one-hot rows (v_j = e_j, Sk <= D) and every key visible, O_ij = P_ij keep_ij / (1 - p):
    the kernel's keep mask, read back exactly (P_ij > 0 everywhere)."""
    return out[..., :sk] != 0


def test_dropout_mask_is_the_reference_mask_and_keeps_1_minus_p():
    b, sq, sk, d, p = 2, 64, 32, 32, 0.3
    q, k = _rand(b, HQ, sq, d) * 0.3, _rand(b, HQ, sk, d, seed=1) * 0.3
    v = torch.eye(sk, d, device=DEVICE).expand(b, HQ, sk, d).contiguous()
    out = fastlm.ops.attention(q, k, v, dropout_p=p, seed=SEED, backend="triton")
    kept = _kept(out, sk)
    bi = torch.arange(b, device=DEVICE)[:, None, None, None]
    hi = torch.arange(HQ, device=DEVICE)[None, :, None, None]
    i = torch.arange(sq, device=DEVICE)[None, None, :, None]
    j = torch.arange(sk, device=DEVICE)[None, None, None, :]
    assert torch.equal(kept, ref.dropout_keep(SEED, p, bi * sq + i, bi * sk + j, hi))
    n = kept.numel()
    frac = kept.float().mean().item()
    assert abs(frac - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n), f"kept fraction {frac:.4f}, expected {1 - p} (n = {n})"


def test_dropout_seed_reproducible_and_distinct():
    q, k, v, _, _ = _dense_case(1, 16, 16, 32, torch.float32)
    a = fastlm.ops.attention(q, k, v, dropout_p=0.5, seed=11, backend="triton")
    assert torch.equal(a, fastlm.ops.attention(q, k, v, dropout_p=0.5, seed=11, backend="triton"))
    assert not torch.equal(a, fastlm.ops.attention(q, k, v, dropout_p=0.5, seed=12, backend="triton"))
    torch.manual_seed(5)
    x = fastlm.ops.attention(q, k, v, dropout_p=0.5, backend="triton")
    y = fastlm.ops.attention(q, k, v, dropout_p=0.5, backend="triton")
    torch.manual_seed(5)
    assert torch.equal(x, fastlm.ops.attention(q, k, v, dropout_p=0.5, backend="triton"))
    assert not torch.equal(x, y)
    g = torch.Generator(device=DEVICE).manual_seed(9)
    drawn = torch.randint(-(2**63), 2**63 - 1, (2,), dtype=torch.int64, generator=torch.Generator(device=DEVICE).manual_seed(9),
                          device=DEVICE)
    assert torch.equal(fastlm.ops.attention(q, k, v, dropout_p=0.5, generator=g, backend="triton"),
                       fastlm.ops.attention(q, k, v, dropout_p=0.5, seed=drawn, backend="triton"))


def test_dropout_seed_drawn_once_per_forward_and_reused_by_backward():
    """A generator-drawn seed gives the gradients of an explicit call with that seed (so the backward
    recomputed the forward's mask, not a new draw)."""
    q, k, v, do, dlse = _dense_case(1, 13, 11, 32, torch.float32)
    drawn = torch.randint(-(2**63), 2**63 - 1, (2,), dtype=torch.int64, generator=torch.Generator(device=DEVICE).manual_seed(4),
                          device=DEVICE)
    g = torch.Generator(device=DEVICE).manual_seed(4)
    a = _run(fastlm.ops.attention, q, k, v, do, dlse, causal=True, dropout_p=0.3, generator=g, backend="triton")
    b = _run(fastlm.ops.attention, q, k, v, do, dlse, causal=True, dropout_p=0.3, seed=drawn, backend="triton")
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_dropout_p_zero_is_bit_identical_to_no_dropout():
    q, k, v, do, dlse = _dense_case(2, 13, 17, 32, torch.float32)
    a = _run(fastlm.ops.attention, q, k, v, do, dlse, causal=True, backend="triton")
    b = _run(fastlm.ops.attention, q, k, v, do, dlse, causal=True, dropout_p=0.0, seed=3, backend="triton")
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_sdpa_dropout_runs_the_kernels_on_the_default_generator():
    q, k, v, _, _ = _dense_case(1, 24, 24, 32, torch.float32)
    k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    torch.manual_seed(3)
    a = fastlm.ops.scaled_dot_product_attention(q, k, v, dropout_p=0.25, is_causal=True, backend="triton")
    torch.manual_seed(3)
    b = fastlm.ops.attention(q, k, v, causal=True, dropout_p=0.25, backend="triton")
    assert torch.equal(a, b)
    assert not torch.equal(a, fastlm.ops.attention(q, k, v, causal=True, backend="triton"))


# ---- backends ------------------------------------------------------------------------------------


@pytest.mark.skipif("cuda" not in BACKENDS, reason="backend 'cuda' needs fastlm._C (GPU) or fastlm._C_host (CPU)")
def test_cuda_backend_matches_reference():
    """Backend "cuda" (its kernels where they take the options, else the Triton launchers through the
    shim): the reference's result by the same rule, dropout included (the same seed, the same mask)."""
    _check_dense("cuda", _options("all", 2), "causal", 2, 13, 17, 32, torch.float32)
    q = _rand(2, HQ, 1, 32)
    kc, vc = _rand(2, HKV, 40, 32, seed=5), _rand(2, HKV, 40, 32, seed=6)
    lens = torch.tensor([13, 40], dtype=torch.int32, device=DEVICE)
    kw = dict(softcap=2.0, alibi_slopes=_slopes(HQ))
    got = fastlm.ops.decode_attention(q, kc, vc, lens, backend="cuda", **kw)
    assert_close(got, ref.decode_attention(q.double(), kc.double(), vc.double(), lens, **kw),
                 ref.decode_attention(q, kc, vc, lens, **kw), name="decode cuda", dtype=q.dtype)


def test_opcheck_with_options():
    q, k, v = (_rand(1, HQ, 12, 16), _rand(1, HKV, 9, 16, seed=1), _rand(1, HKV, 9, 16, seed=2))
    args = (q, k, v, True, 0.25, -1, -1, True, "triton", 2.0, _slopes(HQ), 0.3, SEED)
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.fastlm.attention_fwd.default, args, test_utils=utils)
    out, lse = torch.ops.fastlm.attention_fwd(*args)
    torch.library.opcheck(torch.ops.fastlm.attention_bwd.default, (torch.randn_like(out), None, q, k, v, out, lse, *args[3:]),
                          test_utils=utils)


# ---- bad input -----------------------------------------------------------------------------------


def test_bad_options_are_clear_errors():
    q, k, v, _, _ = _dense_case(2, 8, 8, 16, torch.float32)
    fastlm.ops.attention(q, k, v, softcap=1.0, alibi_slopes=_slopes((2, HQ)), dropout_p=0.1, seed=1, backend="triton")  # positive control
    bad = [
        (dict(softcap=-1.0), ValueError, "softcap must be a finite number >= 0"),
        (dict(softcap=float("nan")), ValueError, "softcap must be a finite number >= 0"),
        (dict(softcap=True), ValueError, "softcap must be a finite number >= 0"),
        (dict(alibi_slopes=_slopes(HQ).double()), TypeError, "alibi_slopes must have dtype float32"),
        (dict(alibi_slopes=_slopes(HQ + 1)), ValueError, r"alibi_slopes must have shape \[4\] \(query heads\) or \[2, 4\]"),
        (dict(alibi_slopes=_slopes((3, HQ))), ValueError, r"alibi_slopes must have shape"),
        (dict(alibi_slopes=[0.5] * HQ), TypeError, "alibi_slopes must be a torch.Tensor"),
        (dict(dropout_p=1.0), ValueError, r"dropout_p must be a number in \[0, 1\)"),
        (dict(dropout_p=-0.1), ValueError, r"dropout_p must be a number in \[0, 1\)"),
        (dict(dropout_p=True), ValueError, r"dropout_p must be a number in \[0, 1\)"),
        (dict(dropout_p=0.1, seed=1, generator=torch.Generator()), ValueError, "pass generator or seed, not both"),
        (dict(dropout_p=0.1, seed=torch.tensor([1, 2, 3])), ValueError, r"seed must be an int64 tensor \[seed, offset\] of shape \(2,\)"),
        (dict(dropout_p=0.1, seed=torch.tensor([1.0, 2.0])), TypeError, "seed must have dtype int64"),
        (dict(dropout_p=0.1, seed="7"), TypeError, "seed must be an int or an int64 tensor"),
        (dict(dropout_p=0.1, seed=2**64), ValueError, "seed must fit in int64"),
        (dict(dropout_p=0.1, generator=5), TypeError, "generator must be a torch.Generator"),
    ]
    for kw, exc, match in bad:
        for backend in ("triton", "torch"):
            with pytest.raises(exc, match=match):
                fastlm.ops.attention(q, k, v, backend=backend, **kw)
    cu = _cu([8, 8])
    pack = lambda t: t.transpose(1, 2).reshape(16, t.shape[1], 16)  # noqa: E731
    with pytest.raises(ValueError, match=r"alibi_slopes must have shape \[4\] \(query heads\) or \[2, 4\]"):
        fastlm.ops.attention_varlen(pack(q), pack(k), pack(v), cu, cu, 8, 8, alibi_slopes=_slopes((3, HQ)))
    with pytest.raises(ValueError, match=r"dropout_p must be a number in \[0, 1\)"):
        fastlm.ops.attention_varlen(pack(q), pack(k), pack(v), cu, cu, 8, 8, dropout_p=1.5)
    lens = torch.tensor([3, 8], dtype=torch.int32, device=DEVICE)
    fastlm.ops.decode_attention(q[:, :, :1], k, v, lens, softcap=1.0, alibi_slopes=_slopes(HQ))  # positive control
    with pytest.raises(ValueError, match="softcap must be a finite number >= 0"):
        fastlm.ops.decode_attention(q[:, :, :1], k, v, lens, softcap=-2.0)
    with pytest.raises(ValueError, match=r"alibi_slopes must have shape"):
        fastlm.ops.decode_attention(q[:, :, :1], k, v, lens, alibi_slopes=_slopes((2, 2)))
    with pytest.raises(TypeError, match="unexpected keyword argument 'dropout_p'"):
        fastlm.ops.decode_attention(q[:, :, :1], k, v, lens, dropout_p=0.1)
