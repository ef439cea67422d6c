"""The host build of csrc (fastlm._C_host) checks itself: the emulated PTX against the PTX ISA's
fragment formulas, and each sanitizer check against a kernel with that bug planted.

The mma test kernel (csrc/host/selftest.cu) places every fragment element by the formulas of the
PTX ISA section "Matrix Fragments for mma.m16n8k16 with floating point type" (9.7.14.5.8 in the 8.x
manuals) and scatters D back by them; the one-hot cases below then pin the owner of each element of
A, B and C/D, one at a time.
"""

from __future__ import annotations

import re

import pytest
import torch

DTYPES = {1: torch.float16, 2: torch.bfloat16}


def _mma(H, code, A, B, C):
    A, B, C = (t.float().contiguous() for t in (A, B, C))
    D = torch.full((16, 8), float("nan"))
    rc = H.selftest_mma(code, A.data_ptr(), B.data_ptr(), C.data_ptr(), D.data_ptr())
    assert rc == 0, H.emulation_last_report()
    return D


@pytest.mark.parametrize("code", [1, 2], ids=["fp16", "bf16"])
def test_mma_m16n8k16_random_matches_matmul(C_host, code):
    dt = DTYPES[code]
    g = torch.Generator().manual_seed(code)
    A = torch.randn(16, 16, generator=g).to(dt).float()
    B = torch.randn(16, 8, generator=g).to(dt).float()
    Cm = torch.randn(16, 8, generator=g)
    D = _mma(C_host, code, A, B, Cm)
    truth = (A.double() @ B.double() + Cm.double()).float()
    assert torch.equal(D, truth)


@pytest.mark.parametrize("code", [1, 2], ids=["fp16", "bf16"])
def test_mma_m16n8k16_fragment_ownership(C_host, code):
    """One element at a time: A(r, k) = 1 moves row k of B into row r of D; B(k, n) = 1 moves column
    k of A into column n of D; with A = B = 0, D = C element for element."""
    dt = DTYPES[code]
    ramp_b = torch.arange(1, 9, dtype=torch.float32).to(dt).float()
    ramp_a = torch.arange(1, 17, dtype=torch.float32).to(dt).float()
    zeros_c = torch.zeros(16, 8)
    for r in range(16):
        for k in range(16):
            A = torch.zeros(16, 16)
            A[r, k] = 1
            B = torch.zeros(16, 8)
            B[k] = ramp_b
            want = torch.zeros(16, 8)
            want[r] = ramp_b
            assert torch.equal(_mma(C_host, code, A, B, zeros_c), want), f"A({r}, {k})"
    for k in range(16):
        for n in range(8):
            A = torch.zeros(16, 16)
            A[:, k] = ramp_a
            B = torch.zeros(16, 8)
            B[k, n] = 1
            want = torch.zeros(16, 8)
            want[:, n] = ramp_a
            assert torch.equal(_mma(C_host, code, A, B, zeros_c), want), f"B({k}, {n})"
    Cm = torch.arange(128, dtype=torch.float32).reshape(16, 8)
    assert torch.equal(_mma(C_host, code, torch.zeros(16, 16), torch.zeros(16, 8), Cm), Cm)


def _shfl_idx(t, src, width):
    lane = t % 32
    return 100 * (t - lane + lane - lane % width + src % width)


def _shfl_up(t, d, width):
    return 100 * (t - d) if t % 32 % width >= d else 100 * t


def _shfl_down(t, d, width):
    return 100 * (t + d) if t % 32 % width + d < width else 100 * t


def _shfl_xor(t, m, width):
    lane = t % 32
    return 100 * (t - lane + (lane ^ m)) if (lane ^ m) // width == lane // width else 100 * t


def _expected_warp_rows() -> list[list[int]]:
    """The CUDA C++ Programming Guide's warp shuffle and vote semantics, lane by lane, for the
    selftest_warp kernel: value 100 * tid; a source lane outside [0, width) of the segment (up/down)
    keeps the caller's own value; idx takes srcLane modulo width within the segment."""
    rows = [[0] * 64 for _ in range(12)]
    for t in range(64):
        lane, base = t % 32, t - t % 32
        rows[0][t], rows[1][t] = _shfl_idx(t, 5, 32), _shfl_idx(t, lane + 3, 8)
        rows[2][t], rows[3][t] = _shfl_up(t, 3, 32), _shfl_up(t, 2, 16)
        rows[4][t], rows[5][t] = _shfl_down(t, 5, 32), _shfl_down(t, 3, 4)
        rows[6][t], rows[7][t] = _shfl_xor(t, 9, 32), _shfl_xor(t, 3, 8)
        ballot = sum(1 << i for i in range(32) if (base + i) % 3 == 0)
        rows[8][t] = ballot - (1 << 32) if ballot >= 1 << 31 else ballot
        rows[9][t] = int(base == 32)
        rows[10][t] = int(base != 0)
        rows[11][t] = 100 * (t ^ 1) if lane < 16 else -1
    return rows


def test_warp_operations_follow_the_programming_guide(C_host):
    out = torch.full((12, 64), -7, dtype=torch.int32)
    assert C_host.selftest_warp(out.data_ptr()) == 0, C_host.emulation_last_report()
    assert out.tolist() == _expected_warp_rows()


def _conversion_probe() -> torch.Tensor:
    """Every fp16 value and its midpoints (ties both ways), the fp16 overflow and subnormal edges,
    bf16 ties, signed zeros, infinities, and random floats of every magnitude."""
    halves = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    halves = halves[torch.isfinite(halves)]
    mids = (halves[:-1] + halves[1:]) / 2
    edges = torch.tensor([65504.0, 65519.996, 65520.0, 65536.0, 2.0**-24, 2.0**-25, 1.5 * 2.0**-25, 2.0**-14, 1e-30,
                          0.0, -0.0, float("inf"), float("-inf"), 3.4e38])
    bf_ties = (torch.arange(0, 1 << 16, 7, dtype=torch.int64) << 16 | 0x8000).to(torch.int32).view(torch.float32)
    g = torch.Generator().manual_seed(0)
    rand = torch.randn(20000, generator=g) * torch.exp2(torch.randint(-140, 120, (20000,), generator=g).float())
    x = torch.cat([halves, mids, edges, -edges, bf_ties, rand])
    return x[torch.isfinite(x) | torch.isinf(x)]


@pytest.mark.parametrize("code", [1, 2], ids=["fp16", "bf16"])
def test_half_conversions_round_like_the_gpu(C_host, code):
    """fp32 -> fp16/bf16 rounds to nearest even with the GPU's overflow and subnormal behaviour
    (the same bits as torch's conversion), and back exactly; NaN becomes the GPU's 0x7fff."""
    x = _conversion_probe()
    bits = torch.empty(x.numel(), dtype=torch.int16)
    back = torch.empty_like(x)
    assert C_host.selftest_convert(code, x.data_ptr(), bits.data_ptr(), back.data_ptr(), x.numel()) == 0
    want = x.to(DTYPES[code])
    assert torch.equal(bits, want.view(torch.int16))
    assert torch.equal(back, want.float())
    nan = torch.tensor([float("nan"), -float("nan")])
    nb = torch.empty(2, dtype=torch.int16)
    assert C_host.selftest_convert(code, nan.data_ptr(), nb.data_ptr(), torch.empty(2).data_ptr(), 2) == 0
    assert nb.tolist() == [0x7FFF, 0x7FFF]


def test_planted_bugs_absent_pass(C_host):
    """The positive control: the same kernels with every bug removed run clean."""
    assert C_host.selftest_planted("none") == 0, C_host.emulation_last_report()
    assert C_host.emulation_last_report() == ""


PLANTED = {
    "race": (719, r"shared-memory race: thread \(\d+,0,0\) (reads|writes) 4 bytes at planted_race_kernel::s\+\d+ \(0x[0-9a-f]+\), which thread \(\d+,0,0\) (wrote|read)"),
    "oob_store": (700, r"out-of-bounds global store: thread \(63,0,0\), 4 bytes at 0x[0-9a-f]+: 0 bytes past the end of float32\[63\] out"),
    "shared_oob": (700, r"out-of-bounds shared store: thread \(31,0,0\), 4 bytes at 0x[0-9a-f]+ lie outside every __shared__ variable \(0 bytes past the end of planted_shared_oob_kernel::s \(128 bytes\)\)"),
    "uninit_shared": (719, r"uninitialised shared read: thread \((3[2-9]|[4-5]\d|6[0-3]),0,0\) reads 4 bytes at planted_uninit_kernel::s\+\d+"),
    "divergent_barrier": (719, r"divergent __syncthreads \(.*selftest.cu:\d+\)"),
    "warp_mismatch": (719, r"divergent warp operation: __shfl_(xor|down)_sync \(.*selftest.cu:\d+, mask 0xffffffff\) in warp 0: lanes 0x(ffff|ffff0000) arrived; never arriving: lanes 0x(ffff|ffff0000) \(at another warp operation, .*selftest.cu:\d+\)"),
    "warp_divergence": (719, r"divergent warp operation: .*selftest.cu:\d+, mask 0xffffffff.*lane (1[6-9]|2\d|3[01]) exited"),
}


@pytest.mark.parametrize("kind", sorted(PLANTED))
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_planted_bug_is_caught(C_host, kind, seed):
    """Each planted bug is reported, whatever the schedule, with the kernel, address and thread."""
    code, pattern = PLANTED[kind]
    C_host.emulation_set_seed(seed)
    assert C_host.selftest_planted(kind) == code
    report = C_host.emulation_last_report()
    assert re.search(pattern, report), report
    assert re.search(r"in kernel planted_\w+_kernel, block \(0,0,0\) \(grid \(1,1,1\), block \(\d+,1,1\), schedule seed " + str(seed) + r"\)", report), report
    assert C_host.selftest_planted("none") == 0, C_host.emulation_last_report()


def test_unknown_planted_kind_is_rejected(C_host):
    assert C_host.selftest_planted("nonsense") == 1


def test_shared_variables_found_in_symbol_table(C_host):
    """Every __shared__ variable of the kernels is found (the checks depend on it), with its size."""
    found = dict(C_host.emulation_shared_variables())
    assert found["planted_race_kernel::s"] == 256
    assert found["layer_norm_fwd_kernel<float, float, false, 4>::red"] > 0
    assert any(name.startswith("decode_split_kernel<") for name in found)
    assert any(name.startswith("sampling_kernel<") for name in found)


def _exercise_every_instantiation():
    """One small call per template instantiation the launchers can pick (dtype, weight dtype,
    vector width, flags, head dim, query-block size)."""
    import fastlm
    from fastlm.cuda import attention as cattn

    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
    for dt in (f32, f16, bf16):
        for wdt in {dt, f32}:
            for N in (64, 97, 16392, 16393):  # vector width kMaxVec, then 1; one register tile, then the long-row kernels
                for rms in (False, True):
                    x = torch.randn(3 if N < 1000 else 1, N).to(dt).requires_grad_()
                    w = torch.randn(N).to(wdt).requires_grad_()
                    if rms:
                        y = fastlm.ops.rms_norm(x, (N,), w, 1e-5, backend="cuda")
                    else:
                        y = fastlm.ops.layer_norm(x, (N,), w, torch.randn(N).to(wdt), 1e-5, backend="cuda")
                    y.backward(torch.randn_like(y))
        q32 = torch.randn(1, 2, 5, 32).to(dt)
        k32 = torch.randn(1, 1, 5, 32).to(dt)
        for q, k in ((q32[..., :16], k32[..., :16]), (q32[..., ::2], k32[..., ::2])):  # rotary's vector path, any-stride path
            for interleaved in (False, True):
                fastlm.ops.rotary(q, k, torch.arange(5)[None], interleaved=interleaved, backend="cuda")
            for cdt in (f32, f16, bf16):
                cos, sin = torch.randn(1, 5, 16).to(cdt), torch.randn(1, 5, 16).to(cdt)
                for interleaved in (False, True):
                    fastlm.ops.apply_rotary_pos_emb(q, k, cos, sin, interleaved=interleaved, backend="cuda")
        for D in (8, 6):  # the backward's vector kernels, then its any-width ones
            w = torch.randn(10, D).to(dt).requires_grad_()
            for det in (True, False):  # 80 tokens of 3 ids: runs cross the 32-row chunks
                out = fastlm.ops.embed_sinusoidal(torch.randint(0, 3, (2, 40)), w, deterministic=det, backend="cuda")
                out.backward(torch.randn_like(out))
        fastlm.ops.embed_sinusoidal(torch.randint(0, 10, (2, 3)), torch.randn(10, 8).to(dt)[:, :6], backend="cuda")  # any-stride path
        logits = torch.randn(2, 50).to(dt)
        fastlm.ops.sample(logits, top_k=5, top_p=0.9, seed=0, backend="cuda")
        fastlm.ops.top_k_top_p_filter(logits, top_k=5, top_p=0.9, backend="cuda")
        seed, loads = torch.tensor([0, 0]), torch.zeros(2, dtype=torch.int64)  # the load-counting instantiations
        fastlm.cuda.sampling.sample(logits, 1.0, 5, 0.9, None, seed, torch.empty(2, dtype=torch.int64), None, loads=loads)
        fastlm.cuda.sampling.top_k_top_p_filter(logits, 5, 0.9, None, torch.empty_like(logits), torch.empty(2, dtype=torch.int64), loads=loads)
    for dt in (f16, bf16):
        for D in (64, 96, 128):
            q = torch.randn(1, 2, 9, D).to(dt).requires_grad_(D != 96)  # the backward serves D 64 and 128
            kv = torch.randn(1, 1, 9, D).to(dt)
            out = fastlm.ops.attention(q, kv, kv, causal=True, backend="cuda")
            if D != 96:
                out.backward(torch.randn_like(out))
            long_kv = torch.randn(1, 1, 520, D).to(dt)  # 2 blocks on 132 SMs, 520 keys: 2 splits, the combine runs
            fastlm.ops.attention(q.detach(), long_kv, long_kv, backend="cuda")
        for D in (64, 128, 256):
            for Sq in (1, 5, 9):  # 4, 20 and 36 rows per key/value head: 1, 2 and 4 m tiles
                q = torch.randn(1, 4, Sq, D).to(dt)
                kv = torch.randn(1, 1, 200, D).to(dt)  # two splits: the combine kernel runs
                fastlm.ops.decode_attention(q, kv, kv, torch.tensor([150], dtype=torch.int32), backend="cuda")
                pages = torch.randn(3, 1, 16, D).to(dt)  # the paged split kernel
                fastlm.ops.decode_attention(q, pages, pages, torch.tensor([40], dtype=torch.int32),
                                            block_table=torch.tensor([[2, 0, 1]], dtype=torch.int32), backend="cuda")
                out, lse = torch.empty_like(q), torch.empty(q.shape[:3])  # the OPTIONS split kernels (launcher keywords)
                cattn.decode_attention_fwd(q, kv, kv, torch.tensor([150], dtype=torch.int32), 0.1, -1, -1, out, lse, softcap=3.0)
                cattn.decode_attention_fwd(q, pages, pages, torch.tensor([40], dtype=torch.int32), 0.1, -1, -1, out, lse,
                                           block_table=torch.tensor([[2, 0, 1]], dtype=torch.int32), alibi_slopes=torch.ones(4))
        for D in (64, 96, 128):  # the forward's VARLEN and OPTIONS kernels
            q, kv, cu = torch.randn(9, 2, D).to(dt), torch.randn(9, 1, D).to(dt), torch.tensor([0, 4, 9], dtype=torch.int32)
            for opts in ({}, {"softcap": 5.0}):
                cattn.attention_varlen_fwd(q, kv, kv, cu, cu, 5, 5, True, 0.1, -1, -1, torch.empty_like(q), torch.empty(2, 9), **opts)
            q, kv = torch.randn(1, 2, 9, D).to(dt), torch.randn(1, 1, 9, D).to(dt)
            cattn.attention_fwd(q, kv, kv, True, 0.1, -1, -1, torch.empty_like(q), torch.empty(1, 2, 9), softcap=5.0)
        for D in (64, 128):  # the backward's VARLEN and OPTIONS kernels
            q, kv, cu = torch.randn(9, 2, D).to(dt), torch.randn(9, 1, D).to(dt), torch.tensor([0, 4, 9], dtype=torch.int32)
            grads = (torch.empty_like(q), torch.empty_like(kv), torch.empty_like(kv))
            for opts in ({}, {"softcap": 5.0}):
                cattn.attention_varlen_bwd(q, None, q, kv, kv, q, torch.zeros(2, 9), cu, cu, 5, 5, True, 0.1, -1, -1, *grads, **opts)
            q, kv = torch.randn(1, 2, 9, D).to(dt), torch.randn(1, 1, 9, D).to(dt)
            grads = (torch.empty_like(q), torch.empty_like(kv), torch.empty_like(kv))
            cattn.attention_bwd(q, None, q, kv, kv, q, torch.zeros(1, 2, 9), True, 0.1, -1, -1, *grads, softcap=5.0)
    for dt in (f32, f16, bf16):
        for D in (16, 10):  # paged_kv_append's 16-byte copies (on 16-byte rows), then its element copies
            pages = torch.randn(2, 1, 16, D).to(dt)
            new = torch.randn(1, 1, 3, D).to(dt)
            fastlm.ops.paged_kv_append(pages, pages.clone(), torch.tensor([[1, 0]], dtype=torch.int32),
                                       torch.tensor([14], dtype=torch.int32), new, new, backend="cuda")


def test_every_kernel_instantiation_executes(C_host):
    """The host tier runs every kernel the module contains: each instantiation in its symbol table
    (other than the self-tests) is launched by some op call."""
    before = dict(C_host.emulation_launch_counts())
    _exercise_every_instantiation()
    after = C_host.emulation_launch_counts()
    kernels = [k for k in C_host.emulation_kernels() if not k.startswith(("planted_", "selftest_"))]
    assert len(kernels) >= 100
    missed = [k for k in kernels if after.get(k, 0) == before.get(k, 0)]
    assert not missed, f"{len(missed)} kernel instantiations never ran: {missed}"


def _expected_ldmatrix(num: int, trans: bool) -> list[list[int]]:
    """PTX ISA, ldmatrix: without .trans lane l holds row l // 4, columns 2 (l % 4) and 2 (l % 4) + 1
    of each matrix (lower column in the low half); with .trans, column l // 4, rows 2 (l % 4), +1.
    The test matrices have element (i, r, c) = 64 i + 8 r + c."""
    rows = []
    for lane in range(32):
        r, c = lane // 4, 2 * (lane % 4)
        regs = []
        for i in range(num):
            lo, hi = (64 * i + 8 * c + r, 64 * i + 8 * (c + 1) + r) if trans else (64 * i + 8 * r + c, 64 * i + 8 * r + c + 1)
            regs.append(lo | hi << 16)
        rows.append(regs)
    return rows


def test_ldmatrix_fragment_ownership(C_host):
    out = torch.full((6, 32, 4), -1, dtype=torch.int32)  # every register value is below 2^24
    assert C_host.selftest_ldmatrix(out.data_ptr()) == 0, C_host.emulation_last_report()
    for v, (num, trans) in enumerate([(4, False), (4, True), (2, False), (2, True), (1, False), (1, True)]):
        assert out[v, :, :num].tolist() == _expected_ldmatrix(num, trans), f"x{num} trans={trans}"


def test_cp_async_copies_at_the_wait_and_zero_fills(C_host):
    src = torch.randn(256)
    out = torch.full((256,), float("nan"))
    assert C_host.selftest_cp_async(out.data_ptr(), src.data_ptr(), False) == 0, C_host.emulation_last_report()
    want = src.clone()
    want[254:] = 0  # the last chunk copies 8 of its 16 bytes and zero-fills the rest
    assert torch.equal(out, want)


def test_cp_async_read_before_its_wait_is_caught(C_host):
    """Reading a cp.async destination whose group the thread has not waited for: the copy has not
    landed (the emulation performs it at the wait), so the read is of bytes never written."""
    src, out = torch.randn(256), torch.empty(256)
    assert C_host.selftest_cp_async(out.data_ptr(), src.data_ptr(), True) == 719
    assert re.search(r"uninitialised shared read: thread \(\d+,0,0\) reads 4 bytes at planted_cp_async_kernel::s\+\d+",
                     C_host.emulation_last_report()), C_host.emulation_last_report()
