"""The csrc kernels of the built fastlm._C as audit rows, read from the module with no GPU.

The build records every instantiation's resources: each cubin inside fastlm/_C*.so holds, per
kernel and architecture (sm_80, sm_90a), its registers, local memory (spills), stack frame and
static shared memory, and its SASS; ``rows`` reads them with cuobjdump (``sass.resource_usage`` and
``sass.count_sass``), demangles the names and adds what the launchers decide: threads per block and
dynamic shared memory. Every instantiation in the module is one a launcher dispatches to (the
kernels are only instantiated through the launchers' dispatch), so every row has role "default".

kind: "matrix" for the mma.sync attention kernels; "memory" for the memory-bound kernels built
around 16-byte accesses (the vectorised LayerNorm paths, the decode split kernel, the rotary vector
path, the embedding backward's vector kernels, the sampling passes and draw), "memory-write" where the bulk traffic is 16-byte stores (the sinusoidal forward's vector
path: the table alone reads nothing); "other" for the rest, the scalar-by-design ones included (any-stride rotary and sinusoidal,
the LayerNorm scalar fallback, the decode combine).
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import re
import shutil
import subprocess

from fastlm.audit import sass

# Pattern (re.search on "kernel config") -> "<gate>: <reason>" (sass.GATES: "spill" for a stack frame
# or spill), the written reason one gate does not apply to those instantiations. Empty: none is exempt.
ALLOWED: dict[str, str] = {
    r"^paged_kv_append_kernel .*VEC=0": "vector-loads: the element-copy fallback for rows that are not 16-byte aligned",
}

_TYPES = {"float": "fp32", "__half": "fp16", "__nv_bfloat16": "bf16", "true": "1", "false": "0"}


def _attention_fwd_smem(args: dict[str, str]) -> int:
    """Dynamic shared memory of the forward (csrc/attention.cu): a Q tile of 128 rows and two stages
    of K and V tiles of 64 rows, D + 8 wide."""
    return (128 + 4 * 64) * (int(args["D"]) + 8) * (4 if args["T"] == "fp32" else 2)


def _decode_split_smem(args: dict[str, str]) -> int:
    """Dynamic shared memory of the decode split kernel (csrc/decode_attention.cu, DecodeTile): a
    ring of K and V tiles (3 stages at D = 64, else 2; 64 keys, 32 at D = 256 with 4 m tiles) and
    the 16 MT query rows, D + 8 wide, 2-byte elements."""
    d, mt = int(args["D"]), int(args["MT"])
    keys = 32 if d == 256 and mt == 4 else 64
    stages = 3 if d == 64 else 2
    return (2 * stages * keys + 16 * mt) * (d + 8) * 2


def _attention_bwd_dkdv_smem(args: dict[str, str]) -> int:
    """Dynamic shared memory of the dK/dV kernel (csrc/attention_bwd.cu): K (KSMEM), two Q and two
    dO tiles of BQ rows (at least 64 / 128 rows, where K and V stage), D + 8 wide, 2-byte elements;
    two lse2 and two delta tiles of BQ floats."""
    d, bq, ks = int(args["D"]), int(args["BQ"]), args["KSMEM"] == "1"
    return ((64 if ks else 0) + max(4 * bq, 64 if ks else 128)) * (d + 8) * 2 + 4 * bq * 4


def _attention_bwd_dq_smem(args: dict[str, str]) -> int:
    """Dynamic shared memory of the dQ kernel (csrc/attention_bwd.cu): two K and two V tiles of BN
    rows (at least 128 rows, where Q and dO stage), D + 8 wide, 2-byte elements."""
    return max(4 * int(args["BN"]), 128) * (int(args["D"]) + 8) * 2


# kernel -> (op, template parameter names, threads per block (0: chosen at launch), kind).
KERNELS: dict[str, tuple[str, tuple[str, ...], int, str]] = {
    "layer_norm_fwd_kernel": ("layer_norm", ("T", "W", "IS_RMS", "VEC"), 0, "memory"),
    "layer_norm_bwd_kernel": ("layer_norm", ("T", "W", "IS_RMS", "VEC"), 0, "memory"),
    "layer_norm_bwd_dots_kernel": ("layer_norm", ("T", "W", "IS_RMS", "VEC"), 0, "memory"),
    "layer_norm_bwd_dx_kernel": ("layer_norm", ("T", "W", "IS_RMS", "VEC"), 256, "memory"),
    "layer_norm_bwd_reduce_kernel": ("layer_norm", ("W",), 512, "other"),
    "rotary_kernel": ("rotary", ("T", "C", "TABLE"), 128, "other"),
    "rotary_vec_kernel": ("rotary", ("T", "C", "TABLE", "INTERLEAVED"), 128, "memory"),
    "embed_sinusoidal_fwd_kernel": ("sinusoidal", ("T",), 128, "other"),
    "embed_sinusoidal_fwd_vec_kernel": ("sinusoidal", ("T",), 128, "memory-write"),
    "embed_bwd_atomic_kernel": ("sinusoidal", ("T",), 128, "other"),
    "embed_bwd_atomic_vec_kernel": ("sinusoidal", ("T",), 128, "memory"),
    "embed_bwd_segments_kernel": ("sinusoidal", ("T",), 128, "other"),
    "embed_bwd_segments_vec_kernel": ("sinusoidal", ("T",), 128, "memory"),
    "embed_bwd_crossing_kernel": ("sinusoidal", ("T",), 128, "other"),
    "embed_bwd_crossing_vec_kernel": ("sinusoidal", ("T",), 128, "memory"),
    "sampling_kernel": ("sampling", ("T", "PASS", "LOADS"), 256, "memory"),
    "sampling_draw_kernel": ("sampling", ("T", "LOADS"), 256, "memory"),
    "attention_fwd_kernel": ("attention", ("T", "D", "VARLEN", "OPTIONS"), 256, "matrix"),
    "attention_fwd_combine_kernel": ("attention", ("T", "D"), 128, "other"),
    "decode_split_kernel": ("decode_attention", ("T", "D", "MT"), 128, "memory"),
    "decode_split_options_kernel": ("decode_attention", ("T", "D", "MT"), 128, "memory"),
    "decode_combine_kernel": ("decode_attention", ("T", "D"), 128, "other"),
    "paged_decode_split_kernel": ("decode_attention", ("T", "D", "MT"), 128, "memory"),
    "paged_decode_split_options_kernel": ("decode_attention", ("T", "D", "MT"), 128, "memory"),
    "paged_kv_append_kernel": ("decode_attention", ("T", "VEC"), 128, "memory"),
    "attention_bwd_preprocess_kernel": ("attention", ("T", "D", "VARLEN"), 128, "other"),
    "attention_bwd_dkdv_kernel": ("attention", ("T", "D", "BQ", "KSMEM", "VARLEN", "OPTIONS"), 128, "matrix"),
    "attention_bwd_dq_kernel": ("attention", ("T", "D", "BN", "VARLEN", "OPTIONS"), 128, "matrix"),
}
DYNAMIC_SMEM = {"attention_fwd_kernel": _attention_fwd_smem, "decode_split_kernel": _decode_split_smem,
                "paged_decode_split_kernel": _decode_split_smem, "decode_split_options_kernel": _decode_split_smem,
                "paged_decode_split_options_kernel": _decode_split_smem,
                "attention_bwd_dkdv_kernel": _attention_bwd_dkdv_smem, "attention_bwd_dq_kernel": _attention_bwd_dq_smem}

# Pattern (re.search on "kernel config") -> (SASS instructions the design must show, the most
# main-loop instructions per MMA, 0: not bounded). The forward's per-tile softmax work does not
# depend on D while its MMAs grow with D, so only D = 128 is held to 5, and only without OPTIONS
# (that path adds per-score work by design: tanh, the ALiBi term, a Philox call per key pair).
EVIDENCE: dict[str, tuple[tuple[str, ...], float]] = {
    r"^attention_fwd_kernel .*D=128 VARLEN=\d OPTIONS=0": (("LDSM", "LDGSTS"), 5.0),
    r"^attention_fwd_kernel ": (("LDSM", "LDGSTS"), 0.0),
    r"^sampling_kernel .*PASS=4": (("LDG.128", "STG.128"), 0.0),  # the filter's write
    r"^sampling_(draw_)?kernel ": (("LDG.128",), 0.0),
}


def so_path() -> str | None:
    """The fastlm._C extension file, or None if it is not built."""
    try:
        spec = importlib.util.find_spec("fastlm._C")
    except (ImportError, ValueError):
        return None
    return spec.origin if spec is not None and spec.origin else None


def demangle(names: list[str]) -> list[str]:
    """C++ names of mangled symbols (cu++filt from the CUDA toolkit, else binutils' c++filt)."""
    filt = sass.tool("cu++filt") or shutil.which("c++filt")
    if filt is None:
        raise RuntimeError("neither cu++filt nor c++filt found to demangle the kernel names")
    res = subprocess.run([filt], input="\n".join(names) + "\n", capture_output=True, text=True, timeout=60, check=True)
    out = res.stdout.splitlines()
    if len(out) != len(names):
        raise RuntimeError(f"{filt} returned {len(out)} names for {len(names)}")
    return out


def _split_top(s: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in s:
        if ch in "<(":
            depth += 1
        elif ch in ">)":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur.strip())
    return parts


_ANON = "(anonymous namespace)"


def parse(demangled: str) -> tuple[str, list[str]]:
    """(kernel, template arguments) of a demangled kernel, e.g.
    'void fastlm::(anonymous namespace)::k<__half, 64>(P)' -> ('k', ['__half', '64'])."""
    s = demangled.removeprefix("void ")
    depth, end = 0, len(s)
    for i, ch in enumerate(s):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0 and not s.startswith(_ANON, i):
            end = i
            break
    name, targs = s[:end], []
    if name.endswith(">"):
        lt = name.index("<")
        name, targs = name[:lt], _split_top(name[lt + 1 : -1])
    return name.rsplit("::", 1)[-1], targs


def config_of(kernel: str, args: list[str]) -> tuple[str, dict[str, str]]:
    """("T=fp16 D=128 SQ=16", {"T": "fp16", ...}) from the template arguments."""
    names = KERNELS.get(kernel, ("", (), 0, ""))[1]
    names = names if len(names) == len(args) else tuple(f"A{i}" for i in range(len(args)))
    vals = {n: _TYPES.get(a, a) for n, a in zip(names, args, strict=True)}
    return " ".join(f"{n}={v}" for n, v in vals.items()), vals


def _sass_counts(path: str, archs: list[str]) -> dict[str, dict[str, int]]:
    """sass.sass_of(path), one cuobjdump per architecture, run side by side (the module's SASS is
    about 100 MB of text)."""
    def one(arch: str) -> str:
        return sass._run([sass._cuobjdump(), "-sass", "-arch", arch, path])

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(archs))) as ex:
        texts = list(ex.map(one, archs))
    out: dict[str, dict[str, int]] = {}
    for text in texts:
        out.update(sass.count_sass(text))
    return out


def rows(path: str | None = None) -> list[sass.Row]:
    """One Row per kernel instantiation per architecture in the built extension (default: the
    importable fastlm._C), sorted by (op, kernel, config, arch). A kernel not in KERNELS gets op
    "unknown" (the static test fails on it, so a new kernel is classified here)."""
    path = path or so_path()
    if path is None:
        raise FileNotFoundError("fastlm._C is not built (run `make cuda-check`)")
    res = sass.resource_usage(path)
    counts = _sass_counts(path, sorted({arch for arch, _ in res}))
    mangled = sorted({fn for _, fn in res})
    pretty = dict(zip(mangled, demangle(mangled), strict=True))
    out = []
    for (arch, fn), r in res.items():
        kernel, targs = parse(pretty[fn])
        op, _, threads, kind = KERNELS.get(kernel, ("unknown", (), 0, "other"))
        config, vals = config_of(kernel, targs)
        if kernel.startswith("layer_norm_") and vals.get("VEC") == "1":
            kind = "other"
        shared = r.get("SHARED", 0) + (DYNAMIC_SMEM[kernel](vals) if kernel in DYNAMIC_SMEM else 0)
        row = sass.Row(
            source="csrc", op=op, kernel=kernel, config=config, arch=arch, role="default", kind=kind,
            threads=threads, regs=r.get("REG", 0), local=r.get("LOCAL", 0), stack=r.get("STACK", 0), shared=shared,
            sass=counts.get(f"{arch}:{fn}", {k: 0 for k in sass.SASS_KEYS}),
        )
        if arch in sass.TARGETS:
            row.occupancy = sass.occupancy(arch, threads, row.regs, shared)
        row.allowed = next((why for pat, why in ALLOWED.items() if re.search(pat, f"{kernel} {config}")), None)
        row.require, row.max_per_mma = next((ev for pat, ev in EVIDENCE.items() if re.search(pat, f"{kernel} {config}")), ((), 0.0))
        out.append(row)
    out.sort(key=lambda r: (r.op, r.kernel, r.config, r.arch))
    return out
