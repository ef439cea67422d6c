"""The CUDA forward's VARLEN and OPTIONS paths (csrc/attention.cu) and decode's OPTIONS path
(csrc/decode_attention.cu) on the host build.

Truth: the reference (fastlm.reference.attention: attention_varlen is attention on each sequence
alone, tests/test_attention_varlen.py) in float64; baseline: the same in the kernel's dtype; out
and LSE by the factor-2 rule (fastlm.testing.assert_close). Each test also checks that the CUDA
kernel ran (the emulated device's launch counts), not the Triton fallback. Dropout is checked
entry by entry: with V the identity, O_ij = P_ij keep_ij / (1 - p), so O_ij == 0 exactly where the
reference's Philox mask drops entry (i, j).
"""

from __future__ import annotations

import pytest
import torch

from fastlm.cuda import attention as cattn
from fastlm.reference import attention as ref
from fastlm.testing import assert_all_written, assert_close, poison_like

HQ, HKV = 4, 2
_T = {torch.float16: "__half", torch.bfloat16: "__nv_bfloat16"}  # the kernels' template argument


@pytest.fixture
def host(C_host):
    return C_host  # fastlm._C_host: the launchers run it on these CPU tensors


def _launches(host, prefix: str) -> int:
    return sum(n for name, n in host.emulation_launch_counts().items() if name.startswith(prefix))


def _cu(lens):
    return torch.tensor([0, *torch.tensor(lens, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int32)


def _rand(g, *shape, dtype):
    return torch.randn(*shape, generator=g).to(dtype)


def _packed(lq, lk, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return _rand(g, sum(lq), HQ, d, dtype=dtype), _rand(g, sum(lk), HKV, d, dtype=dtype), _rand(g, sum(lk), HKV, d, dtype=dtype)


def _varlen_cuda(q, k, v, lq, lk, causal=False, window=(-1, -1), num_splits=None, extra=0, **opts):
    out, lse = poison_like(q), torch.full((HQ, q.shape[0]), float("nan"))
    scale = q.shape[-1] ** -0.5
    cattn.attention_varlen_fwd(q, k, v, _cu(lq), _cu(lk), max(lq) + extra, max(lk) + extra, causal, scale, window[0], window[1],
                               out, lse, num_splits, **opts)
    return out, lse


def _varlen_ref(q, k, v, lq, lk, causal=False, window=(-1, -1), **opts):
    w = None if window == (-1, -1) else window
    return ref.attention_varlen(q, k, v, _cu(lq), _cu(lk), causal=causal, window=w, return_lse=True, **opts)


def _check(got, q, k, v, lq, lk, name, **kw):
    truth = _varlen_ref(q.double(), k.double(), v.double(), lq, lk, **kw)
    base = _varlen_ref(q, k, v, lq, lk, **kw)
    assert_all_written(got[0], f"{name} out")
    assert not torch.isnan(got[1]).any(), f"{name} lse: some elements never written"
    assert_close(got[0], truth[0], base[0], name=f"{name} out", dtype=q.dtype)
    assert_close(got[1], truth[1].float(), base[1].float(), name=f"{name} lse", dtype=q.dtype)


LQ, LK = [0, 1, 23, 0, 40, 7], [3, 17, 1, 0, 33, 29]  # lengths 0 and 1 both sides, Sq > Sk and Sq < Sk

GRID = [  # (head dim, dtype, causal, window, splits)
    (64, torch.float16, False, (-1, -1), 1),
    (96, torch.bfloat16, True, (-1, -1), 1),
    (128, torch.float16, True, (8, -1), 1),
    (64, torch.bfloat16, False, (6, 3), 2),
]


@pytest.mark.parametrize("d,dtype,causal,window,splits", GRID, ids=lambda x: str(x).replace("torch.", ""))
def test_each_sequence_equals_attention_alone(host, d, dtype, causal, window, splits):
    """Output and LSE of the VARLEN kernel (GQA 4:2) against attention on each sequence alone; an
    empty sequence and the rows that see no key give O = 0 and LSE = -inf."""
    q, k, v = _packed(LQ, LK, d, dtype, d + splits)
    originals = [t.clone() for t in (q, k, v)]
    kernel = f"attention_fwd_kernel<{_T[dtype]}, {d}, true, false>"
    before = _launches(host, kernel)
    got = _varlen_cuda(q, k, v, LQ, LK, causal, window, num_splits=splits)
    assert _launches(host, kernel) == before + 1, "the VARLEN kernel did not run"
    for orig, t in zip(originals, (q, k, v), strict=True):
        assert torch.equal(orig, t), "an input was modified in place"
    _check(got, q, k, v, LQ, LK, "varlen", causal=causal, window=window)


def test_varlen_routing_and_over_long_max_seqlen(host):
    """varlen_fwd_runs_cuda is the dense forward's coverage; an over-long max_seqlen (more idle
    blocks) gives the same bits, and splits reach the same result by the rule."""
    q, k, v = _packed(LQ, LK, 64, torch.float16, 3)
    lse = torch.empty(HQ, q.shape[0])
    assert cattn.varlen_fwd_runs_cuda(q, k, v, q, lse, max(LQ), max(LK), 0.125)
    assert not cattn.varlen_fwd_runs_cuda(q.float(), k.float(), v.float(), q.float(), lse, max(LQ), max(LK), 0.125)  # fp32: Triton
    q80, k80, _ = _packed(LQ, LK, 80, torch.float16, 3)
    assert not cattn.varlen_fwd_runs_cuda(q80, k80, k80, q80, lse, max(LQ), max(LK), 0.125)  # head dim 80: Triton
    assert not cattn.varlen_fwd_runs_cuda(q, k, v, q, lse, max(LQ), max(LK), 0.0)
    a = _varlen_cuda(q, k, v, LQ, LK, True, num_splits=1)
    b = _varlen_cuda(q, k, v, LQ, LK, True, num_splits=1, extra=150)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    _check(_varlen_cuda(q, k, v, LQ, LK, True, num_splits=3), q, k, v, LQ, LK, "3 splits", causal=True)


def test_empty_batches(host):
    """No rows at all, or sequences that all lack keys: nothing to read, O = 0, LSE = -inf."""
    q, k, v = _packed([2, 3], [0, 0], 64, torch.float16, 1)
    out, lse = _varlen_cuda(q, k, v, [2, 3], [0, 0])
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    q0 = torch.empty(0, HQ, 64, dtype=torch.float16)
    out0, lse0 = q0.clone(), torch.empty(HQ, 0)
    cattn.attention_varlen_fwd(q0, k, v, _cu([0, 0]), _cu([0, 0]), 0, 0, False, 0.125, -1, -1, out0, lse0)


# ---- options: softcap, ALiBi, dropout --------------------------------------------------------------


def _slopes(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) * 0.5 + 0.05


def _dense(B=2, Sq=37, Sk=45, d=64, dtype=torch.float16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return _rand(g, B, HQ, Sq, d, dtype=dtype), _rand(g, B, HKV, Sk, d, dtype=dtype), _rand(g, B, HKV, Sk, d, dtype=dtype)


def _dense_cuda(q, k, v, causal, window, num_splits=None, **opts):
    out, lse = poison_like(q), torch.full(q.shape[:3], float("nan"))
    cattn.attention_fwd(q, k, v, causal, q.shape[-1] ** -0.5, window[0], window[1], out, lse, num_splits, **opts)
    return out, lse


def _dense_check(got, q, k, v, causal, window, name, **opts):
    w = None if window == (-1, -1) else window
    truth = ref.attention(q.double(), k.double(), v.double(), causal, None, w, True, **opts)
    base = ref.attention(q, k, v, causal, None, w, True, **opts)
    assert_all_written(got[0], f"{name} out")
    assert not torch.isnan(got[1]).any(), f"{name} lse: some elements never written"
    assert_close(got[0], truth[0], base[0], name=f"{name} out", dtype=q.dtype)
    assert_close(got[1], truth[1].float(), base[1].float(), name=f"{name} lse", dtype=q.dtype)


OPTION_GRID = [  # (options, head dim, dtype, causal, window, splits)
    (dict(softcap=2.5), 64, torch.float16, True, (-1, -1), 1),
    (dict(alibi=(HQ,)), 128, torch.bfloat16, False, (-1, -1), 1),
    (dict(alibi=(2, HQ), softcap=8.0), 96, torch.float16, True, (10, -1), 2),
    (dict(dropout_p=0.3), 64, torch.bfloat16, False, (7, 4), 1),
    (dict(dropout_p=0.2, softcap=4.0, alibi=(HQ,)), 128, torch.float16, True, (-1, -1), 2),
]


def _opts(spec, seed):
    opts = {}
    if "softcap" in spec:
        opts["softcap"] = spec["softcap"]
    if "alibi" in spec:
        opts["alibi_slopes"] = _slopes(spec["alibi"], seed)
    if "dropout_p" in spec:
        opts.update(dropout_p=spec["dropout_p"], seed=torch.tensor([1234567891011 + seed, 3 + 2**33], dtype=torch.int64))
    return opts


@pytest.mark.parametrize("spec,d,dtype,causal,window,splits", OPTION_GRID, ids=lambda x: str(x).replace("torch.", ""))
def test_dense_options_equal_the_reference(host, spec, d, dtype, causal, window, splits):
    q, k, v = _dense(d=d, dtype=dtype, seed=d + splits)
    opts = _opts(spec, d)
    kernel = f"attention_fwd_kernel<{_T[dtype]}, {d}, false, true>"
    before = _launches(host, kernel)
    got = _dense_cuda(q, k, v, causal, window, splits, **opts)
    assert _launches(host, kernel) == before + 1, "the OPTIONS kernel did not run"
    _dense_check(got, q, k, v, causal, window, f"options {spec}", **opts)


@pytest.mark.parametrize("spec,d,dtype,causal,window,splits", OPTION_GRID[1:4], ids=lambda x: str(x).replace("torch.", ""))
def test_varlen_options_equal_the_reference(host, spec, d, dtype, causal, window, splits):
    """Per sequence (b-th row of (B, Hq) slopes; dropout by the packed rows)."""
    lq, lk = [0, 1, 23, 40], [3, 17, 1, 29]
    if spec.get("alibi") == (2, HQ):
        spec = {**spec, "alibi": (len(lq), HQ)}
    q, k, v = _packed(lq, lk, d, dtype, d + 7)
    opts = _opts(spec, d)
    kernel = f"attention_fwd_kernel<{_T[dtype]}, {d}, true, true>"
    before = _launches(host, kernel)
    got = _varlen_cuda(q, k, v, lq, lk, causal, window, num_splits=splits, **opts)
    assert _launches(host, kernel) == before + 1, "the VARLEN OPTIONS kernel did not run"
    _check(got, q, k, v, lq, lk, f"varlen options {spec}", causal=causal, window=window, **opts)


def _eye_v(n, hkv, d, dtype):
    """V whose key j is the unit vector e_j (j < d), so O_ij = P_ij keep_ij / (1 - p)."""
    return torch.eye(n, d).to(dtype)[None, None].expand(1, hkv, n, d).contiguous()


@pytest.mark.parametrize("splits", [1, 2])
def test_dropout_drops_the_reference_entries(host, splits):
    """Dense (B = 1) and packed: O_ij == 0 exactly where the reference's keep mask is False, over
    offsets whose key rows start at every residue mod 4 (the Philox word choice)."""
    p, seed = 0.4, torch.tensor([987654321, 17], dtype=torch.int64)
    n, d = 60, 64
    q, k, _ = _dense(B=1, Sq=50, Sk=n, d=d, seed=splits)
    v = _eye_v(n, HKV, d, torch.float16)
    out, _ = _dense_cuda(q, k, v, False, (-1, -1), splits, dropout_p=p, seed=seed)
    i, j, h = torch.arange(50)[None, :, None], torch.arange(n)[None, None, :], torch.arange(HQ)[:, None, None]
    keep = ref.dropout_keep(seed, p, i, j, h)
    assert torch.equal(out[0, :, :, :n] != 0, keep) and 0.3 < 1 - keep.float().mean() < 0.5
    lq, lk = [5, 9, 13, 7], [3, 10, 17, 30]  # key rows start at 0, 3, 13, 30: residues 0, 3, 1, 2
    q, k, _ = _packed(lq, lk, d, torch.float16, 5)
    v = torch.cat([torch.eye(m, d) for m in lk])[:, None].expand(sum(lk), HKV, d).to(torch.float16).contiguous()
    out, _ = _varlen_cuda(q, k, v, lq, lk, num_splits=splits, dropout_p=p, seed=seed)
    cq, ck = _cu(lq).tolist(), _cu(lk).tolist()
    for b in range(len(lq)):
        i = torch.arange(cq[b], cq[b + 1])[None, :, None]
        j = torch.arange(ck[b], ck[b + 1])[None, None, :]
        keep = ref.dropout_keep(seed, p, i, j, h)
        assert torch.equal(out[cq[b]:cq[b + 1], :, :lk[b]].transpose(0, 1) != 0, keep), f"sequence {b}"


def test_bad_options_are_refused(host):
    q, k, v = _dense(B=1, Sq=5, Sk=5)
    with pytest.raises(ValueError, match="dropout_p > 0 needs seed"):
        _dense_cuda(q, k, v, False, (-1, -1), dropout_p=0.1)
    C = host
    args = (q.data_ptr(), k.data_ptr(), v.data_ptr(), q.data_ptr(), q.data_ptr(), 0, 0, 1, HQ, HKV, 5, 5, 64,
            [*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *q.stride()[:3], 5 * HQ, 5], 0.125, False, -1, -1, 1, 1, 0)
    assert C.attention_fwd(*args, softcap=-1.0) == 1 and C.attention_fwd(*args, dropout_p=1.0, seed=q.data_ptr()) == 1
    assert C.attention_fwd(*args, dropout_p=0.5) == 1  # no seed pointer (1: cudaErrorInvalidValue)
    _dense_check(_dense_cuda(q, k, v, False, (-1, -1), softcap=1.0), q, k, v, False, (-1, -1), "control", softcap=1.0)


# ---- decode ------------------------------------------------------------------------------------------


DECODE_GRID = [  # (options, head dim, dtype, Sq, paged, splits)
    (dict(softcap=3.0), 64, torch.float16, 1, False, 1),
    (dict(alibi=(HQ,)), 128, torch.bfloat16, 5, True, 2),
    (dict(alibi=(3, HQ), softcap=5.0), 256, torch.float16, 9, False, 3),
    (dict(alibi=(3, HQ)), 64, torch.bfloat16, 3, True, 1),
]


@pytest.mark.parametrize("spec,d,dtype,sq,paged,splits", DECODE_GRID, ids=lambda x: str(x).replace("torch.", ""))
def test_decode_options_equal_the_reference(host, spec, d, dtype, sq, paged, splits):
    g = torch.Generator().manual_seed(d + sq)
    B, s_max = 3, 96
    q = _rand(g, B, HQ, sq, d, dtype=dtype)
    lens = torch.tensor([70, sq, 96], dtype=torch.int32)
    if paged:
        kc, vc = _rand(g, 8, HKV, 16, d, dtype=dtype), _rand(g, 8, HKV, 16, d, dtype=dtype)
        table = torch.randint(0, 8, (B, s_max // 16), generator=g, dtype=torch.int32)
    else:
        kc, vc, table = _rand(g, B, HKV, s_max, d, dtype=dtype), _rand(g, B, HKV, s_max, d, dtype=dtype), None
    opts = _opts(spec, d)
    window = (20, -1) if splits == 3 else (-1, -1)
    kernel = f"{'paged_' if paged else ''}decode_split_options_kernel<{_T[dtype]}, {d}, "
    before = _launches(host, kernel)
    out, lse = poison_like(q), torch.full(q.shape[:3], float("nan"))
    cattn.decode_attention_fwd(q, kc, vc, lens, d ** -0.5, window[0], window[1], out, lse, splits, table, **opts)
    assert _launches(host, kernel) == before + 1, "the OPTIONS split kernel did not run"
    w = None if window == (-1, -1) else window
    truth = ref.decode_attention(q.double(), kc.double(), vc.double(), lens, None, w, True, table, **opts)
    base = ref.decode_attention(q, kc, vc, lens, None, w, True, table, **opts)
    assert_all_written(out, "decode out")
    assert_close(out, truth[0], base[0], name="decode out", dtype=dtype)
    assert_close(lse, truth[1].float(), base[1].float(), name="decode lse", dtype=dtype)
