"""The compile tier for the Triton kernels: every config a launcher can pick, compiled for a GPU
target by the real Triton compiler on a machine with no GPU.

A ``Plan`` is one kernel launch as a launcher would issue it on a GPU: the kernel, its
constexprs and launch options (taken from the launcher's own config functions, so the audit and
the launchers cannot drift apart), and its runtime arguments, with tensors given as dtypes (Triton's
MockTensor: a 16-byte aligned pointer) and integer sizes and strides as multiples of 16, which is
how the launchers see aligned inputs; unit strides are 1, as Triton specialises them. ``compile_plan``
compiles it for sm_90a or sm_80 under a stand-in driver that reports that target, and reads the
cubin with fastlm.audit.sass. Must run in a process where TRITON_INTERPRET is unset.

Plans come in two sets: ``default`` (every default / heuristic config, across head dims, dtypes and
feature flags by a covering design: every pair of (size, dtype, flag) values occurs), checked on
every `make test`; and ``exhaustive`` (the full product, and every autotune candidate after
pruning), checked by `make static-check`.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from dataclasses import dataclass, field

import torch

from fastlm.audit import sass

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class Plan:
    op: str
    kernel: object  # a triton JITFunction (the raw kernel, never the autotuner)
    config: str
    values: dict  # runtime argument name -> torch dtype (a tensor), None, int or float; others 64
    meta: dict  # constexprs and num_warps / num_stages
    role: str = "default"
    kind: str = "other"
    allowed: str | None = None
    ptx_forbid: tuple = ()  # PTX instructions the kernel must not contain, with the reason
    extra: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.kernel.__name__

    def args(self) -> list:
        return [self.values.get(p.name, 64) for p in self.kernel.params if not p.is_constexpr]


class _TargetDriver:
    """Stands in for Triton's CUDA driver: reports one GPU target, never touches a device."""

    def __init__(self, cc: int):
        from triton.backends.compiler import GPUTarget

        self.cc = cc
        self.target = GPUTarget("cuda", cc, 32)

    def get_current_device(self):
        return self.cc  # one JIT cache per target

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_benchmarker(self):
        raise RuntimeError("the compile tier never benchmarks")


@contextlib.contextmanager
def target(cc: int):
    from triton.runtime import driver

    saved = driver._active
    driver.set_active(_TargetDriver(cc))
    try:
        yield
    finally:
        driver._active = saved


def compile_plan(plan: Plan, cc: int) -> sass.Row:
    arch = sass.ARCHS[cc]
    threads = 32 * plan.meta.get("num_warps", 4)
    row = sass.Row(source="triton", op=plan.op, kernel=plan.name, config=plan.config, arch=arch, role=plan.role,
                   kind=plan.kind, threads=threads, allowed=plan.allowed)
    t0 = time.perf_counter()
    try:
        with target(cc):
            k = plan.kernel.warmup(*plan.args(), grid=(1,), **plan.meta)
    except Exception as exc:  # noqa: BLE001 - a compile error is the finding, reported per row
        row.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"[:300]
        return row
    res, counts = sass.cubin_facts(k.asm["cubin"])
    row.regs = res.get("REG", 0)
    row.local = res.get("LOCAL", 0)
    row.stack = res.get("STACK", 0)
    row.shared = res.get("SHARED", 0) + int(getattr(k.metadata, "shared", 0) or 0)
    row.sass = counts
    row.occupancy = sass.occupancy(arch, threads, row.regs, row.shared)
    ptx = k.asm.get("ptx", "")
    for ins, why in plan.ptx_forbid:
        if ins in ptx:
            row.error = f"PTX contains {ins} ({why})"
    row.sass["compile_s"] = round(time.perf_counter() - t0, 2)
    return row


# ---- plans -----------------------------------------------------------------------------------------


def _cover(*axes):
    """A covering design over the axes: every pair of values of any two axes occurs at least once
    (greedy), with far fewer combinations than the full product."""
    full = list(itertools.product(*axes))
    need = {(i, a, j, b) for i, j in itertools.combinations(range(len(axes)), 2) for a in axes[i] for b in axes[j]}
    chosen = []
    while need:
        best = max(full, key=lambda c: sum((i, c[i], j, c[j]) in need for i, j in itertools.combinations(range(len(c)), 2)))
        chosen.append(best)
        need -= {(i, best[i], j, best[j]) for i, j in itertools.combinations(range(len(best)), 2)}
        full.remove(best)
    return chosen


def _grid(axes, exhaustive):
    return list(itertools.product(*axes)) if exhaustive else _cover(*axes)


_MASKS = {"full": (False, -1, -1), "causal": (True, -1, -1), "window": (False, 128, 32)}
FP32_FMA = ("tensor-cores: fp32 at head dims over 128 runs IEEE FMA dots on small tiles (slow, documented in the "
            "README): no 3xTF32 tile fits the register file without spilling")
FP32_FMA_DROPOUT = ("tensor-cores: fp32 dK/dV with dropout at head dim 128 runs IEEE FMA dots (slow, documented in the "
                    "README): every 3xTF32 tile spills with the Philox words beside the hi/lo operand halves")


# the attention options' constexprs (fastlm/triton/attention_options.py) and their runtime arguments
_OPTIONS = {"softcap": dict(HAS_SOFTCAP=True), "alibi": dict(HAS_ALIBI=True), "dropout": dict(HAS_DROPOUT=True),
            "softcap+alibi": dict(HAS_SOFTCAP=True, HAS_ALIBI=True),
            "all": dict(HAS_SOFTCAP=True, HAS_ALIBI=True, HAS_DROPOUT=True)}
_OPTION_VALUES = dict(cap_in=0.0025, cap_out=72.1, Slopes=torch.float32, stride_sb=16, Seed=torch.int64, drop_thresh=2**30,
                      drop_scale=1.25)


def _option_values(options: str | None) -> tuple[dict, dict, str]:
    """(runtime values, constexprs, label suffix) of an _OPTIONS entry; None: no option (Slopes and Seed None)."""
    if options is None:
        return dict(Slopes=None, Seed=None), {}, ""
    flags = _OPTIONS[options]
    vals = dict(_OPTION_VALUES)
    if "HAS_ALIBI" not in flags:
        vals["Slopes"] = None
    if "HAS_DROPOUT" not in flags:
        vals["Seed"] = None
    return vals, flags, f" {options}"


def _attention_pointer_plans(A, D: int, dt: str, mask: str, exhaustive: bool, cc: int, varlen: bool = False,
                             options: str | None = None) -> list[Plan]:
    """The pointer forward, dK/dV and dQ kernels at one (head dim, dtype, mask); ``varlen``: their
    packed-sequence variant (IS_VARLEN, attention_varlen's launchers); ``options``: an _OPTIONS entry
    (softcap / ALiBi / dropout constexprs on)."""
    dtype = DTYPES[dt]
    fp32 = dtype == torch.float32
    meta, left, right = A.fwd_meta(D, dtype, *_MASKS[mask])
    opt_vals, opt_meta, opt_label = _option_values(options)
    base = f"D={D} {dt} {mask}{' varlen' if varlen else ''}{opt_label}"
    extra = dict(CU_Q=torch.int32, CU_K=torch.int32, TOTAL_Q=4096) if varlen else {}
    extra.update(opt_vals)
    plans = []
    for kind, kernel, ptrs in (
        ("fwd", A._attn_fwd_kernel, dict(Q=dtype, K=dtype, V=dtype, O=dtype, LSE=torch.float32)),
        ("dkdv", A._attn_bwd_dkdv_kernel, dict(Q=dtype, K=dtype, V=dtype, DO=dtype, LSE2=torch.float32,
                                               Delta=torch.float32, DK=dtype, DV=dtype)),
        ("dq", A._attn_bwd_dq_kernel, dict(Q=dtype, K=dtype, V=dtype, DO=dtype, LSE2=torch.float32,
                                           Delta=torch.float32, DQ=dtype)),
    ):
        vals = dict(ptrs, LEFT=left, RIGHT=right, qk_scale=0.18, sm_scale=0.125, GROUP=2, Hq=8, Hkv=4,
                    Sq=1000, Sk=1000, SEQ_BUCKET=1024, **extra)
        kmeta = A.dkdv_meta(meta, opt_meta) if kind == "dkdv" else {**meta, **opt_meta}
        cfgs = A.candidates(kind, meta["BLOCK_D"], fp32, meta["EVEN_D"], cc, varlen, "HAS_DROPOUT" in opt_meta,
                            "HAS_SOFTCAP" in opt_meta or "HAS_ALIBI" in opt_meta)
        cfgs = cfgs if exhaustive else cfgs[:1]
        for i, cfg in enumerate(cfgs):
            c = dict(cfg)
            label = f"{base} BM={c['BLOCK_M']} BN={c['BLOCK_N']} w{c['num_warps']} s{c['num_stages']}"
            plans.append(Plan("attention", kernel, label, vals, {**kmeta, **c, **({"IS_VARLEN": True} if varlen else {})},
                              role="default" if i == 0 else "candidate", kind="matrix",
                              allowed=(FP32_FMA if D > 128 else FP32_FMA_DROPOUT) if kmeta["DOT_PREC"] == "ieee" else None))
    return plans


def attention_plans(exhaustive: bool = False, cc: int = 90) -> list[Plan]:
    from fastlm.triton import attention as A

    plans = []
    for D, dt, mask in _grid([(64, 80, 96, 128, 256), tuple(DTYPES), tuple(_MASKS)], exhaustive):
        dtype = DTYPES[dt]
        fp32 = dtype == torch.float32
        meta, left, right = A.fwd_meta(D, dtype, *_MASKS[mask])
        base = f"D={D} {dt} {mask}"
        plans += _attention_pointer_plans(A, D, dt, mask, exhaustive, cc)
        if cc == 90 and meta["DOT_PREC"] != "ieee":  # where fastlm.triton.attention.uses_tma may pick it
            for i, cfg in enumerate(A.candidates("fwd_tma", meta["BLOCK_D"], fp32, meta["EVEN_D"], cc)[: None if exhaustive else 1]):
                c = dict(cfg)
                vals = dict(_tma_descriptors(A, dtype, D, {**meta, **c}), LSE=torch.float32, LEFT=left, RIGHT=right,
                            qk_scale=0.18, GROUP=2, Hq=8, Sq=1000, Sk=1000, SEQ_BUCKET=1024)
                label = f"{base} BM={c['BLOCK_M']} BN={c['BLOCK_N']} w{c['num_warps']} s{c['num_stages']}"
                plans.append(Plan("attention", A._attn_fwd_tma_kernel, label, vals, {**meta, **c},
                                  role="default" if i == 0 else "candidate", kind="matrix"))
        if mask == "full":
            plans.append(Plan("attention", A._bwd_preprocess_kernel, f"D={D} {dt} BM={A.PREPROCESS_BLOCK_M}",
                              dict(O=dtype, DO=dtype, Delta=torch.float32, Hq=8, Sq=1000),
                              dict(HEAD_DIM=D, BLOCK_D=meta["BLOCK_D"], EVEN_D=meta["EVEN_D"], BLOCK_M=A.PREPROCESS_BLOCK_M,
                                   num_warps=4, num_stages=3), kind="memory"))
    # packed sequences (attention_varlen): the same kernels with IS_VARLEN, pointer path only
    for D, dt, mask in _grid([(64, 128), tuple(DTYPES), ("causal", "window")], exhaustive):
        plans += _attention_pointer_plans(A, D, dt, mask, exhaustive, cc, varlen=True)
    # the options (softcap, ALiBi, dropout): the same kernels with their constexprs on, dense and packed
    for D, dt, options, varlen in _grid([(64, 128, 256), tuple(DTYPES), ("softcap+alibi", "dropout", "all"), (False, True)],
                                        exhaustive):
        plans += _attention_pointer_plans(A, D, dt, "causal", exhaustive, cc, varlen=varlen, options=options)
    return plans


def _tma_descriptors(A, dtype, D: int, meta: dict) -> dict:
    """Host tensor descriptors of Q, K, V, O over 16-byte aligned mock tensors (B, H, S, D), with the
    block shapes the launcher gives them for this config."""
    from triton.runtime.jit import MockTensor

    shape = [4, 8, 1024, D]
    strides = [8 * 1024 * D, 1024 * D, D, 1]
    descs = {n: A.TensorDescriptor(MockTensor(dtype), shape, strides, [1, 1, 16, meta["BLOCK_D"]]) for n in "QKVO"}
    A._set_tma_blocks({**descs, **meta})
    return descs


def decode_plans(exhaustive: bool = False, cc: int = 90) -> list[Plan]:
    from fastlm.triton import decode_attention as DA

    plans = []
    # rows per kv head = GROUP * Sq: MHA decode (1), GQA 8 (8), GQA 4 with 16 new tokens (64)
    shapes = {"mha": (1, 1), "gqa8": (8, 1), "gqa4-sq16": (4, 16)}
    for D, dt, shape, window in _grid([(64, 80, 128, 256), tuple(DTYPES), tuple(shapes), (False, True)], exhaustive):
        dtype = DTYPES[dt]
        group, sq = shapes[shape]
        cfg = DA.config(D, group * sq, dtype, cc)
        meta = dict(HEAD_DIM=D, BLOCK_D=cfg["BLOCK_D"], HAS_LEFT=window, DOT_PREC=DA.dot_precision(dtype, cfg["BLOCK_D"]),
                    BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        label = f"D={D} {dt} {shape}{' window' if window else ''} BM={cfg['BLOCK_M']} BN={cfg['BLOCK_N']} w{cfg['num_warps']} s{cfg['num_stages']}"
        vals = dict(Q=dtype, K=dtype, V=dtype, Lens=torch.int32, OP=torch.float32, LP=torch.float32, BT=None, B=4, Hkv=4,
                    GROUP=group, Sq=sq, S_max=4096, num_splits=4, LEFT=256 if window else 0, RIGHT=0, qk_scale=0.18,
                    stride_bt=0, num_pages=1, Slopes=None)
        plans.append(Plan("decode_attention", DA._decode_split_kernel, label, vals, meta, kind="matrix",
                          allowed=FP32_FMA if meta["DOT_PREC"] == "ieee" else None))
        if not window and shape == "mha":
            plans.append(Plan("decode_attention", DA._decode_combine_kernel, f"D={D} {dt} BR={cfg['BLOCK_R']}",
                              dict(OP=torch.float32, LP=torch.float32, O=dtype, LSE=torch.float32, Hq=8, Sq=1,
                                   num_rows=1024, num_splits=4),
                              dict(HEAD_DIM=D, BLOCK_D=cfg["BLOCK_D"], BLOCK_R=cfg["BLOCK_R"], num_warps=4), kind="memory"))
    # paged caches: the split kernel with BLOCK_N capped at the page size (16: the smallest, 256: the config's own)
    for D, dt, shape, page in _grid([(64, 80, 128, 256), tuple(DTYPES), tuple(shapes), (16, 256)], exhaustive):
        dtype = DTYPES[dt]
        group, sq = shapes[shape]
        cfg = DA.config(D, group * sq, dtype, cc)
        bn = min(cfg["BLOCK_N"], page)
        meta = dict(HEAD_DIM=D, BLOCK_D=cfg["BLOCK_D"], HAS_LEFT=False, DOT_PREC=DA.dot_precision(dtype, cfg["BLOCK_D"]),
                    BLOCK_M=cfg["BLOCK_M"], BLOCK_N=bn, PAGED=True, PAGE_SIZE=page, num_warps=cfg["num_warps"],
                    num_stages=cfg["num_stages"])
        label = f"D={D} {dt} {shape} paged page={page} BM={cfg['BLOCK_M']} BN={bn} w{cfg['num_warps']} s{cfg['num_stages']}"
        vals = dict(Q=dtype, K=dtype, V=dtype, Lens=torch.int32, OP=torch.float32, LP=torch.float32, BT=torch.int32, B=4, Hkv=4,
                    GROUP=group, Sq=sq, S_max=4096, num_splits=4, LEFT=0, RIGHT=0, qk_scale=0.18, num_pages=1000, Slopes=None)
        plans.append(Plan("decode_attention", DA._decode_split_kernel, label, vals, meta, kind="matrix",
                          allowed=FP32_FMA if meta["DOT_PREC"] == "ieee" else None))
    # the options (softcap, ALiBi; no dropout at decode), contiguous and paged
    for D, dt, shape, options, page in _grid([(64, 128, 256), tuple(DTYPES), tuple(shapes), ("softcap", "alibi", "softcap+alibi"),
                                              (None, 16)], exhaustive):
        dtype = DTYPES[dt]
        group, sq = shapes[shape]
        cfg = DA.config(D, group * sq, dtype, cc)
        bn = min(cfg["BLOCK_N"], page or cfg["BLOCK_N"])
        opt_vals, opt_meta, opt_label = _option_values(options)
        meta = dict(HEAD_DIM=D, BLOCK_D=cfg["BLOCK_D"], HAS_LEFT=True, DOT_PREC=DA.dot_precision(dtype, cfg["BLOCK_D"]),
                    BLOCK_M=cfg["BLOCK_M"], BLOCK_N=bn, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **opt_meta,
                    **(dict(PAGED=True, PAGE_SIZE=page) if page else {}))
        label = (f"D={D} {dt} {shape} window{f' paged page={page}' if page else ''}{opt_label} BM={cfg['BLOCK_M']} BN={bn} "
                 f"w{cfg['num_warps']} s{cfg['num_stages']}")
        vals = dict(Q=dtype, K=dtype, V=dtype, Lens=torch.int32, OP=torch.float32, LP=torch.float32,
                    BT=torch.int32 if page else None, B=4, Hkv=4, GROUP=group, Sq=sq, S_max=4096, num_splits=4, LEFT=256, RIGHT=0,
                    qk_scale=0.18, stride_bt=0 if not page else 64, num_pages=1000 if page else 1,
                    **{k: v for k, v in opt_vals.items() if k in ("cap_in", "cap_out", "Slopes", "stride_sb")})
        plans.append(Plan("decode_attention", DA._decode_split_kernel, label, vals, meta, kind="matrix",
                          allowed=FP32_FMA if meta["DOT_PREC"] == "ieee" else None))
    for D, dt in _grid([(64, 80, 128, 256), tuple(DTYPES)], exhaustive):
        dtype = DTYPES[dt]
        cfg = DA.append_config(D)
        plans.append(Plan("decode_attention", DA._paged_append_kernel, f"D={D} {dt} BS={cfg['BLOCK_S']} page=16",
                          dict(KN=dtype, VN=dtype, KC=dtype, VC=dtype, BT=torch.int32, Lens=torch.int32, Hkv=8, S_new=1,
                               max_pages=64, num_pages=1000),
                          dict(HEAD_DIM=D, BLOCK_D=cfg["BLOCK_D"], BLOCK_S=cfg["BLOCK_S"], PAGE_SIZE=16,
                               num_warps=cfg["num_warps"]), kind="memory"))
    return plans


def layer_norm_plans(exhaustive: bool = False, cc: int = 90) -> list[Plan]:
    import triton

    from fastlm.triton import layer_norm as LN

    plans = []
    for N, dt, rms, extra in _grid([(1024, 4096, 16384, 32768, 65536), tuple(DTYPES), (False, True), (False, True)], exhaustive):
        dtype = DTYPES[dt]
        block_n, one = LN._block_n(N)
        w = LN._num_warps(block_n)
        name = "rms_norm" if rms else "layer_norm"
        fwd = dict(X=dtype, R=dtype if extra else None, W=dtype, B=None if rms else dtype, Y=dtype, H=dtype if extra else None,
                   Mean=None if rms else torch.float32, Rstd=torch.float32, Loads=None, N=N, eps=1e-5)
        plans.append(Plan(name, LN._layer_norm_fwd_kernel, f"N={N} {dt}{' residual' if extra else ''} BN={block_n} w{w}", fwd,
                          dict(IS_RMS=rms, HAS_RESIDUAL=extra, HAS_WEIGHT=True, HAS_BIAS=not rms, BLOCK_N=block_n,
                               ONE_BLOCK=one, num_warps=w), kind="memory"))
        flags = dict(IS_RMS=rms, HAS_WEIGHT=True)
        if triton.next_power_of_2(N) <= LN.MAX_FUSED_N_BWD:
            block_n = triton.next_power_of_2(N)
            w = LN._num_warps(block_n)
            bwd = dict(DY=dtype, DH=dtype if extra else None, X=dtype, W=dtype, Mean=None if rms else torch.float32,
                       Rstd=torch.float32, DX=dtype, DW_part=torch.float32, DB_part=None if rms else torch.float32,
                       M=8192, N=N, rows_per_program=32)
            plans.append(Plan(name, LN._layer_norm_bwd_kernel, f"N={N} {dt}{' dh' if extra else ''} BN={block_n} w{w}", bwd,
                              dict(HAS_DH=extra, HAS_BIAS=not rms, BLOCK_N=block_n, num_warps=w, **flags), kind="memory"))
            continue
        w = LN._num_warps(LN.CHUNK_N)
        dots = dict(DY=dtype, X=dtype, W=dtype, Mean=None if rms else torch.float32, Rstd=torch.float32,
                    Dots=torch.float32, N=N)
        plans.append(Plan(name, LN._layer_norm_bwd_dots_kernel, f"N={N} {dt} BN={LN.CHUNK_N} w{w}", dots,
                          dict(BLOCK_N=LN.CHUNK_N, num_warps=w, **flags), kind="memory"))
        dx = dict(DY=dtype, DH=dtype if extra else None, X=dtype, W=dtype, Mean=None if rms else torch.float32,
                  Rstd=torch.float32, Dots=torch.float32, DX=dtype, DW_part=torch.float32,
                  DB_part=None if rms else torch.float32, M=8192, N=N, rows_per_program=32)
        plans.append(Plan(name, LN._layer_norm_bwd_dx_kernel,
                          f"N={N} {dt}{' dh' if extra else ''} BN={LN.BWD_BLOCK_N} w{LN.BWD_WARPS} s{LN.BWD_STAGES}", dx,
                          dict(HAS_DH=extra, HAS_BIAS=not rms, BLOCK_N=LN.BWD_BLOCK_N, NUM_STAGES=LN.BWD_STAGES,
                               num_warps=LN.BWD_WARPS, **flags), kind="memory"))
    for dt in DTYPES if exhaustive else ("fp32", "bf16"):
        plans.append(Plan("layer_norm", LN._sum_partials_kernel, f"{dt} BP=32 BN=128",
                          dict(P=torch.float32, Out=DTYPES[dt], num_parts=256, N=4096),
                          dict(BLOCK_P=32, BLOCK_N=128, num_warps=4), kind="memory"))
    return plans


def sinusoidal_plans(exhaustive: bool = False, cc: int = 90) -> list[Plan]:
    from fastlm.triton import sinusoidal as SN

    cuda = torch.device("cuda")
    plans = []
    for D, dt, form in _grid([(64, 768, 4096) if not exhaustive else (64, 768, 1024, 4096), tuple(DTYPES), ("table", "embed", "embed-pos")], exhaustive):
        dtype = DTYPES[dt]
        N = 8192
        block_t, block_d = SN._tiles(N, D, cuda)
        has_w = form != "table"
        has_pos = form != "embed"
        r_hi, r_lo = SN.ratio_pair(10000.0, D)
        vals = dict(Ids=torch.int64 if has_w else None, W=dtype if has_w else None, Pos=torch.int64 if has_pos else None,
                    Out=dtype, N=N, S=1024, D=D, V=50304, s_od=1, s_w1=1, offset=0, scale=1.0, r_hi=r_hi, r_lo=r_lo)
        plans.append(Plan("sinusoidal", SN._embed_sinusoidal_fwd_kernel, f"D={D} {dt} {form} BT={block_t} BD={block_d}", vals,
                          dict(HAS_WEIGHT=has_w, HAS_POS=has_pos, HAS_SCALE=has_w, BLOCK_T=block_t, BLOCK_D=block_d,
                               P_BITS=SN._p_bits(D), num_warps=4), kind="memory" if has_w else "memory-write"))
        if form == "embed":
            chunks = N // SN.CHUNK_ROWS
            block_c, bd = SN._tiles(chunks, D, cuda)
            plans.append(Plan("sinusoidal", SN._embed_bwd_segments_kernel, f"D={D} {dt} segments R={SN.CHUNK_ROWS} BC={block_c} BD={bd}",
                              dict(DO=dtype, Sorted=torch.int64, Order=torch.int64, DW=dtype, WS=torch.float32, N=N, D=D, V=50304,
                                   s_od=1, scale=1.0),
                              dict(HAS_SCALE=True, R=SN.CHUNK_ROWS, BLOCK_C=block_c, BLOCK_D=bd, num_warps=4), kind="memory"))
            owners, block_k = SN._crossing_tiles(chunks, bd, cuda)
            plans.append(Plan("sinusoidal", SN._embed_bwd_crossing_kernel, f"D={D} {dt} crossing BC={owners} BK={block_k} BD={bd}",
                              dict(Sorted=torch.int64, DW=dtype, WS=torch.float32, N=N, D=D, V=50304, scale=1.0),
                              dict(HAS_SCALE=True, R=SN.CHUNK_ROWS, BLOCK_C=owners, BLOCK_K=block_k, BLOCK_D=bd, num_warps=4),
                              kind="memory"))
            plans.append(Plan("sinusoidal", SN._embed_bwd_atomic_kernel, f"D={D} {dt} atomic BT={block_t} BD={block_d}",
                              dict(DO=dtype, Ids=torch.int64, DW=torch.float32, N=N, S=1024, D=D, V=50304, s_od=1, s_is=1, scale=1.0),
                              dict(HAS_SCALE=True, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4), kind="memory"))
    return plans


def sampling_plans(exhaustive: bool = False, cc: int = 90) -> list[Plan]:
    from fastlm.triton import sampling as SP

    cuda = torch.device("cuda")
    modes = {  # (temperature, top_k, top_p, min_p, sample)
        "temperature": (0.8, None, None, None, True),
        "top-k+top-p+min-p": (0.8, 50, 0.9, 0.05, True),
        "per-row": (torch.float32, torch.int64, torch.float32, torch.float32, True),
        "greedy": (0.0, None, None, None, True),
        "filter": (None, 50, 0.9, None, False),
    }
    forbid = (("div.full.f32", "approximate division: the reference and csrc divide with IEEE rounding"),
              ("div.approx.f32", "approximate division: the reference and csrc divide with IEEE rounding"))
    plans = []
    seen = set()
    # the batch only changes the slice count (not a constexpr but NS_P2)
    for V, dt, mode, B in _grid([(32000, 128256, 262144), tuple(DTYPES), tuple(modes), (1, 128) if exhaustive else (128,)], exhaustive):
        dtype = DTYPES[dt]
        t, k, p, mp, sample = modes[mode]
        vals_in = [torch.ones(B) if x is torch.float32 else torch.ones(B, dtype=torch.int64) if x is torch.int64 else x
                   for x in (t, k, p, mp)]
        (T, K, P, MP), (tv, kv, pv, mpv), flags = SP._params(B, V, *vals_in)
        block_v = SP._block_v(V, cuda)
        ns = 4 if B == 1 else 1
        seq, _, _, all_greedy = SP._sequence(flags, (tv, kv, pv, mpv), sample)
        params = dict(X=dtype, stride_x=V, V=V, Temp=torch.float32 if T is not None else None,
                      TopK=torch.int64 if K is not None else None, TopP=torch.float32 if P is not None else None,
                      MinP=torch.float32 if MP is not None else None, t_val=tv, k_val=kv, p_val=pv, mp_val=mpv,
                      SMax=torch.float32, SArg=torch.int32, SBad=torch.int32, NS=ns)
        names = {0: "stats", 1: "radix", 2: "sum", 3: "filter"}
        for mode_id, consume, produce, _ in seq:
            meta = SP._meta(flags, mode_id, consume, produce, sample, ns, SP._block_b(B, block_v, cuda), block_v, False, cuda)
            key = (SP._sampling_pass_kernel, dt, tuple(sorted(meta.items())))
            if key in seen:
                continue
            seen.add(key)
            vals = dict(params, SL=block_v * 16, HistIn=torch.int64, HistOut=torch.int64, B=B, StateIn=torch.int64,
                        StateOut=torch.int64, ChunkSum=torch.int64 if sample else None, NCH=V // 2048,
                        Out=None if sample else dtype, stride_o=V, Status=None if sample else torch.int64, Loads=None)
            label = f"V={V} B={B} {dt} {mode} {names[mode_id]} c{consume} p{produce} BV={block_v} w{meta['num_warps']}"
            plans.append(Plan("sampling", SP._sampling_pass_kernel, label, vals, meta, kind="memory", ptx_forbid=forbid))
        if sample:
            meta = SP._draw_meta(flags, all_greedy, True, ns, SP._block_b(B, block_v, cuda), V, False)
            vals = dict(params, B=B, State=torch.int64, ChunkSum=torch.int64, NCH=V // 2048, Seed=torch.int64,
                        Tokens=torch.int64, Logprobs=torch.float32, Loads=None)
            plans.append(Plan("sampling", SP._sampling_draw_kernel, f"V={V} B={B} {dt} {mode} draw", vals, meta,
                              kind="other", ptx_forbid=forbid))
    return plans


def rotary_plans(exhaustive: bool = False, cc: int = 90) -> list[Plan]:
    from fastlm.triton import rotary as RO

    forms = {  # (rotary_dim as a fraction of D, interleaved, positions tensor, table, backward)
        "half": (1, False, False, False, False),
        "interleaved": (1, True, False, False, False),
        "positions": (1, False, True, False, False),
        "partial": (0.5, False, False, False, False),
        "table": (1, False, False, True, False),
        "table_interleaved": (1, True, False, True, False),
        "backward": (1, False, False, False, True),
    }
    plans = []
    for D, dt, form in _grid([(64, 128), tuple(DTYPES), tuple(forms)], exhaustive):
        dtype = DTYPES[dt]
        frac, inter, pos, table, bwd = forms[form]
        R = int(D * frac)
        block_h = 1 << max(0, (R // 2 - 1).bit_length())
        block_s, per, _ = RO._plan(8, 4096, 40, block_h, 132)
        r_hi, r_lo = (0.0, 0.0) if table else RO.ratio_pair(10000.0, R)
        vals = dict(Q=dtype, K=dtype, QO=dtype, KO=dtype, Pos=torch.int64 if pos else None,
                    Cos=dtype if table else None, Sin=dtype if table else None,
                    B=8, S=4096, HQ=32, HK=8, R=R, D=D, half=R // 2, s_qd=1, s_kd=1, s_od=1, s_pd=1, s_poss=1,
                    s_cd=1, s_sd=1, offset=0, r_hi=r_hi, r_lo=r_lo, heads_per_program=per)
        meta = dict(HAS_POS=pos, TABLE=table, INTERLEAVED=inter, BACKWARD=bwd, COPY_PASS=R < D, BLOCK_S=block_s,
                    BLOCK_H=block_h, BLOCK_P=1 << max(0, (max(D - R, 1) - 1).bit_length()), P_BITS=max(1, (block_h - 1).bit_length()),
                    num_warps=4)
        plans.append(Plan("rotary", RO._rotary_kernel, f"D={D} {dt} {form} R={R} BS={block_s} BH={block_h}", vals, meta, kind="memory"))
    return plans


OPS = {
    "attention": attention_plans,
    "decode_attention": decode_plans,
    "layer_norm": layer_norm_plans,
    "rotary": rotary_plans,
    "sinusoidal": sinusoidal_plans,
    "sampling": sampling_plans,
}


def plans(ops=None, exhaustive: bool = False, cc: int = 90) -> list[Plan]:
    """The plans of ``ops`` (default all) as the launchers would issue them on a GPU of capability cc."""
    out = []
    for name, fn in OPS.items():
        if ops and name not in ops and not (name == "layer_norm" and "rms_norm" in ops):
            continue
        out.extend(fn(exhaustive, cc))
    return out


def run(ops=None, archs=(90, 80), exhaustive: bool = False, jobs: int = 1) -> list[sass.Row]:
    """Compile every plan for every arch; rows in plan order. ``jobs`` > 1 compiles in worker
    processes (each imports the kernels afresh)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("the compile tier needs the real Triton compiler: unset TRITON_INTERPRET")
    ops = tuple(ops) if ops else None
    work = [(ops, exhaustive, cc, i) for cc in archs for i in range(len(plans(ops, exhaustive, cc)))]
    if jobs <= 1:
        return [_compile_indexed(w) for w in work]
    import concurrent.futures
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx) as ex:
        return list(ex.map(_compile_indexed, work, chunksize=4))


_PLAN_CACHE: dict = {}


def _compile_indexed(job):
    ops, exhaustive, cc, i = job
    key = (ops, exhaustive, cc)
    if key not in _PLAN_CACHE:
        _PLAN_CACHE[key] = plans(ops, exhaustive, cc)
    return compile_plan(_PLAN_CACHE[key][i], cc)
