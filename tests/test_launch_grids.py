"""Launch grids of the Triton rotary, sinusoidal and norm launchers stay within CUDA's limits
(x < 2^31, y and z <= 65535) at any batch, head and token count, and the kernels that split a 1-D
program id back into (row block, column block) or (head group, batch row, s-block) compute the same
result as before when those splits are exercised, which the interpreter's own tiles never do."""

from __future__ import annotations

import pytest
import torch
import triton
from conftest import DEVICE

from fastlm.reference import rotary as rref
from fastlm.reference import sinusoidal as sref
from fastlm.testing import assert_all_written, assert_close, poison_like
from fastlm.triton import layer_norm as LN
from fastlm.triton import rotary as RO
from fastlm.triton import sinusoidal as SN

LIMITS = (2**31 - 1, 65535, 65535)
SMS = (132, 108, None)  # H100/H200, A100, the interpreter


def within_limits(grid) -> bool:
    return 1 <= len(grid) <= 3 and all(1 <= g <= lim for g, lim in zip(grid, LIMITS, strict=False))


class _GridRecorder:
    """Stands in for a @triton.jit kernel: ``kernel[grid](...)`` records the grid and runs nothing."""

    def __init__(self):
        self.grids = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.grids.append(tuple(grid))


# ---- the grid functions at huge sizes --------------------------------------------------------------


@pytest.mark.parametrize("sm_count", SMS)
@pytest.mark.parametrize("B, S, H", [(1, 1, 2), (70000, 1, 16), (70000, 16, 40), (2**20, 1, 2), (1, 2**20, 64),
                                     (8, 2**20, 72), (1, 1, 70000), (3, 5, 70000)])
@pytest.mark.parametrize("half", [1, 32, 64])
def test_rotary_grid_within_limits(sm_count, B, S, H, half):
    block_h = triton.next_power_of_2(half)
    block_s, per, groups = RO._plan(B, S, H, block_h, sm_count)
    grid = RO._grid(B, S, block_s, groups)
    assert within_limits(grid), grid
    assert grid == (triton.cdiv(S, block_s) * B * groups,)
    assert per * groups >= H > per * (groups - 1)


@pytest.mark.parametrize("gpu_tiles", [True, False])
@pytest.mark.parametrize("N, D", [(1, 1), (70000, 768), (2**20, 4096), (2**24, 1024), (2**20, 65536), (8, 2**25)])
def test_sinusoidal_grids_within_limits(gpu_tiles, N, D):
    block_t, block_d = SN._tiles(N, D, torch.device("cuda" if gpu_tiles else "cpu"))
    fwd = SN._grid(N, block_t, D, block_d)
    assert within_limits(fwd), fwd
    assert fwd == (triton.cdiv(N, block_t) * triton.cdiv(D, block_d),)
    sorted_bd = min(triton.next_power_of_2(D), 1024)
    sorted_grid = SN._grid(N, 1, D, sorted_bd)
    assert within_limits(sorted_grid), sorted_grid
    assert sorted_grid == (N * triton.cdiv(D, sorted_bd),)


@pytest.mark.parametrize("sm_count", SMS)
@pytest.mark.parametrize("M, N", [(1, 1), (70000, 4096), (2**20, 768), (2**24, 64), (3, 2**20)])
def test_layer_norm_grids_within_limits(sm_count, M, N):
    assert within_limits(LN._fwd_grid(M)) and LN._fwd_grid(M) == (M,)
    programs, rows = LN._bwd_plan(M, sm_count)
    assert within_limits((programs,))
    assert programs <= (4 if sm_count is None else 2 * sm_count)
    assert (programs - 1) * rows < M <= programs * rows
    assert within_limits(LN._sum_grid(N, 128))


# ---- the launchers' real grids (kernels replaced by a recorder; expanded tensors, nothing allocated) --


def test_rotary_launch_puts_a_huge_batch_on_grid_x(monkeypatch):
    """Regression: rotary launched (s-blocks, B, head groups), so B > 65535 on grid y failed on a GPU."""
    rec = _GridRecorder()
    monkeypatch.setattr(RO, "_rotary_kernel", rec)
    monkeypatch.setattr(RO, "_sm_count", lambda device: 132, raising=False)  # the GPU plan
    for B, Hq, Hk, S in ((70000, 8, 2, 1), (2, 70000, 1, 3), (1, 4, 4, 2**20)):
        q = torch.empty(1, 1, 1, 64).expand(B, Hq, S, 64)
        k = torch.empty(1, 1, 1, 64).expand(B, Hk, S, 64)
        RO.rotary_fwd(q, k, None, 0, 10000.0, 64, False, q, k)
        cos = torch.empty(1, 1, 64).expand(1, S, 64)
        RO.rotary_table_bwd(q, k, cos, cos, q, k)
    assert len(rec.grids) == 6
    for grid in rec.grids:
        assert within_limits(grid), rec.grids


def test_sinusoidal_launch_puts_wide_tables_on_grid_x(monkeypatch):
    """A table wider than 65535 column blocks (2^25 columns of 256) launches within the limits."""
    rec = _GridRecorder()
    monkeypatch.setattr(SN, "_embed_sinusoidal_fwd_kernel", rec)
    real_tiles = SN._tiles
    monkeypatch.setattr(SN, "_tiles", lambda N, D, device: real_tiles(N, D, torch.device("cuda")))
    pos = torch.zeros(2, 4, dtype=torch.long)
    SN.sinusoidal_fwd(pos, 10000.0, torch.empty(1, 1, 1).expand(2, 4, 2**25))
    SN.sinusoidal_fwd(pos, 10000.0, torch.empty(1, 1, 1).expand(2, 4, 64))
    ids = torch.zeros(70000, 16, dtype=torch.long)
    SN.embed_sinusoidal_fwd(ids, torch.empty(1, 1).expand(5, 768), None, 0, None, 10000.0,
                            torch.empty(1, 1, 1).expand(70000, 16, 768))
    assert len(rec.grids) == 3
    for grid in rec.grids:
        assert within_limits(grid), rec.grids


# ---- the split program ids compute the same result (interpreter, GPU-sized tiles) ----------------------


def test_rotary_with_head_groups_matches_reference(monkeypatch):
    """The GPU plan (several head groups per batch row, small s-blocks) under the interpreter: every
    (head group, batch row, s-block) program is decoded and writes its tile; fwd equals the
    reference by the tolerance rule and fwd, bwd and table forms equal the one-group plan exactly."""
    B, Hq, Hk, S, D, R = 3, 4, 2, 37, 80, 64
    block_s, per, groups = RO._plan(B, S, Hq + Hk, triton.next_power_of_2(R // 2), 132)
    assert groups > 1 and triton.cdiv(S, block_s) > 1 and B > 1, (block_s, per, groups)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, Hq, S, D, generator=g).to(DEVICE)
    k = torch.randn(B, Hk, S, D, generator=g).to(DEVICE)
    pos = torch.randint(0, 5000, (B, S), generator=g).to(DEVICE)
    cos = torch.randn(B, S, R, generator=g).to(DEVICE)
    sin = torch.randn(1, S, R, generator=g).to(DEVICE)

    def run_all():
        outs = []
        for fn in (RO.rotary_fwd, RO.rotary_bwd):
            qo, ko = poison_like(q), poison_like(k)
            fn(q, k, pos, 3, 10000.0, R, True, qo, ko)
            outs += [qo, ko]
        for fn in (RO.rotary_table_fwd, RO.rotary_table_bwd):
            qo, ko = poison_like(q), poison_like(k)
            fn(q, k, cos, sin, qo, ko)
            outs += [qo, ko]
        for o in outs:
            assert_all_written(o)
        return outs

    one_group = run_all()
    monkeypatch.setattr(RO, "_sm_count", lambda device: 132)
    grouped = run_all()
    for a, b in zip(grouped, one_group, strict=True):
        assert torch.equal(a, b)
    truth = rref.rotary(q.double(), k.double(), pos + 3, rotary_dim=R, interleaved=True)
    base = rref.rotary(q, k, pos + 3, rotary_dim=R, interleaved=True)
    for got, t, b, name in zip(grouped[:2], truth, base, ("q", "k"), strict=True):
        assert_close(got, t, b, name=name)


def test_sinusoidal_with_many_column_blocks_matches_reference(monkeypatch):
    """Small tiles force several token and column blocks per launch (the interpreter's tiles cover
    D <= 1024 in one column block); the table, the embedding and both backward modes (the sorted
    one with D = 1500: two column blocks of 1024) match the reference."""
    monkeypatch.setattr(SN, "_tiles", lambda N, D, device: (4, 16))
    g = torch.Generator().manual_seed(1)
    T, S, D, V = 3, 7, 40, 11
    pos = torch.randint(0, 10000, (T, S), generator=g).to(DEVICE)
    out = poison_like(torch.empty(T, S, D, device=DEVICE))
    SN.sinusoidal_fwd(pos, 10000.0, out)
    assert_all_written(out)
    assert_close(out, sref.sinusoidal_position_encoding(pos, D, 10000.0, torch.float64),
                 sref.sinusoidal_position_encoding(pos, D, 10000.0, torch.float32), name="table")
    ids = torch.randint(0, V, (T, S), generator=g).to(DEVICE)
    w = torch.randn(V, D, generator=g).to(DEVICE)
    out = poison_like(torch.empty(T, S, D, device=DEVICE))
    SN.embed_sinusoidal_fwd(ids, w, pos, 0, 2.0, 10000.0, out)
    assert_all_written(out)
    assert_close(out, sref.embed_sinusoidal(ids, w.double(), pos, 2.0), sref.embed_sinusoidal(ids, w, pos, 2.0),
                 name="embedding")
    for deterministic, d in ((False, D), (True, 1500)):
        dout = torch.randn(T, S, d, generator=g).to(DEVICE)
        dw = poison_like(torch.empty(V, d, device=DEVICE))
        SN.embed_sinusoidal_bwd(dout, ids, 2.0, deterministic, dw)
        truth = torch.zeros(V, d, dtype=torch.float64, device=DEVICE).index_add_(0, ids.reshape(-1), dout.reshape(-1, d).double()) * 2.0
        base = torch.zeros(V, d, device=DEVICE).index_add_(0, ids.reshape(-1), dout.reshape(-1, d)) * 2.0
        assert_close(dw, truth, base, name=f"dweight deterministic={deterministic}")
