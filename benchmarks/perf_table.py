"""Turn a `fastlm bench --json` results file into the README's performance table (never typed by hand).

    python benchmarks/perf_table.py benchmarks/results/bench-<device>-<date>.json [--print] [--readme README.md]
    python benchmarks/perf_table.py --merge OUT.json PART.json...   # one document from per-entry runs

The table has one row per (op, mode, case) with the best fastlm backend's rate and % of the
measured peak beside torch eager, torch.compile and the best other baseline in the same run.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

BEGIN, END = "<!-- perf-table:begin -->", "<!-- perf-table:end -->"


def _rate(r):
    if "tflops" in r:
        return r["tflops"], f"{r['tflops']:.0f} TFLOP/s ({r['pct_of_matmul']:.0f}%)"
    if "gbps" in r:
        return r["gbps"], f"{r['gbps']:.0f} GB/s ({r['pct_of_copy']:.0f}%)"
    return 0.0, f"{r['ms']:.3f} ms"


def table(doc) -> str:
    env, ceil = doc["environment"], doc["ceilings"]
    head = (
        f"{env['device']}, {doc['date'][:10]}, torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}; "
        f"measured peaks: copy {ceil['copy_gbps']:.0f} GB/s, {ceil['matmul_dtype']} matmul {ceil['matmul_tflops']:.0f} TFLOP/s. "
        f"`{doc['command']}`"
    )
    if not doc["performance_figure"]:
        head += " **(CPU harness run: not a performance figure)**"
    groups = {}
    for r in doc["results"]:
        groups.setdefault((r["op"], r["mode"], r["dtype"], r["case"]), []).append(r)
    lines = [head, "", "| op | mode | dtype | case | best fastlm | torch eager | torch.compile | best other | fastlm / best other |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (op, mode, dtype, case), rs in groups.items():
        ok = [r for r in rs if r["status"] == "ok"]
        fl = [r for r in ok if r["impl"].startswith("fastlm-")]
        failed = [r["impl"] for r in rs if r["status"] == "failed"]
        best = min(fl, key=lambda r: r["ms"]) if fl else None
        others = [r for r in ok if not r["impl"].startswith("fastlm-")]
        other = min(others, key=lambda r: r["ms"]) if others else None
        cell = lambda r: f"{_rate(r)[1]}" if r else "n/a"
        find = lambda name, ok=ok: next((r for r in ok if r["impl"] == name), None)
        best_cell = f"{best['impl'][7:]}: {cell(best)}" if best else "failed: " + ", ".join(failed)
        ratio = f"{other['ms'] / best['ms']:.2f}x" if best and other else ""
        lines.append(f"| {op} | {mode} | {dtype} | {case} | {best_cell} | {cell(find('torch-eager'))} | "
                     f"{cell(find('torch-compile'))} | {other['impl'] + ': ' + cell(other) if other else 'n/a'} | {ratio} |")
    return "\n".join(lines)


def merge(parts: list[dict], command: str) -> dict:
    """One results document from several runs on the same machine (the first run's ceilings)."""
    if not parts:
        raise SystemExit("nothing to merge")
    doc = dict(parts[0])
    doc["command"] = command
    doc["results"] = [r for p in parts for r in p["results"]]
    doc["performance_figure"] = all(p["performance_figure"] for p in parts)
    return doc


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("results", nargs="+")
    ap.add_argument("--print", action="store_true")
    ap.add_argument("--readme", help="replace the table between the perf-table markers in this file")
    ap.add_argument("--merge", metavar="OUT", help="write the given result files as one document to OUT")
    a = ap.parse_args()
    if a.merge:
        parts = [json.loads(Path(p).read_text()) for p in a.results if Path(p).exists()]
        Path(a.merge).write_text(json.dumps(merge(parts, "make gpu-check (fastlm bench per entry)"), indent=1))
        return
    doc = json.loads(Path(a.results[0]).read_text())
    t = table(doc)
    if a.print or not a.readme:
        print(t)
    if a.readme:
        p = Path(a.readme)
        text = p.read_text()
        if BEGIN not in text:
            raise SystemExit(f"{a.readme} has no {BEGIN} marker")
        p.write_text(re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), BEGIN + "\n" + t + "\n" + END, text, flags=re.S))


if __name__ == "__main__":
    main()
