"""`fastlm audit`: the compile tier's table, with no GPU.

Every Triton kernel is compiled by the real Triton compiler for sm_90a and sm_80 in the configs
its launcher picks (fastlm.audit.triton_kernels), and every csrc kernel is read from the built
fastlm._C (fastlm.audit.csrc); fastlm.audit.sass reads registers, spills, stack, shared memory,
occupancy and SASS instruction classes from the cubins and holds the gates the tests apply.
``python -m fastlm.audit`` and ``fastlm audit`` print the table, write JSON, or regenerate the
committed reports in benchmarks/static/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

REPORT_DIR = os.path.join("benchmarks", "static")
_SASS_SHOWN = ("HGMMA", "HMMA", "LDSM", "LDGSTS", "LDGSTS.128", "UTMALDG", "LDG.128", "LDG.64", "LDG.32", "LDG.16", "STG.128", "STL", "LDL")


def collect(ops=None, archs=(90, 80), source="all", exhaustive=False, jobs=1) -> list:
    """Rows for the Triton kernels (compiled here) and/or the csrc kernels (read from fastlm._C)."""
    rows = []
    if source in ("all", "triton"):
        from fastlm.audit import triton_kernels

        rows += triton_kernels.run(ops, archs, exhaustive=exhaustive, jobs=jobs)
    if source in ("all", "csrc"):
        from fastlm.audit import csrc, sass

        try:
            found = csrc.rows()
        except Exception as exc:  # noqa: BLE001 - reported, not raised: the csrc half is optional
            print(f"fastlm audit: csrc kernels not read ({exc})", file=sys.stderr)
            found = []
        want = {sass.ARCHS[a] for a in archs}
        rows += [r for r in found if r.arch in want and (not ops or r.op in ops)]
    return rows


def _sass_cell(s: dict) -> str:
    return " ".join(f"{k}:{s[k]}" for k in _SASS_SHOWN if s.get(k))


def render(rows) -> str:
    """A Markdown table: one line per kernel instantiation, gates last."""
    from fastlm.audit import sass

    lines = [
        "| source | op | kernel | config | arch | role | regs | spill B | stack B | shared B | blocks/SM | loop instr/MMA | SASS | gates |",
        "|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        v = sass.violations(r)
        gate = "FAIL: " + "; ".join(v) if v else ("ok (" + r.allowed + ")" if r.allowed else "ok")
        lines.append(f"| {r.source} | {r.op} | {r.kernel} | {r.config} | {r.arch} | {r.role} | {r.regs} | {r.local} | {r.stack} | "
                     f"{r.shared} | {r.occupancy} | {'' if r.per_mma is None else f'{r.per_mma:.2f}'} | {_sass_cell(r.sass)} | {gate} |")
    return "\n".join(lines)


def _rows_json(rows) -> list[dict]:
    out = []
    for r in rows:
        d = r.to_json()
        d["sass"] = {k: v for k, v in d["sass"].items() if k != "compile_s"}
        out.append(d)
    return out


def write_reports(rows, directory: str) -> list[str]:
    """benchmarks/static/<arch>.md and .json: the committed reports (no timings, so a diff shows
    only changes of footprint)."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for arch in sorted({r.arch for r in rows}):
        mine = [r for r in rows if r.arch == arch]
        md = os.path.join(directory, f"{arch}.md")
        with open(md, "w") as f:
            f.write(f"# Compile-tier report, {arch}\n\nRegenerate with `make static-report`. Every default config a launcher "
                    "picks (Triton, covering design over sizes, dtypes and flags) and every csrc instantiation in fastlm._C.\n\n")
            f.write(render(mine) + "\n")
        js = os.path.join(directory, f"{arch}.json")
        with open(js, "w") as f:
            json.dump(_rows_json(mine), f, indent=1, sort_keys=True)
            f.write("\n")
        paths += [md, js]
    return paths


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastlm audit", description=__doc__.splitlines()[0])
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("op", nargs="*", help="ops to audit (default: all): attention decode_attention layer_norm sinusoidal "
                                         "rotary sampling")
    p.add_argument("--arch", action="append", type=int, choices=[90, 80], help="target (repeatable; default both)")
    p.add_argument("--source", choices=["all", "triton", "csrc"], default="all")
    p.add_argument("--all-configs", action="store_true", help="the full product and every autotune candidate (slow)")
    p.add_argument("--jobs", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    p.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    p.add_argument("--write-reports", metavar="DIR", help=f"write <arch>.md and <arch>.json (the committed ones: {REPORT_DIR})")
    p.add_argument("--check", action="store_true", help="exit 1 if any row breaks a gate")
    p.add_argument("--quiet", action="store_true", help="no table on stdout")


def _argv(args) -> list[str]:
    out = list(args.op) + [f"--arch={a}" for a in (args.arch or [])] + [f"--source={args.source}", f"--jobs={args.jobs}"]
    out += [f"--{k.replace('_', '-')}" for k in ("all_configs", "check", "quiet") if getattr(args, k)]
    out += [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in ("json", "write_reports") if getattr(args, k)]
    return out


def run(args) -> int:
    from fastlm.audit import sass

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") and args.source != "csrc":
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the real compiler, in a clean process
        return subprocess.call([sys.executable, "-m", "fastlm.audit", *_argv(args)], env=env)
    why = sass.have_tools()
    if why:
        print(f"fastlm audit: {why}", file=sys.stderr)
        return 2
    if "TRITON_CACHE_DIR" in os.environ:
        rows = collect(args.op or None, tuple(args.arch or (90, 80)), args.source, args.all_configs, args.jobs)
    else:  # a fresh cache: a cached artifact can hide an error
        with tempfile.TemporaryDirectory(prefix="fastlm-audit-") as cache:
            os.environ["TRITON_CACHE_DIR"] = cache
            try:
                rows = collect(args.op or None, tuple(args.arch or (90, 80)), args.source, args.all_configs, args.jobs)
            finally:
                del os.environ["TRITON_CACHE_DIR"]
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.to_json() for r in rows], f, indent=1)
    if args.write_reports:
        for path in write_reports(rows, args.write_reports):
            print(f"wrote {path}")
    if not args.quiet:
        print(render(rows))
    bad = [r for r in rows if sass.violations(r)]
    if bad:
        print(f"\n{len(bad)} of {len(rows)} rows break a gate", file=sys.stderr)
    return 1 if (args.check and bad) else 0


def main(argv=None) -> int:
    return run(_parser().parse_args(argv))
