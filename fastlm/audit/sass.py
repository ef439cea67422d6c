"""Resource usage and SASS facts of compiled GPU code, read with no GPU.

Both halves of the static audit (Triton kernels compiled by the real Triton compiler, and the
csrc kernels inside fastlm._C) end in cubins; this module reads them with the cuobjdump that
Triton's wheel ships (or the CUDA toolkit's): per function the registers, local memory (spills),
stack frame and static shared memory (``--dump-resource-usage``), and the instruction classes of
its SASS (``-sass``). The gates the tests apply, and the occupancy a row gets on its target, are
here too, so the tests, ``fastlm audit`` and the committed reports agree by construction.
"""

from __future__ import annotations

import bisect
import collections
import functools
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field

# Per target: (max dynamic+static shared bytes one block may use, shared bytes per SM,
# bytes the driver reserves per block, registers per SM, max threads per SM, max blocks per SM).
TARGETS = {
    # sm_90a: cuobjdump's SHARED already counts the 1 KB per-block reservation
    "sm_90a": dict(smem_block=233472, smem_sm=233472, smem_reserved=0, regs_sm=65536, threads_sm=2048, blocks_sm=32),
    "sm_80": dict(smem_block=166912, smem_sm=167936, smem_reserved=1024, regs_sm=65536, threads_sm=2048, blocks_sm=32),
}
ARCHS = {90: "sm_90a", 80: "sm_80"}

# SASS facts a row reports; each maps to how an opcode is recognised.
# "loop" and "loop_mma": the instructions and the HMMA/HGMMA of the main loop (``main_loop``).
SASS_KEYS = ("HGMMA", "HMMA", "LDSM", "LDGSTS", "LDGSTS.128", "UTMALDG", "LDG.128", "LDG.64", "LDG.32", "LDG.16", "LDG.8",
             "STG.128", "STG.64", "STG.32", "STG.16", "LDL", "STL", "FFMA", "MUFU", "BAR", "total", "loop", "loop_mma")
_SASS_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)([^;]*)")
_BRA_TARGET = re.compile(r"\s(?:0x)?([0-9a-f]+)\s*$")


@dataclass
class Row:
    """One compiled kernel instantiation on one target."""

    source: str  # "triton" | "csrc"
    op: str
    kernel: str
    config: str  # the specialisation, e.g. "D=128 fp16 causal BM=128 BN=64 w8 s3"
    arch: str  # "sm_90a" | "sm_80"
    role: str = "default"  # "default": a launcher picks it without autotuning; "candidate": autotune only
    kind: str = "other"  # "matrix" (tensor cores), "memory" (128-bit loads), "memory-write" (128-bit stores), "other"
    threads: int = 0
    regs: int = 0
    local: int = 0  # bytes of local memory per thread: spills (the kernels keep no local arrays)
    stack: int = 0
    shared: int = 0  # static + dynamic shared bytes per block
    sass: dict = field(default_factory=dict)
    occupancy: int = 0  # blocks per SM the resources allow
    error: str | None = None
    allowed: str | None = None  # "<gate>: <reason>": a written reason one gate (GATES) does not apply
    require: tuple = ()  # SASS_KEYS this kernel's design must show (e.g. LDSM, LDGSTS)
    max_per_mma: float = 0.0  # the most main-loop instructions per MMA allowed (0: not gated)

    @property
    def per_mma(self) -> float | None:
        """Main-loop instructions per HMMA/HGMMA, None without an MMA loop."""
        return self.sass["loop"] / self.sass["loop_mma"] if self.sass.get("loop_mma") else None

    def to_json(self) -> dict:
        return asdict(self)


def tool(name: str) -> str | None:
    """Path of a CUDA binary tool (cuobjdump, nvdisasm, ptxas, cu++filt): Triton's wheel first, then
    CUDA_HOME/bin, then PATH; None if none is found."""
    cands = []
    try:
        import importlib.util

        spec = importlib.util.find_spec("triton")
        if spec and spec.origin:
            cands.append(os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin", name))
    except Exception:
        pass
    cands.append(os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", name))
    for c in cands:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return shutil.which(name)


def _run(args: list[str]) -> str:
    res = subprocess.run(args, capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        raise RuntimeError(f"{os.path.basename(args[0])} failed ({res.returncode}): {res.stderr.strip()[:400]}")
    return res.stdout


def _cuobjdump() -> str:
    path = tool("cuobjdump")
    if path is None:
        raise RuntimeError("cuobjdump not found (it ships in triton's wheel and in the CUDA toolkit)")
    return path


_RES_FUNC = re.compile(r"^\s*Function\s+(\S+?):\s*$")
_RES_VALS = re.compile(r"(REG|STACK|SHARED|LOCAL):(\d+)")
_ARCH = re.compile(r"^arch\s*=\s*(sm_\w+)")


def resource_usage(path: str) -> dict[tuple[str, str], dict[str, int]]:
    """{(arch, mangled function): {"REG", "STACK", "SHARED", "LOCAL"}} of every function in a cubin,
    or in every cubin of a fat binary / shared library."""
    out: dict[tuple[str, str], dict[str, int]] = {}
    arch, fn = "", None
    for line in _run([_cuobjdump(), "--dump-resource-usage", path]).splitlines():
        m = _ARCH.match(line.strip())
        if m:
            arch = m.group(1)
            continue
        m = _RES_FUNC.match(line)
        if m:
            fn = m.group(1)
            continue
        if fn is not None and "REG:" in line:
            out[(arch, fn)] = {k: int(v) for k, v in _RES_VALS.findall(line)}
            fn = None
    return out


def opcode_class(op: str) -> list[str]:
    """The SASS_KEYS an opcode counts toward."""
    parts = op.split(".")
    base = parts[0]
    keys = []
    if base in ("LDG", "STG"):
        width = 32
        for p in parts[1:]:
            if p in ("128", "64"):
                width = int(p)
            elif p in ("U16", "S16"):
                width = 16
            elif p in ("U8", "S8"):
                width = 8
        keys.append(f"{base}.{width}")
    elif base in ("HGMMA", "HMMA", "LDSM", "LDGSTS", "UTMALDG", "LDL", "STL", "FFMA", "MUFU", "BAR"):
        keys.append(base)
        if base == "LDGSTS" and "128" in parts:
            keys.append("LDGSTS.128")
    return keys


def count_sass(text: str) -> dict[str, dict[str, int]]:
    """{function: {SASS_KEYS: count}} from `cuobjdump -sass` text (one cubin or many; a function
    met again under another arch is keyed "arch:function")."""
    per: dict[str, collections.Counter] = {}
    code: dict[str, list] = collections.defaultdict(list)
    arch, fn = "", None
    for line in text.splitlines():
        m = _ARCH.match(line.strip())
        if m:
            arch = m.group(1)
            continue
        s = line.strip()
        if s.startswith("Function :"):
            fn = f"{arch}:{s.split(':', 1)[1].strip()}" if arch else s.split(":", 1)[1].strip()
            per.setdefault(fn, collections.Counter())
            continue
        if fn is None:
            continue
        m = _SASS_LINE.match(line)
        if m:
            c = per[fn]
            c["total"] += 1
            for k in opcode_class(m.group(2)):
                c[k] += 1
            code[fn].append((int(m.group(1), 16), m.group(2), m.group(3)))
    for f, ins in code.items():
        per[f]["loop"], per[f]["loop_mma"] = main_loop(ins)
    return {f: {k: int(c.get(k, 0)) for k in SASS_KEYS} for f, c in per.items()}


def main_loop(ins: list[tuple[int, str, str]]) -> tuple[int, int]:
    """(instructions, HMMA + HGMMA) of the main loop of one function's SASS, given as (address,
    opcode, operands): of the address ranges [target, branch] closed by a backward BRA, the one
    holding the most MMAs (the smaller on a tie: the inner loop). (0, 0) without such a loop."""
    best = (0, 0)
    addrs = [a for a, _, _ in ins]
    for i, (addr, op, rest) in enumerate(ins):
        if op.split(".")[0] != "BRA":
            continue
        m = _BRA_TARGET.search(rest)
        if not m or int(m.group(1), 16) > addr:
            continue
        j = bisect.bisect_left(addrs, int(m.group(1), 16))
        body = ins[j : i + 1]
        mma = sum(o.split(".")[0] in ("HMMA", "HGMMA") for _, o, _ in body)
        if (mma, -len(body)) > (best[1], -best[0]):
            best = (len(body), mma)
    return best


def sass_of(path: str) -> dict[str, dict[str, int]]:
    return count_sass(_run([_cuobjdump(), "-sass", path]))


def cubin_facts(cubin: bytes) -> tuple[dict[str, int], dict[str, int]]:
    """(resources, SASS counts) of the single kernel in a Triton cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        name = f.name
    try:
        res = resource_usage(name)
        sass = sass_of(name)
    finally:
        os.unlink(name)
    r = next(iter(res.values()), {})
    s = next(iter(sass.values()), {k: 0 for k in SASS_KEYS})
    return r, s


def occupancy(arch: str, threads: int, regs: int, shared: int) -> int:
    """Resident blocks per SM allowed by registers (allocated per warp in units of 256), shared memory
    (plus the per-block reservation), threads and the block limit."""
    t = TARGETS[arch]
    if threads <= 0:
        return 0
    warps = -(-threads // 32)
    regs_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = t["regs_sm"] // (regs_warp * warps)
    by_smem = t["smem_sm"] // (shared + t["smem_reserved"]) if shared else t["blocks_sm"]
    return max(0, min(by_regs, by_smem, t["threads_sm"] // (warps * 32), t["blocks_sm"]))


GATES = ("spill", "tensor-cores", "vector-loads")


def exempt(row: Row, gate: str) -> bool:
    return bool(row.allowed) and row.allowed.split(":", 1)[0].strip() == gate


def violations(row: Row) -> list[str]:
    """What a row breaks of the compile tier's gates: it must compile and fit the target's shared
    memory; a default config must not spill (local memory, a stack frame, STL/LDL); a matrix kernel
    must use tensor cores (HGMMA or HMMA); a memory-bound kernel (on 16-byte aligned inputs) must
    issue a 128-bit global load (LDG.128 or a 16-byte cp.async, LDGSTS.128: "memory") or store ("memory-write": its bulk traffic is written,
    e.g. a table computed from one index per row). A row whose
    ``allowed`` names a gate with a written reason is exempt from that gate only. A row's ``require``
    names instructions its design must show (cp.async's LDGSTS, ldmatrix's LDSM), and
    ``max_per_mma`` bounds its main loop's instructions per MMA."""
    if row.error:
        return [f"does not compile: {row.error}"]
    out = []
    limit = TARGETS[row.arch]["smem_block"]
    if row.shared > limit:
        out.append(f"shared memory {row.shared} B > {limit} B on {row.arch}")
    if row.role == "default" and not exempt(row, "spill"):
        if row.local or row.sass.get("LDL", 0) or row.sass.get("STL", 0):
            out.append(f"spills: {row.local} B local, {row.sass.get('STL', 0)} STL / {row.sass.get('LDL', 0)} LDL")
        if row.stack:
            out.append(f"stack frame {row.stack} B")
    if row.kind == "matrix" and not exempt(row, "tensor-cores") and not (row.sass.get("HGMMA", 0) or row.sass.get("HMMA", 0)):
        out.append("matrix kernel without tensor-core instructions (no HGMMA/HMMA)")
    missing = [k for k in row.require if not row.sass.get(k, 0)]
    if missing:
        out.append(f"the design's instructions missing from the SASS: {', '.join(missing)}")
    if row.max_per_mma and (row.per_mma is None or row.per_mma > row.max_per_mma):
        got = "no MMA loop" if row.per_mma is None else f"{row.per_mma:.2f}"
        out.append(f"main loop: {got} instructions per MMA > {row.max_per_mma:g}")
    if row.kind in ("memory", "memory-write") and not exempt(row, "vector-loads"):
        key = "LDG.128" if row.kind == "memory" else "STG.128"
        if not row.sass.get(key, 0) and not (key == "LDG.128" and row.sass.get("LDGSTS.128", 0)):
            narrow = {k: v for k, v in row.sass.items() if k[:4] in ("LDG.", "STG.") and v}
            out.append(f"memory-bound kernel without a 128-bit global {'load' if key[0] == 'L' else 'store'} ({narrow})")
    return out


def spills(row: Row) -> bool:
    return bool(row.local or row.stack or row.sass.get("LDL", 0) or row.sass.get("STL", 0))


@functools.lru_cache(maxsize=1)
def have_tools() -> str | None:
    """None if the audit can run here, else why not."""
    if tool("cuobjdump") is None:
        return "cuobjdump not found (ships in triton's wheel: triton/backends/nvidia/bin)"
    return None
