"""`fastlm train`: the loop that trains every task of fastlm.tasks (next-token prediction of
fastlm.models.GPT by default, masked-LM, classification, instruction fine-tuning, ...), on one device
or under torchrun.

bf16 autocast on GPU, AdamW (fused on CUDA), linear warm-up then cosine decay, gradient clipping
and accumulation, a held-out split with eval loss and perplexity, a progress bar (loss, tokens/s,
MFU on GPU), metrics as JSONL and a loss-curve PNG. A checkpoint is a directory
(``OUT/checkpoint``) holding model.safetensors, config.json, optimizer.pt, rng.pt,
trainer_state.json (step, data position, settings) and tokenizer.json; it is written into a temporary
directory and renamed into place, so a crash never leaves a half-written one. ``resume`` continues
exactly: the data order is a function of (seed, position). A task other than lm adds task.json
(its name, options and state: labels, a prompt template) and, with eval_accuracy, accuracy.png. The first Ctrl-C (SIGINT) finishes the
current step, writes a checkpoint and exits; a second one exits at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import math
import os
import shutil
import signal
import stat
import tempfile
import threading
import time
from pathlib import Path

import torch

import fastlm
from fastlm.models.gpt import GPT, GPTConfig, check_limits
from fastlm.tokenizer import Tokenizer

CKPT_FILES = ("model.safetensors", "config.json", "optimizer.pt", "rng.pt", "trainer_state.json", "tokenizer.json")
TASK_FILE = "task.json"  # {"task", "options", "state"} of a task other than lm (fastlm.tasks)
_ALL_FILES = (*CKPT_FILES, TASK_FILE)


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, incomplete, corrupt or malformed."""


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written (a full disk, ...); the previous one is kept."""


@dataclasses.dataclass
class TrainConfig:
    task: str = "lm"  # lm | mlm | classify | sft | a task registered in fastlm.tasks
    task_options: dict = dataclasses.field(default_factory=dict)  # the task's Options fields (--task-set)
    init_from: str | None = None  # start from these weights: a fastlm checkpoint or a local HF directory (tasks that take it)
    data: list[str] | None = None  # files or directories; None: the task's built-in default (lm: the Python standard library)
    preset: str = "tiny"
    model: dict = dataclasses.field(default_factory=dict)  # GPTConfig overrides
    steps: int = 500
    batch_size: int = 16  # per process and micro-step
    seq_len: int | None = None  # default: the model's block_size
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float | None = None  # default lr / 10
    warmup: int | None = None  # default min(100, decay_steps // 10): independent of steps once decay_steps is set
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
    overwrite: bool = False  # replace a checkpoint already in out (without it, or resume, that is an error)
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
    fit_time_limit: bool = False  # the schedule also follows elapsed / time_limit: warm-up and decay end in time

    @classmethod
    def for_task(cls, task: str = "lm", **given) -> TrainConfig:
        """The settings ``given``, the rest at the task's own defaults (its ``train_defaults``, e.g.
        vit's larger batch), then at TrainConfig's (which are the language model's). With
        resume=True the task's defaults are left out: a resumed run takes the checkpoint's settings."""
        from fastlm.tasks import get_task

        own = {} if given.get("resume") else dict(getattr(get_task(task), "train_defaults", {}))
        return cls(task=task, **{**own, **given})


# ---- checkpoints ---------------------------------------------------------------------------------

SUMS = "SHA256SUMS"  # one "<sha256 hex>  <file name>" line per file of CKPT_FILES (sha256sum -c reads it)
_TMP_PREFIX = ".checkpoint-tmp-"


def find_checkpoint(path) -> Path | None:
    """The checkpoint directory at ``path``: itself, path/checkpoint, or path/checkpoint.old (left
    if a crash hit between the two renames of a save)."""
    p = Path(path)
    for c in (p, p / "checkpoint", p / "checkpoint.old"):
        if (c / "config.json").is_file() and (c / "model.safetensors").exists():
            return c
    return None


def holds_checkpoint(out) -> bool:
    """True if ``out`` is a checkpoint or holds one (checkpoint/ or checkpoint.old/, even a broken one)."""
    p = Path(out)
    return find_checkpoint(p) is not None or any(os.path.lexists(p / n) for n in ("checkpoint", "checkpoint.old"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    """Delete a file, a link (never what it points to) or a directory tree; nothing if absent."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path, ignore_errors=True)
    else:
        os.unlink(path)


def replace_file(path, write) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then rename it over ``path``: a link at
    ``path`` is replaced by the file, and what it pointed to is never written."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_error(out: Path, exc: Exception) -> CheckpointWriteError:
    text = f"{type(exc).__name__}: {exc}"
    try:
        free = shutil.disk_usage(out).free
    except OSError:
        free = None
    full = (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)) or "No space left" in text \
        or "os error 28" in text or (free is not None and free < (1 << 20))
    kept = f"the previous checkpoint {out / 'checkpoint'} is kept" if os.path.lexists(out / "checkpoint") else "no earlier checkpoint was there"
    if full:
        room = f" ({free:,} bytes free)" if free is not None else ""
        return CheckpointWriteError(f"could not write the checkpoint in {out}: the disk holding it is full{room}; {kept}. "
                                    f"Free some space (or pick another --out) and run again ({text[:200]})")
    return CheckpointWriteError(f"could not write the checkpoint in {out} ({text[:300]}); {kept}")


def save_checkpoint(out, model, optimizer, tokenizer: Tokenizer | None, state: dict, *, config: dict | None = None,
                    task_info: dict | None = None) -> Path:
    """Write ``OUT/checkpoint``: every file into a fresh temporary directory, with their SHA-256
    digests in SHA256SUMS, fsynced (files, then the directory), then renamed into place; the
    previous checkpoint stays until the new one is in place. Temporary directories left by a crash
    are removed first. A failed write (a full disk) raises CheckpointWriteError naming the
    directory and leaves the previous checkpoint as it was. ``config``: config.json (default the
    GPT's config); ``task_info``: task.json (a task other than lm); no tokenizer: no tokenizer.json."""
    from safetensors.torch import save_model

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(_TMP_PREFIX + "*"):
        _remove(stale)
    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(dir=out, prefix=_TMP_PREFIX))
        save_model(model, str(tmp / "model.safetensors"))
        if config is None:
            config = {"model_type": "fastlm-gpt", "fastlm_version": fastlm.__version__, **model.config.to_dict()}
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        if task_info is not None:
            (tmp / TASK_FILE).write_text(json.dumps(task_info, indent=1))
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / "rng.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1, default=str))
        if tokenizer is not None:
            tokenizer.save(tmp)
        (tmp / SUMS).write_text("".join(f"{_sha256(tmp / f)}  {f}\n" for f in _ALL_FILES if (tmp / f).is_file()))
        for f in tmp.iterdir():
            _fsync(f)
        _fsync(tmp, directory=True)
        final, old = out / "checkpoint", out / "checkpoint.old"
        if os.path.lexists(final):
            _remove(old)
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync(out, directory=True)
        _remove(old)
        return final
    except Exception as exc:
        if tmp is not None:
            _remove(tmp)
        raise _write_error(out, exc) from None
    except BaseException:
        if tmp is not None:
            _remove(tmp)
        raise


def _regular_file(ckpt: Path, name: str) -> Path:
    """ckpt/name, which must be a regular file (a FIFO or device would block or never end)."""
    path = ckpt / name
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {ckpt} is incomplete: missing {name}") from None
    except OSError as exc:
        raise CheckpointError(f"checkpoint {ckpt}: {name} cannot be read ({exc})") from None
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"checkpoint {ckpt}: {name} is not a regular file")
    return path


def verify_checkpoint(ckpt, names=CKPT_FILES) -> None:
    """Each file of ``names`` is a regular file whose SHA-256 is the one SHA256SUMS records."""
    ckpt = Path(ckpt)
    sums = _regular_file(ckpt, SUMS)
    if sums.stat().st_size > 4096:
        raise CheckpointError(f"checkpoint {ckpt}: {SUMS} is corrupt (larger than a list of {len(_ALL_FILES)} digests)")
    recorded = {}
    for line in sums.read_text(errors="replace").splitlines():
        digest, sep, name = line.partition("  ")
        if not sep or name not in _ALL_FILES or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise CheckpointError(f"checkpoint {ckpt}: {SUMS} is corrupt (line {line[:80]!r})")
        recorded[name] = digest
    for name in names:
        path = _regular_file(ckpt, name)
        if name not in recorded:
            raise CheckpointError(f"checkpoint {ckpt}: {SUMS} records no digest for {name}")
        if _sha256(path) != recorded[name]:
            raise CheckpointError(f"checkpoint {ckpt}: {name} does not match its SHA-256 in {SUMS}: the file is corrupt or was changed")


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path.parent}: {what} {path.name} is unreadable or corrupt ({exc})") from None


def _find(path) -> Path:
    ckpt = find_checkpoint(path)
    if ckpt is None:
        if not Path(path).exists():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        raise CheckpointError(f"checkpoint {path}: no config.json and model.safetensors in it (nor in {path}/checkpoint)")
    return ckpt


def _read_config(ckpt: Path) -> GPTConfig:
    cfg = _read_json(ckpt / "config.json", "the model config")
    if not isinstance(cfg, dict):
        raise CheckpointError(f"checkpoint {ckpt}: config.json is not a JSON object (it holds a {type(cfg).__name__})")
    cfg = {k: v for k, v in cfg.items() if k not in ("model_type", "fastlm_version")}
    try:
        config = GPTConfig.from_dict(cfg)
        check_limits(config)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {ckpt}: config.json is not a valid GPT config ({exc})") from None
    return config


def _check_shapes(ckpt: Path, build) -> None:
    """The tensors in model.safetensors have the names and shapes of the module ``build()`` makes
    (config.json's); read from the file's header and a module on the meta device, so nothing is
    allocated yet."""
    from safetensors import safe_open

    try:
        with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
            stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:
        raise CheckpointError(f"checkpoint {ckpt}: model.safetensors is corrupt or truncated ({type(exc).__name__}: {exc})") from None
    with torch.device("meta"):
        expected = build().state_dict(keep_vars=True)
    names_of = {}
    for k, v in expected.items():
        names_of.setdefault(id(v), []).append(k)
    bad = [f"{k} {list(s)} (config.json implies {list(expected[k].shape) if k in expected else 'no such tensor'})"
           for k, s in stored.items() if k not in expected or tuple(expected[k].shape) != s]
    missing = [names[0] for names in names_of.values() if not any(n in stored for n in names)]
    if bad or missing:
        what = "; ".join(bad[:3] + [f"missing {', '.join(missing[:3])}"] * bool(missing))
        raise CheckpointError(f"checkpoint {ckpt}: model.safetensors does not match config.json: {what}")


def _load_module(ckpt: Path, build, device=None):
    """``build()`` (a module of the checkpoint's shapes) with model.safetensors' weights, checked for NaN/inf."""
    from safetensors.torch import load_model as st_load

    _check_shapes(ckpt, build)
    model = build()
    try:
        st_load(model, str(ckpt / "model.safetensors"), strict=True, device=str(device or "cpu"))
    except Exception as exc:
        raise CheckpointError(f"checkpoint {ckpt}: model.safetensors is corrupt, truncated or does not match config.json ({type(exc).__name__}: {exc})") from None
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"checkpoint {ckpt}: model.safetensors holds NaN or infinite values in {name}")
    return model.to(device) if device is not None else model


def _load_model(ckpt: Path, device=None) -> GPT:
    config = _read_config(ckpt)
    return _load_module(ckpt, lambda: GPT(config), device)


def load_model(path, device=None) -> GPT:
    """The GPT stored in a fastlm checkpoint directory (or a training output directory). The files
    are checked against SHA256SUMS, config.json against sane limits and the weights' shapes
    before anything is allocated, and the weights for NaN/inf. Checkpoints of lm, mlm and sft
    hold a plain GPT; another task's model loads with fastlm.tasks.load_task."""
    ckpt = _find(path)
    verify_checkpoint(ckpt, ("config.json", "model.safetensors"))
    info = _task_info(ckpt)
    if info is not None and info["task"] not in _GPT_TASKS:
        raise CheckpointError(f"checkpoint {ckpt} holds a {info['task']} model, not a plain GPT: load it with "
                              f"fastlm.tasks.load_task")
    return _load_model(ckpt, device)


_GPT_TASKS = ("lm", "mlm", "sft")  # their checkpoints hold a plain GPT (task.json adds the task's settings)


def _task_info(ckpt: Path) -> dict | None:
    if os.path.lexists(ckpt / TASK_FILE):
        verify_checkpoint(ckpt, (TASK_FILE,))
    from fastlm.tasks import read_task_json

    return read_task_json(ckpt)


def _make_task(ckpt: Path, info: dict | None):
    from fastlm.tasks import get_task

    name = "lm" if info is None else info["task"]
    try:
        return get_task(name)(info.get("options", {}) if info else {})
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {ckpt}: task.json: {exc}") from None


def _load_task_parts(ckpt: Path, device=None, verify_all: bool = False):
    """(task, model) of a checkpoint: task.json's task with its options, state and tokenizer, the model of its config.json."""
    info = _task_info(ckpt)
    task = _make_task(ckpt, info)
    names = CKPT_FILES if verify_all else ("config.json", "model.safetensors")
    if not getattr(task, "has_tokenizer", True):
        names = tuple(n for n in names if n != "tokenizer.json")
    verify_checkpoint(ckpt, names)
    config = _read_json(ckpt / "config.json", "the model config")
    if not isinstance(config, dict):
        raise CheckpointError(f"checkpoint {ckpt}: config.json is not a JSON object (it holds a {type(config).__name__})")
    tstate = info.get("state", {}) if info else {}
    if getattr(task, "has_tokenizer", True):
        task.tokenizer = load_tokenizer(ckpt, 1 << 22, verify=not verify_all)
    if info is None:
        gpt_config = _read_config(ckpt)
        build = lambda: GPT(gpt_config)
    else:
        def build():
            try:
                return task.model_from_checkpoint(config, tstate)
            except CheckpointError:
                raise
            except (TypeError, ValueError, KeyError) as exc:
                raise CheckpointError(f"checkpoint {ckpt}: config.json or task.json does not describe a {task.name} "
                                      f"model ({type(exc).__name__}: {exc})") from None
    model = _load_module(ckpt, build, device)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if task.tokenizer is not None and isinstance(vocab, int) and task.tokenizer.vocab_size > vocab:
        raise CheckpointError(f"checkpoint {ckpt}: tokenizer.json has token ids up to {task.tokenizer.vocab_size - 1}, "
                              f"beyond the model's vocabulary of {vocab}")
    task.model = model
    return task, model


def sft_template(path) -> str:
    """The prompt template an sft checkpoint stores (ValueError for a checkpoint of another task)."""
    ckpt = _find(path)
    info = _task_info(ckpt)
    if info is None or info["task"] != "sft":
        what = "an lm" if info is None else f"a {info['task']}"
        raise ValueError(f"--instruction needs a checkpoint of `fastlm train --task sft` (it holds the prompt template); "
                         f"{path} is {what} checkpoint: use --prompt")
    return _make_task(ckpt, info).options.template


def load_task_model(path, device=None):
    """(task, model) from the checkpoint of any task, for inference; see fastlm.tasks.load_task."""
    return _load_task_parts(_find(path), device)


def load_tokenizer(ckpt, vocab_size: int, verify: bool = True) -> Tokenizer:
    """The checkpoint's tokenizer.json; every id it can produce must be below ``vocab_size``."""
    ckpt = Path(ckpt)
    if verify:
        verify_checkpoint(ckpt, ("tokenizer.json",))
    try:
        tokenizer = Tokenizer.load(_regular_file(ckpt, "tokenizer.json"))
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {ckpt}: {exc}") from None
    if tokenizer.vocab_size > vocab_size:
        raise CheckpointError(f"checkpoint {ckpt}: tokenizer.json has token ids up to {tokenizer.vocab_size - 1}, "
                              f"beyond the model's vocabulary of {vocab_size}")
    return tokenizer


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_rng(ckpt: Path, rng) -> None:
    cpu = rng.get("cpu") if isinstance(rng, dict) else None
    cuda = rng.get("cuda", []) if isinstance(rng, dict) else []
    ok = (isinstance(cpu, torch.Tensor) and cpu.dtype == torch.uint8 and cpu.shape == torch.get_rng_state().shape
          and isinstance(cuda, (list, tuple)) and all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in cuda))
    if not ok:
        raise CheckpointError(f"checkpoint {ckpt}: rng.pt is not a random-number state (a dict with the CPU "
                              f"generator's uint8 state of {torch.get_rng_state().numel()} bytes)")


def _check_optimizer_state(ckpt: Path, opt) -> None:
    groups = opt.get("param_groups") if isinstance(opt, dict) else None
    ok = isinstance(opt, dict) and isinstance(opt.get("state"), dict) and isinstance(groups, list) and all(
        isinstance(g, dict) and isinstance(g.get("params"), list) and all(_is_int(i) for i in g["params"]) for g in groups)
    if not ok:
        raise CheckpointError(f"checkpoint {ckpt}: optimizer.pt is not an optimizer state dict (state and param_groups)")


def _check_trainer_state(ckpt: Path, state) -> None:
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {ckpt}: trainer_state.json is not a JSON object (it holds a {type(state).__name__})")
    for key in ("step", "position"):
        if not _is_int(state.get(key)) or state[key] < 0:
            raise CheckpointError(f"checkpoint {ckpt}: trainer_state.json: {key} must be an integer >= 0, got {state.get(key)!r}")
    if not isinstance(state.get("train_config", {}), dict):
        raise CheckpointError(f"checkpoint {ckpt}: trainer_state.json: train_config must be a JSON object")


def load_task_checkpoint(path, device=None):
    """(task, model, trainer state, optimizer state dict, rng states) from a checkpoint of any task,
    each file verified against SHA256SUMS and checked for its expected structure."""
    ckpt = find_checkpoint(path)
    if ckpt is None:
        raise CheckpointError(f"no checkpoint in {path} (expected {path}/checkpoint with {', '.join(CKPT_FILES)})")
    info_there = os.path.lexists(ckpt / TASK_FILE)
    required = [f for f in CKPT_FILES if f != "tokenizer.json"] + [SUMS]
    missing = [f for f in required if not os.path.lexists(ckpt / f)]
    if missing:
        raise CheckpointError(f"checkpoint {ckpt} is incomplete: missing {', '.join(missing)}")
    if not info_there and not os.path.lexists(ckpt / "tokenizer.json"):
        raise CheckpointError(f"checkpoint {ckpt} is incomplete: missing tokenizer.json")
    task, model = _load_task_parts(ckpt, device, verify_all=True)
    state = _read_json(ckpt / "trainer_state.json", "the trainer state")
    _check_trainer_state(ckpt, state)
    try:
        opt_state = torch.load(ckpt / "optimizer.pt", map_location=device or "cpu", weights_only=True)
        rng = torch.load(ckpt / "rng.pt", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {ckpt}: a file is corrupt ({type(exc).__name__}: {exc})") from None
    _check_optimizer_state(ckpt, opt_state)
    _check_rng(ckpt, rng)
    return task, model, state, opt_state, rng


def load_checkpoint(path, device=None) -> tuple[GPT, Tokenizer, dict, dict | None, dict]:
    """(model, tokenizer, trainer state, optimizer state dict, rng states) from a checkpoint, each
    file verified against SHA256SUMS and checked for its expected structure."""
    task, model, state, opt_state, rng = load_task_checkpoint(path, device)
    return model, task.tokenizer, state, opt_state, rng


# ---- the loop ------------------------------------------------------------------------------------


def schedule(tc: TrainConfig) -> tuple[int, int, float]:
    """(warmup, decay_steps, min_lr) with the defaults filled in: decay_steps = steps, warmup =
    min(100, decay_steps // 10), min_lr = lr / 10. A checkpoint stores these, so a resumed run keeps
    the schedule it started with, and the steps before decay_steps never depend on ``steps``."""
    decay = tc.decay_steps or tc.steps
    warmup = tc.warmup if tc.warmup is not None else min(100, decay // 10)
    return warmup, decay, tc.lr / 10 if tc.min_lr is None else tc.min_lr


def lr_at(step: int, tc: TrainConfig, time_fraction: float = 0.0) -> float:
    """Linear warm-up to lr over ``warmup`` steps, then cosine to min_lr at ``decay_steps``. With
    ``time_fraction`` (elapsed / time_limit, under fit_time_limit) the schedule stands at step
    max(step, time_fraction * decay_steps), so warm-up and decay complete by the time limit."""
    warmup, decay, min_lr = schedule(tc)
    step = max(step, time_fraction * decay)
    if step < warmup:
        return tc.lr * (step + 1) / warmup
    if step >= decay:
        return min_lr
    ratio = (step - warmup) / max(1, decay - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (tc.lr - min_lr)


_INTS = {"steps": 1, "batch_size": 1, "grad_accum": 1, "eval_interval": 0, "eval_iters": 1, "log_interval": 1,
         "ckpt_interval": 0, "seed": None}
_OPTIONAL_INTS = {"seq_len": 2, "warmup": 0, "decay_steps": 1, "vocab_size": 257}


def _flag(name: str) -> str:
    return "--set" if name == "model" else "--" + name.replace("_", "-")


def check_config(tc: TrainConfig) -> None:
    """ValueError naming the first setting of ``tc`` outside its range (checked before any work)."""
    def need(ok, name, what):
        if not ok:
            raise ValueError(f"{_flag(name)} must be {what}, got {getattr(tc, name)!r}")

    for name, lo in _INTS.items():
        v = getattr(tc, name)
        need(_is_int(v) and (lo is None or v >= lo), name, "an integer" + (f" >= {lo}" if lo is not None else ""))
    for name, lo in _OPTIONAL_INTS.items():
        v = getattr(tc, name)
        need(v is None or (_is_int(v) and v >= lo), name, f"an integer >= {lo}")
    num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    need(num(tc.lr) and tc.lr > 0, "lr", "a positive number")
    need(tc.min_lr is None or (num(tc.min_lr) and tc.min_lr >= 0), "min_lr", "a number >= 0")
    need(num(tc.weight_decay) and tc.weight_decay >= 0, "weight_decay", "a number >= 0")
    need(num(tc.grad_clip) and tc.grad_clip >= 0, "grad_clip", "a number >= 0 (0: off)")
    need(num(tc.val_fraction) and 0 < tc.val_fraction < 1, "val_fraction", "a fraction in (0, 1)")
    need(tc.time_limit is None or (num(tc.time_limit) and tc.time_limit > 0), "time_limit", "a positive number of seconds")
    need(isinstance(tc.betas, (list, tuple)) and len(tc.betas) == 2 and all(num(b) and 0 <= b < 1 for b in tc.betas),
         "betas", "two numbers in [0, 1)")
    need(isinstance(tc.model, dict), "model", "a dict of GPTConfig fields")
    need(tc.data is None or (isinstance(tc.data, (list, tuple)) and all(isinstance(d, str) for d in tc.data)), "data", "a list of paths")
    need(isinstance(tc.preset, str), "preset", "a preset name")
    need(tc.dtype in (None, "float32", "bfloat16", "float16"), "dtype", "float32, bfloat16 or float16")
    if tc.fit_time_limit and not tc.time_limit:
        raise ValueError("--fit-time-limit needs --time-limit")
    if tc.resume and tc.overwrite:
        raise ValueError("--resume continues the checkpoint in --out and --overwrite replaces it: pass one of them")


def resolve_device(device: str | None, backend: str | None = None, local_rank: int = 0) -> torch.device:
    """The torch device to run on (default: cuda:local_rank if CUDA is available, else the CPU);
    ValueError if it, or fastlm backend ``backend`` on it, cannot run here."""
    if device is None:
        dev = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"--device {device!r} is not a device (expected cpu, cuda or cuda:N)") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device}: fastlm runs on cpu or cuda")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise ValueError(f"--device {device}: torch sees no CUDA device (torch {torch.__version__}, {build}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    if backend is not None:
        why = fastlm.backend.why_unavailable(backend, dev)
        if why is not None:
            raise ValueError(f"--backend {backend} cannot run on {dev.type} tensors here: {why}")
    return dev


# On --resume: these may differ from the checkpoint's settings (reported); the rest must match.
MAY_CHANGE = ("steps", "time_limit", "eval_interval", "eval_iters", "log_interval", "ckpt_interval", "device", "dtype",
              "backend", "compile")
_NOT_COMPARED = ("out", "resume", "overwrite", "progress", "fit_time_limit")


def _stored_config(tc: TrainConfig, seq_len: int) -> dict:
    """The settings a checkpoint records: paths made absolute, the schedule's defaults filled in."""
    warmup, decay, min_lr = schedule(tc)
    return dataclasses.asdict(dataclasses.replace(
        tc, data=[str(Path(d).resolve()) for d in tc.data] if tc.data else None, seq_len=seq_len,
        tokenizer=str(Path(tc.tokenizer).resolve()) if tc.tokenizer else None,
        warmup=warmup, decay_steps=decay, min_lr=min_lr, betas=list(tc.betas)))


def resume_config(tc: TrainConfig, stored: dict) -> tuple[TrainConfig, list[str]]:
    """``tc`` for a resumed run: a setting left at its default takes the checkpoint's value; one
    set to another value than the checkpoint's is a ValueError naming it, unless it is in
    MAY_CHANGE. Returns (config, notes on what was changed or taken)."""
    defaults = TrainConfig()
    norm = lambda name, v: _stored_config(dataclasses.replace(defaults, **{name: v}), 0)[name] if name in (
        "data", "tokenizer", "betas") else v
    taken, changed, differ = {}, [], []
    for f in dataclasses.fields(TrainConfig):
        name = f.name
        if name in _NOT_COMPARED or name not in stored:
            continue
        mine, theirs = norm(name, getattr(tc, name)), stored[name]
        if mine == theirs:
            continue
        if mine == norm(name, getattr(defaults, name)):
            taken[name] = tuple(theirs) if name == "betas" and isinstance(theirs, list) else theirs
        elif name in MAY_CHANGE:
            changed.append(f"{_flag(name)} {theirs} -> {mine}")
        else:
            differ.append(f"{_flag(name)} {mine!r} (the checkpoint's: {theirs!r})")
    if differ:
        raise ValueError("--resume continues a run with its own settings; these differ from the checkpoint's: "
                         + "; ".join(differ) + ". Leave them out (or start a new run in another --out)")
    try:
        merged = dataclasses.replace(tc, **taken)
        check_config(merged)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"trainer_state.json of the checkpoint in {tc.out} holds bad settings: {exc}") from None
    notes = []
    if changed:
        notes.append("changed on resume: " + "; ".join(changed))
        if merged.steps > schedule(merged)[1]:
            notes.append(f"the cosine decay ends at step {schedule(merged)[1]} (--decay-steps of the first run); "
                         f"later steps run at min_lr {schedule(merged)[2]:g}")
    return merged, notes


def make_optimizer(model: GPT, tc: TrainConfig, device: torch.device):
    """AdamW; weight decay on matrices only (not on norms, biases); fused on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": tc.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    extra = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=tc.lr, betas=tuple(tc.betas), **extra)


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
    """SIGINT or SIGTERM sets a flag (the loop saves and stops after the step); a second one raises
    at once. Under torchrun the launcher passes the signal it got on to every rank, which has it
    from the terminal already: a repeat of the same signal within ``grace`` seconds is that one."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.flag, self.signum, self.prev, self.t = False, None, {}, 0.0
        self.grace = 5.0 if "TORCHELASTIC_RUN_ID" in os.environ else 0.0

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.prev = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        if self.flag:
            if signum == self.signum and time.monotonic() - self.t < self.grace:
                return
            raise KeyboardInterrupt
        self.flag, self.signum, self.t = True, signum, time.monotonic()
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\ninterrupted ({name}): finishing this step and writing a checkpoint (Ctrl-C again to quit now)", flush=True)

    def __exit__(self, *exc):
        for s, h in self.prev.items():
            signal.signal(s, h)


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


def read_metrics(path: Path) -> tuple[list[dict], int]:
    """(rows, number of malformed lines skipped): the JSON objects with an integer ``step``. A
    crash can leave a half-written last line; such lines are skipped, not an error."""
    rows, bad = [], 0
    for line in path.read_text(errors="replace").splitlines() if path.is_file() else []:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict) and _is_int(row.get("step")):
            rows.append(row)
        else:
            bad += 1
    return rows, bad


def plot_losses(metrics_path: Path, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)[0]
    num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    train = [(r["step"], r["loss"]) for r in rows if num(r.get("loss"))]
    val = [(r["step"], r["eval_loss"]) for r in rows if num(r.get("eval_loss"))]
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
    replace_file(png_path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def plot_accuracy(metrics_path: Path, png_path: Path) -> bool:
    """The held-out accuracy curves (eval_accuracy, and eval_top1 for retrieval) as a PNG; False
    (nothing written) without such rows."""
    rows = read_metrics(metrics_path)[0]
    curves = {}
    for key, label in (("eval_accuracy", "held-out accuracy"), ("eval_top1", "held-out top-1 retrieval")):
        points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
        if points:
            curves[label] = points
    if not curves:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, points in curves.items():
        ax.plot(*zip(*points, strict=True), marker="o", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    replace_file(png_path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return True


def _load_optimizer_state(optimizer, opt_state: dict, out: Path) -> None:
    """The checkpoint's AdamW state, which must fit the model's parameters."""
    where = f"checkpoint in {out}: optimizer.pt"
    try:
        optimizer.load_state_dict(opt_state)
    except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as exc:
        raise CheckpointError(f"{where} does not fit the model ({type(exc).__name__}: {exc})") from None
    num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    for g in optimizer.param_groups:
        betas = g.get("betas")
        if not (num(g.get("eps")) and num(g.get("weight_decay")) and isinstance(betas, (list, tuple)) and len(betas) == 2
                and all(num(b) for b in betas)):
            raise CheckpointError(f"{where}: a parameter group has bad hyperparameters (eps, weight_decay, betas)")
        for p in g["params"]:
            st = optimizer.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in st and not (isinstance(st[key], torch.Tensor) and st[key].shape == p.shape):
                    raise CheckpointError(f"{where}: {key} does not have its parameter's shape {list(p.shape)}")
            step = st.get("step", 0)
            if not (num(step) or (isinstance(step, torch.Tensor) and step.numel() == 1)):
                raise CheckpointError(f"{where}: step is not a number")


def train(tc: TrainConfig, on_step=None, log=print) -> dict:
    """Train ``tc.task`` (fastlm.tasks); returns a summary (``interrupted`` is True after a Ctrl-C,
    once the checkpoint is written; ``signal`` says which: SIGINT or SIGTERM; ``eval``: the last
    held-out metrics). ``on_step(step, model)`` is called after each optimizer step. Every setting
    is checked before any work; ``out`` holding a checkpoint needs ``resume`` (continue it, with the
    settings it records: see resume_config) or ``overwrite``."""
    from fastlm.tasks import get_task

    check_config(tc)
    out = Path(tc.out)
    task_cls = get_task(tc.task)
    if not tc.resume and not tc.overwrite and holds_checkpoint(out):
        raise ValueError(f"--out {out} already holds a checkpoint: pass --resume to continue it, --overwrite to "
                         f"replace it, or another --out")
    state, opt_state, rng, notes = {}, None, None, []
    if tc.resume:
        task, model, state, opt_state, rng = load_task_checkpoint(out)
        tc, notes = resume_config(tc, state.get("train_config", {}))
        if task.name != tc.task:
            raise CheckpointError(f"checkpoint in {out}: task.json holds task {task.name!r}, trainer_state.json {tc.task!r}")
    else:
        task = task_cls(tc.task_options)
        if hasattr(task, "check"):
            task.check(tc)
    rank, world, local = _setup_distributed(tc.device)
    main = rank == 0
    device = resolve_device(tc.device, tc.backend, local)
    dtype = getattr(torch, tc.dtype) if tc.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    for note in notes if main else ():
        log(note)

    if not tc.resume:
        if not main:
            _barrier(world)  # rank 0 trains and caches the tokenizer first
        torch.manual_seed(tc.seed)
        model = task.new_model(tc, log)
        task.model = model
        if main:
            _barrier(world)
    tokenizer = task.tokenizer
    if not main:
        _barrier(world)
    described = task.load_data(tc, log)
    if main:
        _barrier(world)
    seq_len = getattr(task, "seq_len", None) or tc.seq_len

    model.to(device)
    optimizer = make_optimizer(model, tc, device)
    if opt_state is not None:
        _load_optimizer_state(optimizer, opt_state, out)
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
    task_info = None if task.name == "lm" else {"task": task.name, "options": task.options_dict(), "state": task.state()}

    metrics = out / "metrics.jsonl"
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if tokenizer is not None:
            replace_file(out / "tokenizer.json", lambda tmp: tokenizer.tk.save(str(tmp)))
        kept, bad = read_metrics(metrics) if tc.resume else ([], 0)
        if bad:
            log(f"{metrics}: skipped {bad} malformed line(s)")
        replace_file(metrics, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in kept if r["step"] <= step)))
    B, accum = tc.batch_size, tc.grad_accum
    examples_per_step = B * accum * world
    flops_per_token = task.flops_per_token(raw) if hasattr(task, "flops_per_token") else None
    peak = _peak_tflops(device, dtype) if main and flops_per_token else None
    if main:
        ran = fastlm.backend.resolve(tc.backend, device)
        why = {"torch": "the plain-PyTorch reference", "triton": "Triton kernels" + (" through the interpreter" * (device.type == "cpu")),
               "cuda": "fastlm._C CUDA kernels"}[ran]
        cfg = getattr(raw, "config", None)
        vocab = f", vocab {cfg.vocab_size}" if hasattr(cfg, "vocab_size") else ""
        shape = f" ({cfg.n_layer} layers, d={cfg.n_embd}{vocab})" if hasattr(cfg, "n_layer") else ""
        n_params = raw.num_params() if hasattr(raw, "num_params") else sum(p.numel() for p in raw.parameters())
        per_step = (f"{B * seq_len * accum * world:,} tokens/step" if task.name == "lm" else f"{examples_per_step:,} examples/step")
        log(f"task {task.name}; model: {n_params / 1e6:.2f}M parameters{shape}, context {seq_len}; data: {described}; "
            f"{per_step} on {world} x {device.type}, {str(dtype).replace('torch.', '')}; "
            f"ops on backend {ran} ({why})")

    def write(row):
        if main:  # O_NOFOLLOW: never append through a link put there during the run
            fd = os.open(metrics, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            with os.fdopen(fd, "a") as f:
                f.write(json.dumps(row) + "\n")

    def checkpoint():
        if main:
            kept = tc
            if tc.fit_time_limit and time_up:  # the schedule ran on the time: it ended at this step
                kept = dataclasses.replace(tc, steps=step, decay_steps=step, warmup=min(schedule(tc)[0], step))
            st = {"step": step, "position": position, "train_config": _stored_config(kept, seq_len), "world_size": world}
            if task.name == "lm":
                st["tokens_seen"] = step * B * seq_len * accum * world
            else:
                st["examples_seen"] = step * examples_per_step
            save_checkpoint(out, raw, optimizer, tokenizer, st, config=task.model_config(raw), task_info=task_info)
            plot_losses(metrics, out / "loss.png")
            plot_accuracy(metrics, out / "accuracy.png")
        _barrier(world)

    bar = None
    if main and tc.progress:
        from tqdm import tqdm

        bar = tqdm(total=tc.steps, initial=step, desc=f"train {task.name}" if task.name != "lm" else "train",
                   dynamic_ncols=True, disable=None)  # no bar when not a terminal
        log = bar.write
    summary = {"start_step": step}
    interrupted = False
    last_loss = eval_loss = None
    last_eval = {}
    t_last, steps_since, tokens_since = time.perf_counter(), 0, 0
    t_start = t_last
    interval_loss, loss_steps = torch.zeros((), device=device), 0
    stop = torch.zeros(2, device=device)
    time_fraction = torch.zeros((), device=device)
    time_up = False
    model.train()
    with _Interrupt() as interrupt, backend_ctx:
        while step < tc.steps:
            if tc.fit_time_limit:
                time_fraction.fill_((time.perf_counter() - t_start) / tc.time_limit)
                if world > 1:  # the same learning rate on every rank
                    torch.distributed.all_reduce(time_fraction, op=torch.distributed.ReduceOp.MAX)
            lr = lr_at(step, tc, float(time_fraction))
            for g in optimizer.param_groups:
                g["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            for micro in range(accum):
                batch = task.batch(position + rank * B, B)
                position += B * world
                n_tokens = task.tokens(batch)
                tokens_since = None if n_tokens is None or tokens_since is None else tokens_since + n_tokens * world
                batch = task.to_device(batch, device)
                sync = model.no_sync() if world > 1 and micro < accum - 1 else contextlib.nullcontext()
                with sync, autocast:
                    loss = task.loss(model, batch)
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
            asked = interrupt.flag
            # every rank stops after the same step; interrupt.flag is never written back, so a signal
            # handled just after the reduce returns is counted in the next step's
            if world > 1:
                stop[0], stop[1] = float(asked), float(time_up)
                torch.distributed.all_reduce(stop)
                asked, time_up = bool(stop[0] > 0), bool(stop[1] > 0)
            stopping = asked or time_up
            final = stopping or step == tc.steps
            if step % tc.log_interval == 0 or final:
                if world > 1:
                    torch.distributed.all_reduce(interval_loss)
                last_loss = float(interval_loss) / accum / world / loss_steps  # the mean since the last log
                interval_loss.zero_()
                loss_steps = 0
                dt = time.perf_counter() - t_last
                row = {"step": step, "loss": last_loss, "lr": lr}
                if tokens_since is not None:
                    tps = tokens_since / dt
                    row["tokens_per_s"] = tps
                    if peak:
                        row["mfu"] = flops_per_token * tps / world / (peak * 1e12)
                else:
                    row["examples_per_s"] = examples_per_step * steps_since / dt
                write(row)
                if bar is not None:
                    post = {"loss": f"{last_loss:.3f}"}
                    if "tokens_per_s" in row:
                        post["tok/s"] = f"{row['tokens_per_s']:,.0f}"
                    else:
                        post["ex/s"] = f"{row['examples_per_s']:,.1f}"
                    if "mfu" in row:
                        post["mfu"] = f"{100 * row['mfu']:.1f}%"
                    bar.set_postfix(post)
                t_last, steps_since, tokens_since = time.perf_counter(), 0, 0
            if tc.eval_interval and (step % tc.eval_interval == 0 or final):
                last_eval = task.evaluate(raw, B, tc.eval_iters, device, autocast)
                eval_loss = last_eval.get("eval_loss")
                write({"step": step, **last_eval})
                if main:
                    what = task.describe_eval(last_eval) if hasattr(task, "describe_eval") else \
                        ", ".join(f"{k.removeprefix('eval_').replace('_', ' ')} {v:.3f}" for k, v in last_eval.items())
                    log(f"step {step}: train loss {last_loss if last_loss is not None else float('nan'):.3f}, {what}")
                t_last, steps_since, tokens_since = time.perf_counter(), 0, 0
            if tc.ckpt_interval and step % tc.ckpt_interval == 0 and step < tc.steps:
                checkpoint()
            if stopping:
                if main and time_up and not asked:
                    fitted = " (with --fit-time-limit the warm-up and the cosine decay ran on the time, and are complete)"
                    log(f"time limit of {tc.time_limit:g} s reached at step {step}{fitted * tc.fit_time_limit}")
                interrupted = asked
                break
        signum = interrupt.signum
        if bar is not None:
            bar.close()
        checkpoint()
    summary.update(step=step, loss=last_loss, eval_loss=eval_loss, eval=last_eval, interrupted=interrupted, out=str(out),
                   signal=signum if interrupted else None)
    if main:
        if interrupted:
            log(f"checkpoint written at step {step} to {out / 'checkpoint'}; continue with --resume")
        else:
            curves = f"loss curve in {out / 'loss.png'}" + (f", accuracy in {out / 'accuracy.png'}" if (out / "accuracy.png").exists() else "")
            log(f"done: {step} steps; checkpoint in {out / 'checkpoint'}, metrics in {metrics}, {curves}")
    return summary
