"""`fastlm train`: next-token prediction for fastlm.models.GPT, on one device or under torchrun.

bf16 autocast on GPU, AdamW (fused on CUDA), linear warm-up then cosine decay, gradient clipping
and accumulation, a held-out split with eval loss and perplexity, a progress bar (loss, tokens/s,
MFU on GPU), metrics as JSONL and a loss-curve PNG. A checkpoint is a directory
(``OUT/checkpoint``) holding model.safetensors, config.json, optimizer.pt, rng.pt,
trainer_state.json (step, data position, settings) and tokenizer.json; it is written into a temporary
directory and renamed into place, so a crash never leaves a half-written one. ``resume`` continues
exactly: the data order is a function of (seed, position). The first Ctrl-C (SIGINT) finishes the
current step, writes a checkpoint and exits; a second one exits at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import torch

import fastlm
from fastlm import data as fdata
from fastlm.models.gpt import GPT, PRESETS, GPTConfig
from fastlm.tokenizer import Tokenizer, train_or_load_cached

CKPT_FILES = ("model.safetensors", "config.json", "optimizer.pt", "rng.pt", "trainer_state.json", "tokenizer.json")


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, incomplete or corrupt."""


@dataclasses.dataclass
class TrainConfig:
    data: list[str] | None = None  # files or directories; None: the Python standard library
    preset: str = "tiny"
    model: dict = dataclasses.field(default_factory=dict)  # GPTConfig overrides
    steps: int = 500
    batch_size: int = 16  # per process and micro-step
    seq_len: int | None = None  # default: the model's block_size
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float | None = None  # default lr / 10
    warmup: int | None = None  # default min(100, steps // 10)
    decay_steps: int | None = None  # the cosine's length; default steps
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    eval_interval: int = 100
    eval_iters: int = 8
    log_interval: int = 10
    ckpt_interval: int = 0  # 0: at the end (and on Ctrl-C) only
    out: str = "out"
    resume: bool = False
    seed: int = 1337
    vocab_size: int | None = None  # of the BPE trained on the corpus; default the preset's
    tokenizer: str | None = None  # a tokenizer.json or a GPT-2 vocab.json + merges.txt directory
    val_fraction: float = 0.05
    device: str | None = None
    dtype: str | None = None  # autocast dtype: default bfloat16 on CUDA, float32 on the CPU
    backend: str | None = None  # fastlm backend for every op (default: fastlm's selection)
    compile: bool = False
    progress: bool = True
    time_limit: float | None = None  # seconds of training; then a checkpoint and a clean stop


# ---- checkpoints ---------------------------------------------------------------------------------


def find_checkpoint(path) -> Path | None:
    """The checkpoint directory at ``path``: itself, path/checkpoint, or path/checkpoint.old (left
    if a crash hit between the two renames of a save)."""
    p = Path(path)
    for c in (p, p / "checkpoint", p / "checkpoint.old"):
        if (c / "config.json").is_file() and (c / "model.safetensors").exists():
            return c
    return None


def save_checkpoint(out, model: GPT, optimizer, tokenizer: Tokenizer, state: dict) -> Path:
    from safetensors.torch import save_model

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".checkpoint-tmp-"))
    try:
        save_model(model, str(tmp / "model.safetensors"))
        cfg = {"model_type": "fastlm-gpt", "fastlm_version": fastlm.__version__, **model.config.to_dict()}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / "rng.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1, default=str))
        tokenizer.save(tmp)
        final, old = out / "checkpoint", out / "checkpoint.old"
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        return final
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path.parent}: {what} {path.name} is unreadable or corrupt ({exc})") from None


def load_model(path, device=None) -> GPT:
    """The GPT stored in a fastlm checkpoint directory (or a training output directory)."""
    from safetensors.torch import load_model as st_load

    ckpt = find_checkpoint(path)
    if ckpt is None:
        if not Path(path).exists():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        raise CheckpointError(f"checkpoint {path}: no config.json and model.safetensors in it (nor in {path}/checkpoint)")
    cfg = _read_json(ckpt / "config.json", "the model config")
    cfg.pop("model_type", None)
    cfg.pop("fastlm_version", None)
    try:
        config = GPTConfig.from_dict(cfg)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {ckpt}: config.json is not a GPT config ({exc})") from None
    model = GPT(config)
    try:
        st_load(model, str(ckpt / "model.safetensors"), strict=True, device=str(device or "cpu"))
    except Exception as exc:
        raise CheckpointError(f"checkpoint {ckpt}: model.safetensors is corrupt, truncated or does not match config.json ({type(exc).__name__}: {exc})") from None
    return model.to(device) if device is not None else model


def load_checkpoint(path, device=None) -> tuple[GPT, Tokenizer, dict, dict | None, dict]:
    """(model, tokenizer, trainer state, optimizer state dict, rng states) from a checkpoint."""
    ckpt = find_checkpoint(path)
    if ckpt is None:
        raise CheckpointError(f"no checkpoint in {path} (expected {path}/checkpoint with {', '.join(CKPT_FILES)})")
    missing = [f for f in CKPT_FILES if not (ckpt / f).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {ckpt} is incomplete: missing {', '.join(missing)}")
    model = load_model(ckpt, device)
    try:
        tokenizer = Tokenizer.load(ckpt / "tokenizer.json")
        opt_state = torch.load(ckpt / "optimizer.pt", map_location=device or "cpu", weights_only=True)
        rng = torch.load(ckpt / "rng.pt", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {ckpt}: a file is corrupt ({type(exc).__name__}: {exc})") from None
    state = _read_json(ckpt / "trainer_state.json", "the trainer state")
    return model, tokenizer, state, opt_state, rng


# ---- the loop ------------------------------------------------------------------------------------


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warm-up to lr over ``warmup`` steps, then cosine to min_lr at ``decay_steps``."""
    warmup = tc.warmup if tc.warmup is not None else min(100, tc.steps // 10)
    decay = tc.decay_steps or tc.steps
    min_lr = tc.lr / 10 if tc.min_lr is None else tc.min_lr
    if step < warmup:
        return tc.lr * (step + 1) / warmup
    if step >= decay:
        return min_lr
    ratio = (step - warmup) / max(1, decay - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (tc.lr - min_lr)


def make_optimizer(model: GPT, tc: TrainConfig, device: torch.device):
    """AdamW; weight decay on matrices only (not on norms, biases); fused on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": tc.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    extra = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=tc.lr, betas=tuple(tc.betas), **extra)


@torch.no_grad()
def evaluate(model: GPT, val_tokens, seq_len: int, batch_size: int, iters: int, device, autocast) -> float:
    was = model.training
    model.eval()
    losses = []
    for x, y in fdata.eval_batches(val_tokens, seq_len, batch_size, iters):
        with autocast:
            _, loss = model(x.to(device), y.to(device))
        losses.append(float(loss))
    model.train(was)
    return sum(losses) / len(losses)


def _peak_tflops(device, dtype) -> float | None:
    """The measured dense matmul rate of the GPU in the autocast dtype (the MFU denominator)."""
    if device.type != "cuda":
        return None
    n = 4096
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize(device)
    return 10 * 2 * n**3 / (time.perf_counter() - t0) / 1e12


class _Interrupt:
    """SIGINT sets a flag (the loop saves and stops after the step); a second SIGINT raises at once."""

    def __init__(self):
        self.flag, self.prev = False, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.prev = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.flag:
            raise KeyboardInterrupt
        self.flag = True
        print("\ninterrupted: finishing this step and writing a checkpoint (Ctrl-C again to quit now)", flush=True)

    def __exit__(self, *exc):
        if self.prev is not None:
            signal.signal(signal.SIGINT, self.prev)


def _setup_distributed(device: str | None):
    """(rank, world size, local rank); under torchrun, NCCL on GPUs, gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    gpu = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if gpu:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if gpu else "gloo")
    return dist.get_rank(), dist.get_world_size(), local


def _barrier(world):
    if world > 1:
        torch.distributed.barrier()


def plot_losses(metrics_path: Path, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if train:
        ax.plot(*zip(*train, strict=True), label="train")
    if val:
        ax.plot(*zip(*val, strict=True), marker="o", label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def train(tc: TrainConfig, on_step=None, log=print) -> dict:
    """Train; returns a summary (``interrupted`` is True after a Ctrl-C, once the checkpoint is
    written). ``on_step(step, model)`` is called after each optimizer step."""
    rank, world, local = _setup_distributed(tc.device)
    main = rank == 0
    device = torch.device(tc.device or (f"cuda:{local}" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, tc.dtype) if tc.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    out = Path(tc.out)
    if tc.preset not in PRESETS:
        raise ValueError(f"unknown GPT preset {tc.preset!r}; presets: {', '.join(PRESETS)}")

    files = fdata.find_files(tc.data)
    state, opt_state, rng = {}, None, None
    if tc.resume:
        model, tokenizer, state, opt_state, rng = load_checkpoint(out)
        cfg = model.config
    else:
        if tc.tokenizer:
            tokenizer = Tokenizer.load(tc.tokenizer)
        else:
            vocab = tc.vocab_size or PRESETS[tc.preset]["vocab_size"]
            if not main:
                _barrier(world)  # rank 0 trains and caches the tokenizer first
            tokenizer = train_or_load_cached(files, vocab, fdata.read_text)
            if main:
                _barrier(world)
        cfg = GPTConfig.from_preset(tc.preset, **{"vocab_size": tokenizer.vocab_size, **tc.model})
        if tc.seq_len and tc.seq_len > cfg.block_size:
            cfg = dataclasses.replace(cfg, block_size=tc.seq_len)
        torch.manual_seed(tc.seed)
        model = GPT(cfg)
    if not cfg.causal:
        raise ValueError("fastlm train is next-token prediction and needs a causal model (causal=True)")
    T = tc.seq_len or cfg.block_size
    if T > cfg.block_size:
        raise ValueError(f"--seq-len {T} is longer than the checkpoint's context (block_size {cfg.block_size})")
    if not main:
        _barrier(world)
    tokens = fdata.tokenize(files, tokenizer)
    if main:
        _barrier(world)
    train_tokens, val_tokens = fdata.split(tokens, T, tc.val_fraction)
    batches = fdata.Batches(train_tokens, T, tc.seed)

    model.to(device)
    optimizer = make_optimizer(model, tc, device)
    if opt_state is not None:
        optimizer.load_state_dict(opt_state)
    if rng is not None:
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    step, position = int(state.get("step", 0)), int(state.get("position", 0))
    raw = model
    if tc.compile:
        model = torch.compile(model)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[local] if device.type == "cuda" else None)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    backend_ctx = fastlm.use_backend(tc.backend) if tc.backend else contextlib.nullcontext()

    metrics = out / "metrics.jsonl"
    if main:
        out.mkdir(parents=True, exist_ok=True)
        tokenizer.save(out)
        kept = []
        if tc.resume and metrics.is_file():
            kept = [ln for ln in metrics.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        metrics.write_text("".join(ln + "\n" for ln in kept))
    B, accum = tc.batch_size, tc.grad_accum
    tokens_per_step = B * T * accum * world
    peak = _peak_tflops(device, dtype) if main else None
    flops_per_token = raw.flops_per_token(T)
    if main:
        log(f"model: {raw.num_params() / 1e6:.2f}M parameters ({cfg.n_layer} layers, d={cfg.n_embd}, vocab {cfg.vocab_size}), "
            f"context {T}; data: {len(files)} files, {train_tokens.numel():,} train / {val_tokens.numel():,} held-out tokens; "
            f"{tokens_per_step:,} tokens/step on {world} x {device.type}, {str(dtype).replace('torch.', '')}")

    def write(row):
        if main:
            with open(metrics, "a") as f:
                f.write(json.dumps(row) + "\n")

    def checkpoint():
        if main:
            st = {"step": step, "position": position, "tokens_seen": step * tokens_per_step,
                  "train_config": dataclasses.asdict(tc), "world_size": world}
            save_checkpoint(out, raw, optimizer, tokenizer, st)
            plot_losses(metrics, out / "loss.png")
        _barrier(world)

    bar = None
    if main and tc.progress:
        from tqdm import tqdm

        bar = tqdm(total=tc.steps, initial=step, desc="train", dynamic_ncols=True, disable=None)  # no bar when not a terminal
        log = bar.write
    summary = {"start_step": step}
    interrupted = False
    last_loss = eval_loss = None
    t_last, steps_since = time.perf_counter(), 0
    t_start = t_last
    interval_loss, loss_steps = torch.zeros((), device=device), 0
    stop = torch.zeros(2, device=device)
    model.train()
    with _Interrupt() as interrupt, backend_ctx:
        while step < tc.steps:
            lr = lr_at(step, tc)
            for g in optimizer.param_groups:
                g["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            for micro in range(accum):
                x, y = batches.get(position + rank * B, B)
                position += B * world
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                sync = model.no_sync() if world > 1 and micro < accum - 1 else contextlib.nullcontext()
                with sync, autocast:
                    _, loss = model(x, y)
                (loss / accum).backward()
                loss_sum += loss.detach()
            if tc.grad_clip:
                torch.nn.utils.clip_grad_norm_(raw.parameters(), tc.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            interval_loss += loss_sum
            loss_steps += 1
            step += 1
            steps_since += 1
            if bar is not None:
                bar.update(1)
            if on_step is not None:
                on_step(step, raw)
            time_up = bool(tc.time_limit) and time.perf_counter() - t_start > tc.time_limit
            if world > 1:  # every rank stops after the same step
                stop[0], stop[1] = float(interrupt.flag), float(time_up)
                torch.distributed.all_reduce(stop)
                interrupt.flag, time_up = bool(stop[0] > 0), bool(stop[1] > 0)
            stopping = interrupt.flag or time_up
            final = stopping or step == tc.steps
            if step % tc.log_interval == 0 or final:
                if world > 1:
                    torch.distributed.all_reduce(interval_loss)
                last_loss = float(interval_loss) / accum / world / loss_steps  # the mean since the last log
                interval_loss.zero_()
                loss_steps = 0
                dt = time.perf_counter() - t_last
                tps = tokens_per_step * steps_since / dt
                row = {"step": step, "loss": last_loss, "lr": lr, "tokens_per_s": tps}
                if peak:
                    row["mfu"] = flops_per_token * tps / world / (peak * 1e12)
                write(row)
                if bar is not None:
                    post = {"loss": f"{last_loss:.3f}", "tok/s": f"{tps:,.0f}"}
                    if "mfu" in row:
                        post["mfu"] = f"{100 * row['mfu']:.1f}%"
                    bar.set_postfix(post)
                t_last, steps_since = time.perf_counter(), 0
            if tc.eval_interval and (step % tc.eval_interval == 0 or final):
                eval_loss = evaluate(raw, val_tokens, T, B, tc.eval_iters, device, autocast)
                write({"step": step, "eval_loss": eval_loss, "eval_ppl": math.exp(min(eval_loss, 50))})
                if main:
                    log(f"step {step}: train loss {last_loss if last_loss is not None else float('nan'):.3f}, "
                        f"held-out loss {eval_loss:.3f}, perplexity {math.exp(min(eval_loss, 50)):.1f}")
                t_last, steps_since = time.perf_counter(), 0
            if tc.ckpt_interval and step % tc.ckpt_interval == 0 and step < tc.steps:
                checkpoint()
            if stopping:
                if main and time_up and not interrupt.flag:
                    log(f"time limit of {tc.time_limit:g} s reached at step {step}")
                interrupted = interrupt.flag
                break
        if bar is not None:
            bar.close()
        checkpoint()
    summary.update(step=step, loss=last_loss, eval_loss=eval_loss, interrupted=interrupted, out=str(out))
    if main:
        if interrupted:
            log(f"checkpoint written at step {step} to {out / 'checkpoint'}; continue with --resume")
        else:
            log(f"done: {step} steps; checkpoint in {out / 'checkpoint'}, metrics in {metrics}, loss curve in {out / 'loss.png'}")
    return summary
