"""The CUDA rotary (csrc/rotary.cu) and sinusoidal forward (csrc/sinusoidal.cu) on the host build:
which path runs (16-byte vector path or the any-stride fallback) for aligned, unaligned and
strided inputs, the vector path bit-identical to the any-stride path (the per-element arithmetic
is shared), head counts that are not a multiple of the heads in flight, partial rotary,
interleaved, int32/int64 positions and ids, tables, in place, out-of-range ids, and every output
element written. The shared case grids run through tests/test_rotary.py and tests/test_sinusoidal.py."""

from __future__ import annotations

import pytest
import torch

from fastlm.cuda import rotary as crot
from fastlm.cuda import sinusoidal as cuda_sin
from fastlm.testing import assert_all_written, poison_like

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture
def host(C_host):
    sms = C_host.emulation_sm_count()
    yield C_host
    C_host.emulation_set_sm_count(sms)


def _launches(C_host) -> dict[str, int]:
    counts = C_host.emulation_launch_counts()
    return {name: sum(v for k, v in counts.items() if k.startswith(name + "<")) for name in ("rotary_kernel", "rotary_vec_kernel")}


def _strided(t: torch.Tensor) -> torch.Tensor:
    """t's values in storage with d stride 2 (the any-stride path)."""
    out = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)[..., ::2]
    out.copy_(t)
    return out


def _unaligned(t: torch.Tensor) -> torch.Tensor:
    """t's values in contiguous storage one element past a 16-byte boundary."""
    out = torch.empty(t.numel() + 1, dtype=t.dtype)[1:].view(t.shape)
    out.copy_(t)
    return out


def _inputs(dtype, B=2, HQ=5, HK=3, S=6, D=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, HQ, S, D, generator=g).to(dtype), torch.randn(B, HK, S, D, generator=g).to(dtype)


def _run(fn, q, k, args, R, interleaved=False, table=(None, None), layout=lambda t: t):
    """fn(q, k, *args, q_out, k_out) on q, k stored by layout, into NaN-poisoned outputs of the same
    layout: (q_out, k_out) contiguous, and whether the vector path ran."""
    q, k = layout(q), layout(k)
    qo, ko = layout(poison_like(q)), layout(poison_like(k))
    vec = crot.vector_path(q, k, qo, ko, R, interleaved, *table)
    fn(q, k, *args, qo, ko)
    assert_all_written(qo, "q_out")
    assert_all_written(ko, "k_out")
    return qo.contiguous(), ko.contiguous(), vec


@pytest.mark.parametrize(
    "dtype,D,R,interleaved,layout,expected",
    [
        (torch.float16, 64, 64, False, "contiguous", True),
        (torch.bfloat16, 64, 32, True, "contiguous", True),
        (torch.float32, 64, 8, False, "contiguous", True),
        (torch.float16, 64, 64, False, "unaligned", False),
        (torch.float16, 64, 64, True, "strided", False),
        (torch.float16, 64, 8, False, "contiguous", False),  # R/2 = 4: half a 16-byte chunk
        (torch.float16, 64, 8, True, "contiguous", True),  # interleaved: R = 8 is one chunk
        (torch.float32, 60, 60, False, "contiguous", False),  # D = 60: rows 240 bytes apart
        (torch.float16, 64, 64, False, "bshd", True),  # (B, S, H, D) storage seen as (B, H, S, D)
    ],
)
def test_path_choice(host, dtype, D, R, interleaved, layout, expected):
    q, k = _inputs(dtype, D=D)
    layouts = {"contiguous": lambda t: t, "unaligned": _unaligned, "strided": _strided,
               "bshd": lambda t: t.transpose(1, 2).contiguous().transpose(1, 2)}
    before = _launches(host)
    _, _, vec = _run(crot.rotary_fwd, q, k, (None, 0, 1e4, R, interleaved), R, interleaved, layout=layouts[layout])
    after = _launches(host)
    assert vec is expected
    ran = {name: after[name] - before[name] for name in after}
    assert ran == ({"rotary_kernel": 0, "rotary_vec_kernel": 1} if expected else {"rotary_kernel": 1, "rotary_vec_kernel": 0})


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("R", [64, 32])
@pytest.mark.parametrize("pos_dtype", [None, torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("sms", [1, 132])
def test_vector_bitwise_equals_any_stride(host, dtype, interleaved, R, pos_dtype, sms):
    """HQ = 5, HK = 3 (not multiples of the 2 or 4 heads in flight); sms = 1 puts several heads in
    one block (the in-flight groups and the tail), 132 one head per block; positions up to 2^20."""
    host.emulation_set_sm_count(sms)
    q, k = _inputs(dtype)
    pos = None if pos_dtype is None else torch.randint(0, 1 << 20, (2, 6), generator=torch.Generator().manual_seed(1)).to(pos_dtype)
    for fn in (crot.rotary_fwd, crot.rotary_bwd):
        args = (pos, 7, 1e4, R, interleaved)
        qv, kv, vec = _run(fn, q, k, args, R, interleaved)
        qs, ks, any_stride = _run(fn, q, k, args, R, interleaved, layout=_strided)
        assert vec and not any_stride
        assert torch.equal(qv, qs) and torch.equal(kv, ks)
        assert torch.equal(qv[..., R:], q[..., R:]) and torch.equal(kv[..., R:], k[..., R:])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cdtype", DTYPES, ids=str)
def test_table_vector_bitwise_equals_any_stride(host, dtype, cdtype):
    """Tables (B, S, R) and broadcast (1, S, R), partial R < D = 64, several heads per block; an
    unaligned table takes the any-stride path with the same result."""
    host.emulation_set_sm_count(1)
    q, k = _inputs(dtype)
    g = torch.Generator().manual_seed(2)
    R = 48 if dtype == torch.float32 else 32
    cos, sin = torch.randn(2, 6, R, generator=g).to(cdtype), torch.randn(1, 6, R, generator=g).to(cdtype)
    for fn in (crot.rotary_table_fwd, crot.rotary_table_bwd):
        qv, kv, vec = _run(fn, q, k, (cos, sin), R, table=(cos, sin))
        qs, ks, any_stride = _run(fn, q, k, (cos, sin), R, table=(cos, sin), layout=_strided)
        assert vec and not any_stride
        assert torch.equal(qv, qs) and torch.equal(kv, ks)
        cos_u = _unaligned(cos)
        qu, ku, vec = _run(fn, q, k, (cos_u, sin), R, table=(cos_u, sin))
        assert not vec
        assert torch.equal(qv, qu) and torch.equal(kv, ku)


@pytest.mark.parametrize("interleaved", [False, True])
def test_vector_in_place(host, interleaved):
    host.emulation_set_sm_count(1)
    q, k = _inputs(torch.float16)
    qv, kv, vec = _run(crot.rotary_fwd, q, k, (None, 3, 1e4, 32, interleaved), 32, interleaved)
    assert vec
    qi, ki = q.clone(), k.clone()
    crot.rotary_fwd(qi, ki, None, 3, 1e4, 32, interleaved, qi, ki)
    assert torch.equal(qi, qv) and torch.equal(ki, kv)


# ---- sinusoidal forward (csrc/sinusoidal.cu): vector path against the any-stride path ----------------


def _fwd_launches(C_host) -> dict[str, int]:
    counts = C_host.emulation_launch_counts()
    names = ("embed_sinusoidal_fwd_kernel", "embed_sinusoidal_fwd_vec_kernel")
    return {name: sum(v for k, v in counts.items() if k.startswith(name + "<")) for name in names}


def _embed(host, ids, weight, positions, out, scale=2.5):
    """embed_sinusoidal_fwd into out (NaN-poisoned first): out contiguous, and which kernel ran."""
    out.fill_(float("nan"))
    before = _fwd_launches(host)
    if weight is None:
        cuda_sin.sinusoidal_fwd(positions, 10000.0, out)
    else:
        cuda_sin.embed_sinusoidal_fwd(ids, weight, positions, 3, scale, 10000.0, out)
    after = _fwd_launches(host)
    ran = [name for name in after if after[name] != before[name]]
    assert len(ran) == 1
    return out.contiguous(), ran[0] == "embed_sinusoidal_fwd_vec_kernel"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("pos", ["none", "shared", "per_row"])
@pytest.mark.parametrize("table_only", [False, True])
def test_sinusoidal_vector_bitwise_equals_any_stride(host, dtype, ids_dtype, pos, table_only):
    """T * S = 3 * 37 tokens (not a multiple of the tokens per block), D = 96, ids with some out of
    range (NaN rows), positions up to 2^20; the any-stride path on out with d stride 2."""
    g = torch.Generator().manual_seed(3)
    T, S, D, V = 3, 37, 96, 50
    ids = torch.randint(-2, V + 2, (T, S), generator=g).to(ids_dtype)
    weight = None if table_only else torch.randn(V, D, generator=g).to(dtype)
    positions = {"none": None, "shared": torch.randint(0, 1 << 20, (S,), generator=g).to(ids_dtype),
                 "per_row": torch.randint(0, 1 << 20, (T, S), generator=g).to(ids_dtype)}[pos]
    if table_only and positions is not None and positions.dim() == 2:
        positions = positions[:1]
    out_v, vec = _embed(host, ids, weight, positions, torch.empty(T, S, D, dtype=dtype))
    out_s, any_vec = _embed(host, ids, weight, positions, torch.empty(T, S, 2 * D, dtype=dtype)[..., ::2])
    assert vec and not any_vec
    assert torch.equal(out_v.isnan(), out_s.isnan())
    assert torch.equal(torch.nan_to_num(out_v), torch.nan_to_num(out_s))
    if not table_only:
        bad = (ids < 0) | (ids >= V)
        assert bad.any() and out_v[bad].isnan().all() and not out_v[~bad].isnan().any()
    else:
        assert not out_v.isnan().any()


@pytest.mark.parametrize(
    "case,expected",
    [("contiguous", True), ("out_unaligned", False), ("weight_unaligned", False), ("weight_strided", False),
     ("D_not_chunks", False)],
)
def test_sinusoidal_path_choice(host, case, expected):
    g = torch.Generator().manual_seed(4)
    T, S, V = 2, 5, 9
    D = 36 if case == "D_not_chunks" else 32
    ids = torch.randint(0, V, (T, S), generator=g)
    weight = torch.randn(V, D, generator=g).half()
    out = torch.empty(T, S, D, dtype=torch.float16)
    if case == "out_unaligned":
        out = torch.empty(out.numel() + 1, dtype=out.dtype)[1:].view(out.shape)
    if case == "weight_unaligned":
        weight = _unaligned(weight)
    if case == "weight_strided":
        weight = _strided(weight)
    ref, _ = _embed(host, ids, weight.contiguous(), None, torch.empty(T, S, 2 * D, dtype=torch.float16)[..., ::2])
    res, vec = _embed(host, ids, weight, None, out)
    assert vec is expected
    assert torch.equal(res, ref)
