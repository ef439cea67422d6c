"""The `fastlm` command: info, check, bench (train and generate join with the GPT)."""

from __future__ import annotations

import argparse
import os
import sys


def _cmd_info(args) -> int:
    from fastlm import info

    data = info.collect()
    if args.json:
        import json

        print(json.dumps(data, indent=1, default=str))
    else:
        print(info.render(data))
    return 0


def _cmd_check(args) -> int:
    """Validate every op and available backend against the references; non-zero exit on failure."""
    import torch

    from rich.console import Console
    from rich.table import Table

    import fastlm
    from fastlm import cases

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("fastlm check: --device cuda asked for, but torch sees no CUDA device", file=sys.stderr)
        return 2
    ops = args.ops or list(cases.OPS)
    unknown = [o for o in ops if o not in cases.OPS]
    if unknown:
        print(f"fastlm check: unknown op(s) {', '.join(unknown)}; known: {', '.join(cases.OPS)}", file=sys.stderr)
        return 2
    backends = [b for b in fastlm.available_backends(device) if b != "torch"]
    console = Console()
    console.print(f"checking {', '.join(ops)} on {device} with backends {', '.join(backends) or 'none'}")
    table = Table()
    for col in ("op", "backend", "cases", "passed", "worst ratio", "first failure"):
        table.add_column(col)
    failed = 0
    for op in ops:
        op_cases = cases.cases(op, device, full=args.full)
        for b in backends:
            passed, worst, first = 0, 0.0, ""
            for case in op_cases:
                try:
                    ratios = cases.check(case, b)
                    worst = max([worst, *ratios.values()])
                    passed += 1
                except Exception as exc:
                    first = first or f"{case.id}: {type(exc).__name__}: {exc}"[:160]
            failed += len(op_cases) - passed
            ok = passed == len(op_cases)
            table.add_row(op, b, str(len(op_cases)), f"[{'green' if ok else 'red'}]{passed}[/]", f"{worst:.2f}", first)
    console.print(table)
    console.print("ratio = worst error / tolerance bound (<= 1 passes; fastlm.testing states the rule)")
    if not backends:
        console.print("[yellow]no kernel backend can run here: nothing was checked[/]")
        return 1
    return 1 if failed else 0


def _cmd_bench(args) -> int:
    import torch

    from fastlm.bench import REGISTRY, report, runner

    if args.list:
        for name, e in REGISTRY.items():
            print(f"{name:18s} {e.metric:9s} modes {','.join(e.modes):13s} {e.description}")
        return 0
    if not args.op:
        print("fastlm bench: name an op, `all`, or --list", file=sys.stderr)
        return 2
    has_gpu = torch.cuda.is_available()
    if not has_gpu and not args.quick:
        print(
            "fastlm bench: a CUDA GPU is needed for performance figures (torch sees none). "
            "`fastlm bench OP --quick` runs the harness end to end on the CPU, labelled as not a performance figure.",
            file=sys.stderr,
        )
        return 2
    sizes = args.sizes
    if sizes and all(s.isdigit() for s in sizes.split(",")):
        sizes = [int(s) for s in sizes.split(",")]
    from rich.progress import track

    try:
        ceilings, results = runner.run(
            [args.op], dtype=args.dtype, modes=[args.mode] if args.mode else None, sizes=sizes,
            backends=args.backends.split(",") if args.backends else None, quick=args.quick,
            progress=lambda todo: track(todo, description="benchmarking", transient=True),
        )
    except ValueError as exc:
        print(f"fastlm bench: {exc}", file=sys.stderr)
        return 2
    device = "cuda" if has_gpu else "cpu"
    doc = report.document(ceilings, results, device, args.quick)
    report.print_table(doc)
    if args.json:
        report.write_json(doc, args.json)
        print(f"wrote {args.json}")
    if args.csv:
        report.write_csv(doc, args.csv)
        print(f"wrote {args.csv}")
    if args.plot:
        report.write_plot(doc, args.plot)
        print(f"wrote {args.plot}")
    return 1 if any(r["status"] == "failed" for r in results) else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastlm", description="Triton and CUDA kernels for PyTorch transformers.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("info", help="versions, GPU, which backends work and why not")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_info)
    s = sub.add_parser("check", help="validate every op and backend on this machine against the references")
    s.add_argument("ops", nargs="*", help="ops to check (default: all)")
    s.add_argument("--device", choices=["cuda", "cpu"])
    s.add_argument("--full", action="store_true", help="add the large GPU shapes")
    s.set_defaults(func=_cmd_check)
    s = sub.add_parser("bench", help="benchmark an op (or all) against torch and peers")
    s.add_argument("op", nargs="?", help="an entry of `fastlm bench --list`, or all")
    s.add_argument("--list", action="store_true", help="list the benchmark entries")
    s.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    s.add_argument("--sizes", help="a preset (default, large, quick) or comma-separated sizes")
    s.add_argument("--backends", help="comma-separated fastlm backends to time (default: all available)")
    s.add_argument("--mode", choices=["fwd", "bwd", "full"])
    s.add_argument("--json", metavar="PATH")
    s.add_argument("--csv", metavar="PATH")
    s.add_argument("--plot", metavar="PATH")
    s.add_argument("--quick", action="store_true", help="small sizes; on a CPU: a harness check, not a performance figure")
    s.set_defaults(func=_cmd_bench)
    return p


def _interpret_without_gpu(args) -> None:
    """Without a GPU, check and bench --quick run the Triton kernels through the interpreter. The
    variable must be set before triton is first imported, so before any kernel module loads."""
    if args.command in ("check", "bench") and "TRITON_INTERPRET" not in os.environ:
        import torch

        if not torch.cuda.is_available() and (args.command == "check" or args.quick) and "triton" not in sys.modules:
            os.environ["TRITON_INTERPRET"] = "1"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _interpret_without_gpu(args)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
