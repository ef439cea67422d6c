"""Training tasks: what `fastlm train --task NAME` trains, beside the loop that trains it.

A task builds its model, its batches, its loss and its held-out metrics; the trainer
(fastlm.training.train) owns everything else: the loop, AdamW, the LR schedule, gradient clipping
and accumulation, autocast, DDP, the progress bar, metrics.jsonl, the loss and accuracy plots,
atomic checkpoints (with the task's name, options and state) and exact resume. Tasks:

    lm        next-token prediction of the GPT (fastlm.tasks.lm; the default, the format of old runs)
    mlm       masked-LM pretraining of the bidirectional GPT (causal=False)       fastlm.tasks.mlm
    classify  a head on a pooled representation, from a jsonl {"text", "label"}  fastlm.tasks.classify
    sft       instruction fine-tuning on {"prompt", "response"}, loss on the response only  fastlm.tasks.sft

A new task is a subclass of Task, registered with ``@register``; it then runs under
``fastlm train --task NAME`` (its options from ``--task-set KEY=VALUE``) and
``fastlm.training.train(TrainConfig(task=NAME, task_options={...}))``.

The contract (``tc`` is the run's fastlm.training.TrainConfig; every method runs on every rank):

    name: str                 the --task value
    Options: type             a dataclass of the task's own settings, every field with a default;
                              built from tc.task_options, stored in the checkpoint's task.json
    tokenizer                 a fastlm.tokenizer.Tokenizer (saved as tokenizer.json) or None
    new_model(tc, log) -> nn.Module
        A new run: fix the tokenizer, label set, ... (from tc.data or the built-in default data,
        tc.init_from, tc.tokenizer) and return the model, initialised under torch.manual_seed(tc.seed)
        (the trainer seeds before the call).
    state() -> dict           JSON: what, beyond Options and the weights, rebuilds and uses the
                              model (label names, a prompt template, ...); stored in task.json
    model_config(model) -> dict
        JSON for config.json: enough for model_from_checkpoint to rebuild the module's shapes.
    model_from_checkpoint(config, state) -> nn.Module
        An untrained module of a checkpoint's shapes (config.json, task.json's state; it may also
        restore attributes such as the label names from the state); the trainer builds it once on
        the meta device to check the stored tensors' names and shapes, then for real, and loads
        the weights. self.tokenizer is loaded from tokenizer.json before the call.
    load_data(tc, log) -> str
        Read and check the training and held-out data (after new_model or model_from_checkpoint:
        it may need the tokenizer and labels); returns a short description for the start-of-run log.
        Bad data raises ValueError naming the file, the line and what was expected.
    batch(position, n)        training examples position .. position + n - 1 in the run's order,
                              which is a function of (tc.seed, position) only: exact resume
    to_device(batch, device)  the batch on the device
    loss(model, batch) -> Tensor
        The mean loss; call ``model(...)`` (it may be DDP- or torch.compile-wrapped), once.
    evaluate(model, batch_size, iters, device, autocast) -> dict[str, float]
        Held-out metrics in eval mode without gradients: "eval_loss" always, "eval_accuracy" where
        it has a meaning; deterministic (no draw from the global RNG).
    tokens(batch) -> int | None   tokens in a batch (tokens/s, MFU), or None: examples/s is logged
    The trainer sets ``task.model`` (the unwrapped model) after new_model / model_from_checkpoint.
    Optional: check(tc) (settings, before any work), flops_per_token(model) (MFU),
    describe_eval(metrics) -> str (the log line), has_tokenizer = False (no tokenizer.json),
    train_defaults = {TrainConfig field: value} (what `fastlm train --task NAME` and
    TrainConfig.for_task use where the run does not say: vit's batch of 64, ...).

Checkpoint layout (fastlm.training.save_checkpoint): model.safetensors (the whole task model:
backbone and heads), config.json (model_config), task.json ({"task", "options", "state"}; absent
for lm, whose checkpoints are the plain GPT format), tokenizer.json (when the task has one),
optimizer.pt, rng.pt, trainer_state.json, SHA256SUMS. ``load_task(path)`` returns
(task, model) from any task's checkpoint for inference.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

TASKS: dict[str, type] = {}


def register(cls):
    """Class decorator: make a Task subclass available as ``--task cls.name``."""
    TASKS[cls.name] = cls
    return cls


BUILTIN = {"lm": "fastlm.tasks.lm", "mlm": "fastlm.tasks.mlm", "classify": "fastlm.tasks.classify", "sft": "fastlm.tasks.sft",
           "vit": "fastlm.vision", "clip": "fastlm.vision"}  # the module that registers each built-in task


def _load(modules) -> None:
    import importlib
    import importlib.util

    for name in modules:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name)


def get_task(name: str) -> type:
    """The Task class registered as ``name`` (importing only its own module); ValueError listing
    the known ones otherwise."""
    if name not in TASKS and name in BUILTIN:
        _load([BUILTIN[name]])
    if name not in TASKS:
        _load(dict.fromkeys(BUILTIN.values()))
        raise ValueError(f"--task {name!r} is not a task; tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]


class Task:
    """The base of every task: options handling and the defaults of the optional methods."""

    name = ""

    @dataclasses.dataclass
    class Options:
        pass

    tokenizer = None
    train_defaults: dict = {}  # TrainConfig settings this task trains best with (TrainConfig.for_task, the CLI)

    def __init__(self, options: dict | None = None):
        self.options = self.make_options(options or {})

    @classmethod
    def make_options(cls, options: dict):
        """Options from a dict; an unknown key or a value of the wrong type is a ValueError."""
        if not isinstance(options, dict):
            raise TypeError(f"--task-set: the options of task {cls.name} must be a dict, got {type(options).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls.Options)}
        unknown = sorted(set(options) - set(fields))
        if unknown:
            known = ", ".join(fields) or "none"
            raise ValueError(f"--task-set {unknown[0]}: task {cls.name} has no option {unknown[0]!r} (its options: {known})")
        try:
            return cls.Options(**options)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"--task-set: task {cls.name}: {exc}") from None

    @classmethod
    def parse_option(cls, item: str) -> tuple[str, object]:
        """``KEY=VALUE`` (the --task-set form) as (key, value) typed by the Options field."""
        key, sep, value = item.partition("=")
        fields = {f.name: f for f in dataclasses.fields(cls.Options)}
        if not sep or key not in fields:
            raise ValueError(f"--task-set {item!r}: expected KEY=VALUE with KEY one of {', '.join(fields) or '(none)'} "
                             f"(the options of task {cls.name})")
        t = str(fields[key].type)
        try:
            if "bool" in t:
                if value.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                    raise ValueError(f"expected true or false, got {value!r}")
                return key, value.lower() in ("1", "true", "yes", "on")
            if "int" in t and "float" not in t:
                return key, int(value)
            if "float" in t:
                return key, float(value)
        except ValueError as exc:
            raise ValueError(f"--task-set {item!r}: {exc}") from None
        return key, value.encode().decode("unicode_escape") if "\\" in value else value

    def options_dict(self) -> dict:
        return dataclasses.asdict(self.options)

    def state(self) -> dict:
        return {}

    def model_config(self, model) -> dict:
        import fastlm

        return {"model_type": "fastlm-gpt", "fastlm_version": fastlm.__version__, **model.config.to_dict()}

    def to_device(self, batch, device):
        if isinstance(batch, dict):
            return {k: v.to(device, non_blocking=True) if hasattr(v, "to") else v for k, v in batch.items()}
        return tuple(t.to(device, non_blocking=True) for t in batch)

    def tokens(self, batch) -> int | None:
        return None


def read_task_json(ckpt: Path) -> dict | None:
    """task.json of a checkpoint directory as {"task", "options", "state"}, or None without one (lm)."""
    from fastlm.training import CheckpointError

    path = Path(ckpt) / "task.json"
    if not path.exists():
        return None
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {ckpt}: task.json is unreadable or corrupt ({exc})") from None
    ok = isinstance(info, dict) and isinstance(info.get("task"), str) and isinstance(info.get("options", {}), dict) \
        and isinstance(info.get("state", {}), dict)
    if not ok:
        raise CheckpointError(f"checkpoint {ckpt}: task.json must be an object with a task name, options and state")
    return info


def load_task(path, device=None, expect: str | None = None):
    """(task, model) from a checkpoint of any task (a training output or checkpoint directory),
    every file verified; ``expect``: the task it must be (ValueError naming what it is otherwise)."""
    from fastlm.training import load_task_model

    task, model = load_task_model(path, device)
    if expect is not None and task.name != expect:
        raise ValueError(f"{path} is a checkpoint of task {task.name!r}, not {expect!r}")
    return task, model
