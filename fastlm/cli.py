"""The `fastlm` command: info, check, bench, audit, train, generate, classify."""

from __future__ import annotations

import argparse
import os
import signal
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
    if args.max_cases is not None and args.max_cases < 1:
        print(f"fastlm check: --max-cases must be at least 1, got {args.max_cases}", file=sys.stderr)
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
        if args.max_cases and len(op_cases) > args.max_cases:  # spread over the list, not its first few
            step = len(op_cases) / args.max_cases
            op_cases = [op_cases[int(i * step)] for i in range(args.max_cases)]
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


def _parse_sets(items) -> dict:
    import dataclasses

    from fastlm.models.gpt import GPTConfig

    types = {f.name: f.type for f in dataclasses.fields(GPTConfig)}
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in types:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE with KEY one of {', '.join(types)}")
        t = str(types[key])
        if "bool" in t:
            out[key] = value.lower() in ("1", "true", "yes", "on")
        elif "int" in t:
            out[key] = None if value.lower() == "none" else int(value)
        elif "float" in t:
            out[key] = float(value)
        else:
            out[key] = value
    return out


def _parse_model_sets(task: str, items) -> dict:
    """--set KEY=VALUE items as model-config overrides: the task's own parse_sets (vit, clip) or GPTConfig's."""
    from fastlm.tasks import get_task

    parse = getattr(get_task(task), "parse_sets", None) if items else None
    return parse(items) if parse is not None else _parse_sets(items)


def _parse_task_sets(task: str, items) -> dict:
    """--task-set KEY=VALUE items as the task's options, typed by its Options dataclass."""
    from fastlm.tasks import get_task

    cls = get_task(task)
    return dict(cls.parse_option(item) for item in items)


def _cmd_audit(args) -> int:
    from fastlm import audit

    return audit.run(args)


_TASK_DEFAULTED = ("steps", "batch_size", "lr", "weight_decay")  # unset: the task's train_defaults, else TrainConfig's


def _cmd_train(args) -> int:
    from fastlm.training import TrainConfig, train

    if args.nproc_per_node is not None:
        return _launch_ranks(args)
    try:
        own = {k: getattr(args, k) for k in _TASK_DEFAULTED if getattr(args, k) is not None}
        tc = TrainConfig.for_task(
            args.task, task_options=_parse_task_sets(args.task, args.task_set), init_from=args.init_from,
            data=args.data, preset=args.preset, model=_parse_model_sets(args.task, args.set), **own,
            seq_len=args.seq_len, grad_accum=args.grad_accum, min_lr=args.min_lr, warmup=args.warmup,
            decay_steps=args.decay_steps, grad_clip=args.grad_clip,
            eval_interval=args.eval_interval, eval_iters=args.eval_iters, log_interval=args.log_interval,
            ckpt_interval=args.ckpt_interval, out=args.out, resume=args.resume, overwrite=args.overwrite, seed=args.seed,
            vocab_size=args.vocab_size, tokenizer=args.tokenizer, device=args.device, dtype=args.dtype,
            backend=args.backend, compile=args.compile, progress=not args.no_progress, time_limit=args.time_limit,
            fit_time_limit=args.fit_time_limit,
        )
        summary = train(tc)
    except (OSError, ValueError, TypeError) as exc:
        print(f"fastlm train: {exc}", file=sys.stderr)
        _end_distributed(ok=False)
        return 2
    except KeyboardInterrupt:  # the second Ctrl-C: quit at once, no checkpoint
        print("fastlm train: interrupted twice: stopped without a checkpoint", file=sys.stderr)
        return 130
    _end_distributed(ok=True)
    if summary["interrupted"]:
        return 128 + int(summary["signal"] or signal.SIGINT)
    return 0


def _launch_ranks(args) -> int:
    """``fastlm train --nproc-per-node N``: torchrun (standalone) with N ranks of the same command.
    Ctrl-C or SIGTERM reaches every rank (each finishes its step, rank 0 checkpoints) and the
    launcher exits 128 + the signal like a single process, without the launcher's traceback."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    n = args.nproc_per_node
    if n < 1:
        print(f"fastlm train: --nproc-per-node must be at least 1, got {n}", file=sys.stderr)
        return 2
    rest, skip = [], False
    for a in args.argv[1:]:
        if skip:
            skip = False
        elif a == "--nproc-per-node":
            skip = True
        elif not a.startswith("--nproc-per-node="):
            rest.append(a)
    launcher = get_args_parser().parse_args(["--standalone", f"--nproc_per_node={n}", "-m", "fastlm", "train", *rest])
    try:
        run(launcher)
    except SignalException as exc:
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:
        codes = sorted({f.exitcode for f in exc.failures.values()})
        print(f"fastlm train: {len(exc.failures)} of {n} ranks failed (exit codes {', '.join(map(str, codes))})", file=sys.stderr)
        return next((c for c in codes if c > 0), 1)
    return 0


def _end_distributed(ok: bool) -> None:
    """Tear the process group down only after every rank has let go of its DDP model and reached
    the same point: a rank that destroys gloo while a peer still talks to it aborts the process."""
    import gc

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        gc.collect()
        if ok:
            dist.barrier()
        dist.destroy_process_group()


def _cmd_generate(args) -> int:
    import torch

    import fastlm
    from fastlm.models import GPT
    from fastlm.tokenizer import StreamDecoder, Tokenizer
    from fastlm.training import find_checkpoint, load_tokenizer, resolve_device, sft_template

    try:
        if args.max_new_tokens < 0:
            raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
        template = None
        if args.instruction is not None:
            if args.prompt:
                raise ValueError("--instruction fills the checkpoint's prompt template, --prompt is raw text: pass one of them")
            template = sft_template(args.checkpoint)
        device = resolve_device(args.device, args.backend)
        dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
        model = GPT.from_pretrained(args.checkpoint).to(device=device, dtype=dtype)
        ckpt = find_checkpoint(args.checkpoint)
        if ckpt is not None and os.path.lexists(ckpt / "SHA256SUMS"):  # a fastlm checkpoint, not a HF directory
            tokenizer = load_tokenizer(ckpt, model.config.vocab_size)
        else:
            tokenizer = Tokenizer.load(args.checkpoint)
            if tokenizer.vocab_size > model.config.vocab_size:
                raise ValueError(f"{args.checkpoint}: the tokenizer has ids up to {tokenizer.vocab_size - 1}, beyond the "
                                 f"model's vocabulary of {model.config.vocab_size}")
        if template is not None:
            from fastlm.tasks.sft import apply_template

            ids = tokenizer.encode(apply_template(template, args.instruction))
        else:
            ids = tokenizer.encode(args.prompt) if args.prompt else [tokenizer.eos_id if tokenizer.eos_id is not None else 0]
        context = model.config.block_size
        if len(ids) > context:
            raise ValueError(f"the prompt is {len(ids)} tokens, longer than the model's context of {context} tokens")
        n = min(args.max_new_tokens, context - len(ids))
        if n < args.max_new_tokens:
            print(f"fastlm generate: generating {n} tokens, the room left in the {context}-token context", file=sys.stderr)
        stream = StreamDecoder(tokenizer, ids)
        printed = []

        def show(text):  # the prompt goes out with the first token: every check has passed by then
            if not printed:
                printed.append(True)
                sys.stdout.write(args.prompt)
            sys.stdout.write(text)
            sys.stdout.flush()

        stop = tokenizer.eos_id if template is not None else None  # an instruction's answer ends at end-of-text

        def on_token(step, tok):
            if stop is None or int(tok[0]) != stop:
                show(stream.push(int(tok[0])))

        backend = fastlm.use_backend(args.backend) if args.backend else _nullcontext()
        with backend:
            model.generate(ids, n, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                           seed=args.seed, stream=on_token, eos_token_id=stop)
        show("\n")
    except (OSError, ValueError, TypeError) as exc:
        print(f"fastlm generate: {exc}", file=sys.stderr)
        return 2
    return 0


def _cmd_classify(args) -> int:
    import json

    from fastlm.tasks import load_task
    from fastlm.training import resolve_device

    try:
        device = resolve_device(args.device, args.backend)
        task, model = load_task(args.checkpoint, device=device, expect="classify")
        import fastlm

        backend = fastlm.use_backend(args.backend) if args.backend else _nullcontext()
        with backend:
            results = task.predict(model, args.text, device)
    except (OSError, ValueError, TypeError) as exc:
        print(f"fastlm classify: {exc}", file=sys.stderr)
        return 2
    for text, r in zip(args.text, results, strict=True):
        if args.json:
            print(json.dumps({"text": text, **r}))
        else:
            probs = ", ".join(f"{lab}: {p:.3f}" for lab, p in sorted(r["probabilities"].items(), key=lambda kv: -kv[1]))
            print(f"{r['label']}\t({probs})")
    return 0


def _nullcontext():
    import contextlib

    return contextlib.nullcontext()


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
    s.add_argument("--max-cases", type=int, metavar="N", help="at most N cases per op, spread over its list (a quick look)")
    s.set_defaults(func=_cmd_check)
    s = sub.add_parser("bench", help="benchmark an op (or all) against torch and peers")
    s.add_argument("op", nargs="?", help="an entry of `fastlm bench --list`, or all")
    s.add_argument("--list", action="store_true", help="list the benchmark entries")
    s.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="default bfloat16 on a GPU, float32 on the CPU")
    s.add_argument("--sizes", help="a preset (default, large, quick) or comma-separated sizes")
    s.add_argument("--backends", help="comma-separated fastlm backends to time (default: all available)")
    s.add_argument("--mode", choices=["fwd", "bwd", "full"])
    s.add_argument("--json", metavar="PATH")
    s.add_argument("--csv", metavar="PATH")
    s.add_argument("--plot", metavar="PATH")
    s.add_argument("--quick", action="store_true", help="small sizes; on a CPU: a harness check, not a performance figure")
    s.set_defaults(func=_cmd_bench)
    s = sub.add_parser("audit", help="compile every kernel for sm_90a and sm_80 (no GPU needed): registers, spills, "
                                     "shared memory, occupancy, SASS facts, gates")
    from fastlm.audit import add_arguments

    add_arguments(s)
    s.set_defaults(func=_cmd_audit)
    s = sub.add_parser("train", help="train a task: the GPT by default (the tiny preset on the Python standard library), "
                                     "or --task mlm | classify | sft | vit | clip")
    s.add_argument("--task", default="lm", help="lm (next-token prediction, the default) | mlm (masked-LM, a bidirectional "
                                                "encoder) | classify (jsonl text/label) | sft (jsonl prompt/response) | "
                                                "vit (an ImageFolder directory) | clip (jsonl image/text)")
    s.add_argument("--task-set", action="append", default=[], metavar="KEY=VALUE",
                   help="a task option, e.g. --task-set pooling=mean (classify), --task-set template=... (sft), "
                        "--task-set mask_prob=0.15 (mlm)")
    s.add_argument("--init-from", metavar="DIR", help="start from these weights: a fastlm checkpoint, or a local Hugging Face "
                                                      "GPT-2 or BERT directory (classify, sft)")
    s.add_argument("--data", nargs="+", metavar="PATH", help="text files or directories (lm, mlm), a jsonl file (classify, sft); "
                                                           "default: a built-in set made from this Python's standard library")
    s.add_argument("--preset", default="tiny", help="tiny | gpt2 | gpt2-medium")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a model-config field (GPTConfig; ViTConfig for vit, CLIPConfig for clip), e.g. --set norm=rmsnorm --set positions=rotary")
    s.add_argument("--steps", type=int, help="default: the task's (vit 300), else 500")
    s.add_argument("--batch-size", type=int, help="sequences (images, pairs) per process and micro-step; default: the task's "
                   "(vit 64), else 16")
    s.add_argument("--seq-len", type=int, help="default: the preset's context")
    s.add_argument("--grad-accum", type=int, default=1)
    s.add_argument("--lr", type=float, help="default: the task's, else 1e-3")
    s.add_argument("--min-lr", type=float)
    s.add_argument("--warmup", type=int)
    s.add_argument("--decay-steps", type=int, help="length of the cosine decay (default: --steps)")
    s.add_argument("--weight-decay", type=float, help="default: the task's, else 0.1")
    s.add_argument("--grad-clip", type=float, default=1.0)
    s.add_argument("--eval-interval", type=int, default=100)
    s.add_argument("--eval-iters", type=int, default=8)
    s.add_argument("--log-interval", type=int, default=10)
    s.add_argument("--ckpt-interval", type=int, default=0, help="also checkpoint every N steps (default: at the end and on Ctrl-C)")
    s.add_argument("--vocab-size", type=int, help="of the byte-level BPE trained on the data (default: the preset's)")
    s.add_argument("--tokenizer", metavar="PATH", help="tokenizer.json, or a directory with vocab.json + merges.txt")
    s.add_argument("--out", default="out", help="output directory: checkpoint/, metrics.jsonl, loss.png")
    s.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint with its settings (those given must match, except --steps, "
                        "--time-limit, the intervals, --device/--dtype/--backend/--compile)")
    s.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in --out")
    s.add_argument("--seed", type=int, default=1337)
    s.add_argument("--device")
    s.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="autocast dtype (default bfloat16 on CUDA, float32 on CPU)")
    s.add_argument("--backend", choices=["torch", "triton", "cuda"])
    s.add_argument("--compile", action="store_true")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--time-limit", type=float, metavar="SECONDS", help="stop (with a checkpoint) after this much training time")
    s.add_argument("--fit-time-limit", action="store_true",
                   help="run the schedule on max(step / --steps, elapsed / --time-limit), so warm-up and decay complete "
                        "within --time-limit (not reproducible bit for bit: it follows the machine's speed)")
    s.add_argument("--nproc-per-node", type=int, metavar="N", help="run N ranks (DDP) through torchrun, standalone")
    s.set_defaults(func=_cmd_train)
    s = sub.add_parser("generate", help="generate text from a checkpoint, streaming it")
    s.add_argument("--checkpoint", required=True, metavar="DIR", help="a `fastlm train` output or checkpoint directory, or a Hugging Face GPT-2 directory")
    s.add_argument("--prompt", default="", help="text to continue (default: start from the end-of-text token)")
    s.add_argument("--instruction", help="an instruction for a `fastlm train --task sft` checkpoint: its prompt template "
                                         "is applied, the answer printed (up to the end-of-text token)")
    s.add_argument("--max-new-tokens", type=int, default=200)
    s.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    s.add_argument("--top-k", type=int)
    s.add_argument("--top-p", type=float)
    s.add_argument("--min-p", type=float)
    s.add_argument("--seed", type=int)
    s.add_argument("--device")
    s.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="default bfloat16 on CUDA, float32 on CPU")
    s.add_argument("--backend", choices=["torch", "triton", "cuda"])
    s.set_defaults(func=_cmd_generate)
    s = sub.add_parser("classify", help="label texts with a `fastlm train --task classify` checkpoint")
    s.add_argument("--checkpoint", required=True, metavar="DIR", help="a `fastlm train --task classify` output or checkpoint directory")
    s.add_argument("--text", required=True, action="append", help="a text to classify (repeat for several)")
    s.add_argument("--json", action="store_true", help="one JSON object per text: label and probabilities")
    s.add_argument("--device")
    s.add_argument("--backend", choices=["torch", "triton", "cuda"])
    s.set_defaults(func=_cmd_classify)
    return p


def _interpret_without_gpu(args) -> None:
    """Without a GPU, check and bench --quick run the Triton kernels through the interpreter. The
    variable must be set before triton is first imported, so before any kernel module loads."""
    if args.command in ("check", "bench") and "TRITON_INTERPRET" not in os.environ:
        import torch

        if not torch.cuda.is_available() and (args.command == "check" or args.quick) and "triton" not in sys.modules:
            os.environ["TRITON_INTERPRET"] = "1"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    _interpret_without_gpu(args)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
