"""Benchmark output: the rich table, JSON (schema in fastlm/bench/schema.json), CSV, PNG plot."""

from __future__ import annotations

import csv
import datetime
import json
import platform
import sys

import torch

import fastlm

SCHEMA_VERSION = 1


def environment(device) -> dict:
    dev = torch.device(device)
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    info = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "device_type": dev.type,
        "fastlm": fastlm.__version__,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "interpreter": fastlm.backend.interpreter_on(),
    }
    return info


def document(ceilings, results, device, quick, argv=None) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(argv if argv is not None else ["fastlm", *sys.argv[1:]]),
        "performance_figure": not (quick or torch.device(device).type != "cuda"),
        "environment": environment(device),
        "ceilings": ceilings,
        "results": results,
    }


def write_json(doc, path) -> None:
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, default=str)


CSV_FIELDS = ["op", "mode", "dtype", "case", "size", "impl", "status", "ms", "gbps", "pct_of_copy", "tflops",
              "pct_of_matmul", "speedup_eager", "speedup_compile", "error_ratio", "error"]


def write_csv(doc, path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in doc["results"]:
            row = dict(r)
            sp = r.get("speedup", {})
            row["speedup_eager"] = sp.get("torch-eager")
            row["speedup_compile"] = sp.get("torch-compile")
            w.writerow(row)


def write_plot(doc, path) -> None:
    """One panel per (op, mode): GB/s or TFLOP/s against size, one line per implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {}
    for r in doc["results"]:
        if r.get("status") == "ok":
            groups.setdefault((r["op"], r["mode"], r["dtype"]), []).append(r)
    n = max(1, len(groups))
    fig, axes = plt.subplots(n, 1, figsize=(7, 3.2 * n), squeeze=False)
    for ax, ((op, mode, dtype), rs) in zip(axes[:, 0], sorted(groups.items()), strict=False):
        key = "tflops" if any("tflops" in r for r in rs) else "gbps"
        for impl in sorted({r["impl"] for r in rs}):
            pts = sorted((r["size"], r[key]) for r in rs if r["impl"] == impl and key in r)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
        ceiling = doc["ceilings"]["matmul_tflops" if key == "tflops" else "copy_gbps"]
        ax.axhline(ceiling, color="gray", linestyle="--", linewidth=0.8, label="measured peak")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{op} {mode} ({dtype})")
        ax.set_ylabel("TFLOP/s" if key == "tflops" else "GB/s")
        ax.legend(fontsize=7)
    title = doc["environment"]["device"] + ("" if doc["performance_figure"] else "  (NOT a performance figure)")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(doc, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=None if sys.stdout.isatty() else 200)
    env, ceil = doc["environment"], doc["ceilings"]
    cpu = env["device_type"] != "cuda"
    peaks = ("no peak ceilings on the CPU: % peak is not shown" if cpu else
             f"copy {ceil['copy_gbps']:.0f} GB/s  matmul {ceil['matmul_tflops']:.1f} TFLOP/s ({ceil['matmul_dtype']})")
    console.print(f"[bold]{env['device']}[/]  torch {env['torch']}  triton {env['triton']}  {peaks}")
    if not doc["performance_figure"]:
        console.print("[bold yellow]Not a performance figure:[/] CPU run (reference and Triton interpreter); it checks the harness only.")
    table = Table(show_lines=False)
    for col in ("op", "mode", "dtype", "case", "impl", "ms", "GB/s | TFLOP/s", "% peak", "vs eager", "vs compile", "check"):
        table.add_column(col, justify="right" if col in ("ms", "GB/s | TFLOP/s", "% peak", "vs eager", "vs compile") else "left")
    for r in doc["results"]:
        if r["status"] != "ok":
            table.add_row(r["op"], r["mode"], r["dtype"], r["case"], r["impl"], "", "", "", "", "",
                          f"[red]{r['status']}[/]: {r.get('error', '')[:60]}" if r["status"] == "failed"
                          else f"[dim]{r['status']}: {r.get('error', '')[:70]}[/]")
            continue
        if "tflops" in r:
            rate, pct = f"{r['tflops']:.1f}", f"{r['pct_of_matmul']:.0f}%"
        elif "gbps" in r:
            rate, pct = f"{r['gbps']:.0f}", f"{r['pct_of_copy']:.0f}%"
        else:
            rate, pct = "", ""
        pct = "" if cpu else pct
        if "tokens_per_s" in r:
            rate += f" ({r['tokens_per_s']:,.0f} tok/s)"
        sp = r.get("speedup", {})
        fmt = lambda k, sp=sp: f"{sp[k]:.2f}x" if k in sp else ""
        check = f"ok ({r['error_ratio']:.2f})" if "error_ratio" in r else "baseline"
        table.add_row(r["op"], r["mode"], r["dtype"], r["case"], r["impl"], f"{r['ms']:.4f}", rate, pct,
                      fmt("torch-eager"), fmt("torch-compile"), check)
    if not any(r["status"] != "skipped" for r in doc["results"]):
        console.print("[yellow]nothing was run:[/] " + "; ".join(sorted({r.get("error", "") for r in doc["results"]})))
        return
    console.print(table)
