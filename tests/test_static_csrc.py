"""The compile tier for csrc, with no GPU: every kernel instantiation in the built fastlm._C, for
sm_80 and sm_90a, read back from the module's cubins (fastlm.audit.csrc), and the launch grids the
launchers compute for large batch x heads.

Gates (fastlm.audit.sass.violations): no spill (local memory, STL/LDL) and no stack frame in an
instantiation a launcher uses unless csrc.ALLOWED gives the reason; shared memory within the
target; tensor-core instructions in the attention forward; 128-bit loads in the vectorised
memory-bound kernels. Grid x holds 2^31 - 1 blocks, y and z only 65535: the launchers put batch x
heads on x, and their grid functions (bound from csrc) are checked here past 65535.
"""

from __future__ import annotations

import itertools
import math
import re

import pytest
import torch

from fastlm.audit import csrc, sass

ARCHS = ("sm_80", "sm_90a")
OPS = {"layer_norm", "attention", "decode_attention", "rotary", "sinusoidal", "sampling"}
MAX_X, MAX_YZ = 2**31 - 1, 65535
CUDA_ERROR_INVALID_VALUE = 1




@pytest.fixture(scope="module")
def rows(C):
    why = sass.have_tools()
    if why:
        pytest.fail(f"cannot read fastlm._C's cubins: {why}")
    return csrc.rows(C.__file__)


def _table(rs) -> str:
    return "\n".join(
        f"  {r.kernel} [{r.config}] {r.arch}: regs {r.regs}, stack {r.stack} B, local {r.local} B, "
        f"STL {r.sass.get('STL', 0)}, LDL {r.sass.get('LDL', 0)}, shared {r.shared} B"
        for r in rs
    )


# ---- the module's instantiations ------------------------------------------------------------


def test_both_archs_in_every_instantiation(rows):
    archs = {}
    for r in rows:
        archs.setdefault((r.kernel, r.config), set()).add(r.arch)
    missing = {k: sorted(set(ARCHS) - a) for k, a in archs.items() if not set(ARCHS) <= a}
    assert {r.arch for r in rows} >= set(ARCHS), (
        f"fastlm._C holds cubins for {sorted({r.arch for r in rows})}; build it for both with "
        f'FASTLM_CUDA_ARCHS="80;90a" (the default)'
    )
    assert not missing, f"instantiations missing an arch: {missing}"


def test_every_kernel_is_classified(rows):
    unknown = sorted({r.kernel for r in rows if r.op == "unknown"})
    assert not unknown, f"kernels not in fastlm.audit.csrc.KERNELS (add op, threads, kind): {unknown}"
    assert {r.op for r in rows} == OPS
    assert all(r.source == "csrc" and r.role == "default" for r in rows)


def test_no_spill_or_stack_frame(rows):
    offenders = [r for r in rows if r.role == "default" and not sass.exempt(r, "spill") and sass.spills(r)]
    assert not offenders, (
        f"{len(offenders)} launcher-reachable instantiations spill or keep a stack frame "
        f"(fix them, or list them in fastlm.audit.csrc.ALLOWED with a reason):\n{_table(offenders)}"
    )


def test_shared_memory_within_target(rows):
    over = [r for r in rows if r.shared > sass.TARGETS[r.arch]["smem_block"]]
    assert not over, f"shared memory over the per-block limit:\n{_table(over)}"


def test_all_gates(rows):
    bad = {f"{r.kernel} [{r.config}] {r.arch}": v for r in rows if (v := sass.violations(r))}
    assert not bad, "\n".join(f"{k}: {'; '.join(v)}" for k, v in bad.items())


def test_allowed_entries_are_live(rows):
    names = [f"{r.kernel} {r.config}" for r in rows]
    stale = [p for p in csrc.ALLOWED if not any(re.search(p, n) for n in names)]
    assert not stale, f"csrc.ALLOWED patterns that match no instantiation: {stale}"
    unnamed = {p: why for p, why in csrc.ALLOWED.items() if why.split(":", 1)[0].strip() not in sass.GATES}
    assert not unnamed, f"csrc.ALLOWED reasons must start with the gate they lift (sass.GATES): {unnamed}"


def test_rows_carry_launch_facts(rows):
    fwd = [r for r in rows if r.kernel == "attention_fwd_kernel"]
    assert len(fwd) == 2 * 3 * 4 * len(ARCHS)  # fp16/bf16 x D 64/96/128 x VARLEN x OPTIONS
    for r in fwd:
        cfg = dict(kv.split("=") for kv in r.config.split())
        d = int(cfg["D"])
        assert r.kind == "matrix" and r.threads == 256
        assert r.shared >= (128 + 4 * 64) * (d + 8) * 2  # the dynamic Q tile and two K/V stages
        assert r.occupancy >= 1
        assert r.require == ("LDSM", "LDGSTS") and r.max_per_mma == (5.0 if d == 128 and cfg["OPTIONS"] == "0" else 0.0)
        assert r.per_mma is not None and r.sass["loop_mma"] == d  # QK^T and PV: 2 x (16 rows x 64 keys x D) / (16 x 8 x 16)
    split = {r.config for r in rows if r.kernel == "decode_split_kernel" and r.arch == "sm_90a"}
    assert split == {f"T={t} D={d} MT={m}" for t in ("fp16", "bf16") for d in (64, 128, 256) for m in (1, 2, 4)}


def test_parse_demangled_names():
    name = "void fastlm::(anonymous namespace)::decode_split_kernel<__half, 64, 4>(fastlm::(anonymous namespace)::P)"
    kernel, args = csrc.parse(name)
    assert (kernel, args) == ("decode_split_kernel", ["__half", "64", "4"])
    assert csrc.config_of(kernel, args)[0] == "T=fp16 D=64 MT=4"
    assert csrc.parse("void fastlm::(anonymous namespace)::k<float>(float const*, long)") == ("k", ["float"])


def test_main_loop_is_the_backward_branch_range_with_the_most_mma():
    text = """
        Function : k
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   HMMA.16816.F32 R4, R8, R12, R4 ;
        /*0020*/                   IADD3 R2, R2, 0x1, RZ ;
        /*0030*/                   HMMA.16816.F32 R4, R8, R12, R4 ;
        /*0040*/                   LDSM.16.M88.4 R8, [R3] ;
        /*0050*/                   HMMA.16816.F32 R4, R8, R12, R4 ;
        /*0060*/               @P0 BRA 0x20 ;
        /*0070*/                   LDGSTS.E.BYPASS.128 [R5], desc[UR4][R6.64] ;
        /*0080*/                   LDGSTS.E [R5], desc[UR4][R6.64] ;
        /*0090*/              @!P1 BRA 0x70 ;
        /*00a0*/                   EXIT ;
    """
    (counts,) = sass.count_sass(text).values()
    assert (counts["loop"], counts["loop_mma"]) == (5, 2)  # 0x20..0x60: the loop with the most HMMAs
    assert counts["HMMA"] == 3 and counts["LDSM"] == 1 and counts["LDGSTS"] == 2 and counts["LDGSTS.128"] == 1
    assert sass.main_loop([(0, "HMMA.16816.F32", " R4"), (16, "BRA", " 0x20")]) == (0, 0)  # a forward branch


def test_evidence_gates_can_fail():
    good = dict(HMMA=128, LDSM=64, LDGSTS=8, loop=600, loop_mma=128)
    row = sass.Row(source="csrc", op="attention", kernel="k", config="", arch="sm_90a", kind="matrix",
                   sass=good, require=("LDSM", "LDGSTS"), max_per_mma=5.0)
    assert sass.violations(row) == [] and row.per_mma == 600 / 128
    row.sass = {**good, "LDGSTS": 0, "loop": 700}
    assert sass.violations(row) == ["the design's instructions missing from the SASS: LDGSTS",
                                    "main loop: 5.47 instructions per MMA > 5"]
    mem = sass.Row(source="csrc", op="d", kernel="k", config="", arch="sm_90a", kind="memory", sass={"LDGSTS.128": 4})
    assert sass.violations(mem) == []  # 16-byte cp.async is a 128-bit load
    mem.sass = {"LDGSTS": 4, "LDG.32": 2}
    assert sass.violations(mem) and "128-bit" in sass.violations(mem)[0]


# ---- launch grids past 65535 (batch x heads on grid x) ----------------------------------------


def _within(grid) -> bool:
    x, y, z = grid
    return 1 <= x <= MAX_X and 1 <= y <= MAX_YZ and 1 <= z <= MAX_YZ


@pytest.mark.parametrize("B,Hq,Sq,splits", [(70000, 1, 1, 1), (7, 10000, 200, 1), (1, 70000, 128, 1), (2**31 - 1, 1, 128, 1),
                                            (70000, 1, 1, 3), (1, 1, 300, 32)])
def test_attention_fwd_grid_large_batch_heads(C, B, Hq, Sq, splits):
    grids = C.attention_fwd_grids(B, Hq, Sq, splits)
    mblocks = math.ceil(Sq / C.attention_fwd_block_rows())
    assert C.attention_fwd_block_rows() == 128
    assert all(_within(g) for g in grids) and len(grids) == (1 if splits == 1 else 2)  # forward[, combine]
    assert grids[0][0] * grids[0][1] * grids[0][2] == B * Hq * mblocks * splits
    if splits > 1:
        assert grids[1][0] == min(math.ceil(B * Hq * Sq / 4), MAX_X)  # the combine kernel strides over the rest
    last = grids[0][0] - 1
    for reverse in (False, True):
        assert tuple(C.attention_fwd_block(last, Hq, Sq, reverse, splits)) == (B - 1, Hq - 1, 0 if reverse else mblocks - 1, splits - 1)
        assert tuple(C.attention_fwd_block(0, Hq, Sq, reverse, splits)) == (0, 0, mblocks - 1 if reverse else 0, 0)


def test_attention_fwd_grid_too_large_is_refused(C):
    assert C.attention_fwd_grids(2**31 - 1, 1, 129, 1) == []
    assert C.attention_fwd_grids(2**40, 2**40, 1, 1) == []
    assert C.attention_fwd_grids(2**30, 1, 1, 2) == []
    assert C.attention_fwd_grids(1, 1, 1, 0) == []
    code = C.attention_fwd(0, 0, 0, 0, 0, 0, 0, 2**31 - 1, 1, 1, 129, 1, 64, [8] * 14, 1.0, False, -1, -1, 1, 1, 0)
    assert code == CUDA_ERROR_INVALID_VALUE
    code = C.attention_fwd(0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2**30, 64, [8] * 14, 1.0, False, -1, -1, 1, 1, 0)
    assert code == CUDA_ERROR_INVALID_VALUE  # Sq + Sk past 2^30 - 1
    for scale in (0.0, -1.0, float("nan"), float("inf")):
        assert C.attention_fwd(0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 64, [8] * 14, scale, False, -1, -1, 1, 1, 0) == CUDA_ERROR_INVALID_VALUE
    code = C.attention_fwd(0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 64, [8] * 14, 1.0, False, -1, -1, 2, 1, 0)
    assert code == CUDA_ERROR_INVALID_VALUE  # splits without workspaces


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("splits", [1, 3])
def test_attention_fwd_blocks_cover_every_tile_once(C, reverse, splits):
    B, Hq, Sq = 2, 3, 260
    grids = C.attention_fwd_grids(B, Hq, Sq, splits)
    seen = [tuple(C.attention_fwd_block(i, Hq, Sq, reverse, splits)) for i in range(grids[0][0])]
    assert sorted(seen) == list(itertools.product(range(B), range(Hq), range(3), range(splits)))
    if reverse:
        assert [s[2] for s in seen[: 3 * splits : splits]] == [2, 1, 0]  # the longest key ranges first


@pytest.mark.parametrize("B,Hq,Hkv,Sq,splits", [(70000, 1, 1, 1, 4), (70000, 32, 8, 16, 64), (2**31 - 1, 4, 1, 16, 1)])
def test_decode_grids_large_batch_heads(C, B, Hq, Hkv, Sq, splits):
    split, combine = C.decode_attention_grids(B, Hq, Hkv, Sq, splits)
    assert _within(split) and _within(combine)
    assert tuple(split) == (B * Hkv, splits, 1)  # one block per key/value head and split
    assert combine[0] == min(math.ceil(B * Hq * Sq / 4), MAX_X)  # the combine kernel strides over the rest
    assert tuple(C.decode_attention_block(B * Hkv - 1, Hkv)) == (B - 1, Hkv - 1)
    assert tuple(C.decode_attention_block(Hkv, Hkv)) == (1, 0)


def test_decode_grid_too_large_is_refused(C):
    assert C.decode_attention_grids(2**31, 1, 1, 1, 1) == []
    assert C.decode_attention_grids(1, 1, 1, 1, 65536) == []
    assert C.decode_attention_grids(1, 65, 1, 1, 1) == []  # more than 64 rows per key/value head


@pytest.mark.parametrize("B,S,HQ,HK,R", [(70000, 1, 8, 2, 64), (70000, 3, 1, 0, 2), (1, 5, 70000, 0, 128)])
def test_rotary_grid_large_batch(C, B, S, HQ, HK, R):
    (grid,) = C.rotary_grids(B, S, HQ, HK, R, 132)
    assert _within(grid)
    last = C.rotary_block(grid[0] - 1, B, S, HQ, HK, R, 132)
    assert last[1] == B - 1 and min(last) >= 0


def test_rotary_blocks_cover_every_tile_once(C):
    B, S, HQ, HK, R, sms = 3, 5, 2, 1, 8, 132  # 4 pairs -> 32 positions per block: 1 position block
    (grid,) = C.rotary_grids(B, S, HQ, HK, R, sms)
    seen = [tuple(C.rotary_block(i, B, S, HQ, HK, R, sms)) for i in range(grid[0])]
    groups = grid[0] // B
    assert groups == HQ + HK  # one head per group: 3 blocks per batch are far under 4 per SM
    assert sorted(seen) == list(itertools.product(range(1), range(B), range(groups)))
    assert C.rotary_block(grid[0], B, S, HQ, HK, R, sms) == [-1, -1, -1]


def test_launchers_accept_large_batch_heads_without_gpu(C):
    """Before: attention_fwd (B * Hq > 65535), decode (B > 65535) and rotary (B > 65535) returned
    cudaErrorInvalidValue. Now they get to the launch, which fails only for want of a device."""
    if C.device_count() > 0:
        pytest.skip("a CUDA device is present: the fake pointers below would be dereferenced")
    fake = 1 << 20
    code = C.attention_fwd(fake, fake, fake, fake, fake, 0, 0, 70000, 1, 1, 1, 1, 64, [64] * 14, 1.0, False, -1, -1, 1, 1, 0)
    assert code not in (0, CUDA_ERROR_INVALID_VALUE), code
    code = C.decode_attention_fwd(fake, fake, fake, fake, fake, fake, fake, fake, 70000, 1, 1, 1, 16, 64,
                                  [64] * 14, 1, 1.0, -1, 0, 1, 0)
    assert code not in (0, CUDA_ERROR_INVALID_VALUE), code
    code = C.rotary(fake, fake, fake, fake, 0, 0, 0, 0, 0, 70000, 1, 1, 1, 64, 64, [64] * 24, 0, 10000.0,
                    False, False, 1, 0)
    assert code not in (0, CUDA_ERROR_INVALID_VALUE), code


def test_python_gate_takes_cuda_past_65535(C, monkeypatch):
    from fastlm.cuda import attention as cattn

    monkeypatch.setattr(cattn, "lib", lambda device=None: C)
    q = torch.empty(1, 1, 1, 64, dtype=torch.float16).expand(70000, 1, 1, 64)
    assert cattn.fwd_runs_cuda(q, q, q, False, -1, -1, q)
    assert cattn.decode_runs_cuda(q, q, q)
