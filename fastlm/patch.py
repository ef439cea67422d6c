"""Swap fastlm into a model you already have, in place, and back: ``patch``, ``unpatch``, ``patched``.

What ``patch(model, norm=True, attention=True, rotary=True)`` swaps:

- **norm**: every ``nn.LayerNorm`` and ``nn.RMSNorm`` (those classes, or subclasses that keep their
  forward) becomes ``fastlm.nn.LayerNorm`` / ``fastlm.nn.RMSNorm``, and every Hugging Face
  Llama-style RMSNorm (a class named ``*RMSNorm`` with ``weight`` and ``variance_epsilon`` whose
  forward is Llama's: LlamaRMSNorm, MistralRMSNorm, Qwen2RMSNorm, ...) becomes ``HFRMSNorm``, a
  ``fastlm.nn.RMSNorm`` with HF's attribute names and output dtype. The new modules hold the *same*
  ``Parameter`` objects, so optimizers, ``state_dict`` keys, weight tying and ``load_state_dict``
  are unaffected. Modules with hooks, an instance-level forward (accelerate, PEFT) or
  parametrizations are left alone, and the report says so.
- **attention** and **rotary**, for Hugging Face transformers models: see ``fastlm/hf.py``
  (``attn_implementation="fastlm"``, and Llama-style ``apply_rotary_pos_emb`` routed to
  ``fastlm.ops.apply_rotary_pos_emb``). Plain PyTorch models have no attention module to swap: code
  that calls ``torch.nn.functional.scaled_dot_product_attention`` opts in with ``patch_sdpa()`` /
  ``unpatch_sdpa()`` or ``with patched_sdpa(): ...`` (process-wide, reversible, nestable).

``unpatch(model)`` restores the original module objects (the same Python objects), the model's
attention implementation and the original functions; patching twice is idempotent (the second call
replaces nothing and says so); ``with patched(model): ...`` undoes on exit exactly what it did.

Note: ``fastlm.patch`` is this function once ``fastlm`` is imported; reach the module's other names
with ``from fastlm.patch import HFRMSNorm``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import sys
import threading
import warnings
import weakref
from collections.abc import Callable

import torch
from torch import nn

from fastlm import nn as fnn
from fastlm import ops

__all__ = ["PatchReport", "patch", "unpatch", "patched", "patch_sdpa", "unpatch_sdpa", "patched_sdpa", "HFRMSNorm"]


@dataclasses.dataclass
class PatchReport:
    """What one ``patch`` (or ``unpatch``) call did.

    replaced: kind -> count newly swapped by this call ("layer_norm", "rms_norm", "attention"
        (attention layers now on fastlm), "rotary" (functions routed)); ``names`` lists them.
    left_alone: (what, why) for everything recognisable that was not swapped.
    model_type: the HF ``config.model_type``, or None for a plain PyTorch model.
    recognised: True for plain PyTorch models and for the HF model types in fastlm's tested table.
    calls: live counters of this model's HF calls, updated in eager mode (not inside torch.compile):
        "attention.fastlm" (handed to fastlm.ops.scaled_dot_product_attention), "attention.fallback.<why>"
        (run by transformers' sdpa instead: "mask", "dropout", ...), "rotary.fastlm".
    restored: for ``unpatch``: kind -> count put back.
    """

    model_type: str | None = None
    recognised: bool = True
    replaced: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    names: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(list))
    left_alone: list = dataclasses.field(default_factory=list)
    notes: list = dataclasses.field(default_factory=list)
    calls: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    restored: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def leave(self, what: str, why: str) -> None:
        self.left_alone.append((what, why))

    def __str__(self) -> str:
        kind = "plain PyTorch model" if self.model_type is None else f"model_type {self.model_type!r}"
        lines = [f"fastlm patch report: {kind}" + ("" if self.recognised else " (not in fastlm's tested table)")]
        if self.replaced:
            lines.append("  replaced: " + ", ".join(f"{k} {v}" for k, v in sorted(self.replaced.items())))
        if self.restored:
            lines.append("  restored: " + ", ".join(f"{k} {v}" for k, v in sorted(self.restored.items())))
        for what, why in self.left_alone:
            lines.append(f"  left alone: {what}: {why}")
        for n in self.notes:
            lines.append(f"  note: {n}")
        if self.calls:
            lines.append("  calls: " + ", ".join(f"{k} {v}" for k, v in sorted(self.calls.items())))
        return "\n".join(lines)


class _Record:
    """Everything patch() did to one model, undone in reverse order by unpatch()."""

    def __init__(self):
        self.undo: list[tuple[str, Callable[[], str | None]]] = []  # (kind, action -> problem or None)
        self.calls = collections.Counter()
        self.done: set = set()  # keys of global swaps already made for this model (attention, rotary)


_RECORDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class HFRMSNorm(fnn.RMSNorm):
    """fastlm.nn.RMSNorm standing in for a Hugging Face Llama-style RMSNorm: keeps the
    ``variance_epsilon`` attribute and HF's output dtype (the promotion of weight and input dtypes)."""

    @property
    def variance_epsilon(self):
        return self.eps

    @variance_epsilon.setter
    def variance_epsilon(self, value):
        self.eps = value

    def forward(self, input):
        w = self.weight
        if w is not None and w.dtype not in (input.dtype, torch.float32):
            w = w.to(input.dtype)
        y = ops.rms_norm(input, self.normalized_shape, w, self.eps, backend=self.backend)
        if self.weight is not None and self.weight.dtype != input.dtype:
            y = y.to(torch.promote_types(self.weight.dtype, input.dtype))
        return y


def _is_hf_model(m) -> bool:
    tf = sys.modules.get("transformers")
    return tf is not None and isinstance(m, tf.PreTrainedModel)


def _llama_rms_forward_code():
    """LlamaRMSNorm.forward's code, if transformers is already imported (an HF module exists only then)."""
    if "transformers" not in sys.modules:
        return None
    try:
        from transformers.models.llama.modeling_llama import LlamaRMSNorm
    except Exception:
        return None
    return LlamaRMSNorm.forward


def same_code(f, g) -> bool:
    """True if two functions have the same bytecode, names, constants (docstrings aside) and defaults:
    transformers copies shared functions verbatim across model files, so this recognises them."""
    f, g = getattr(f, "__func__", f), getattr(g, "__func__", g)
    cf, cg = getattr(f, "__code__", None), getattr(g, "__code__", None)
    if cf is None or cg is None:
        return False

    def consts(c):
        return tuple(x for x in c.co_consts if not isinstance(x, str) and not hasattr(x, "co_code"))

    return (
        cf.co_code == cg.co_code
        and cf.co_names == cg.co_names
        and cf.co_varnames == cg.co_varnames
        and consts(cf) == consts(cg)
        and f.__defaults__ == g.__defaults__
    )


def _why_not_swappable(m: nn.Module) -> str | None:
    if "forward" in m.__dict__:
        return "its forward is overridden on the instance (accelerate/PEFT-style hook)"
    if getattr(m, "parametrizations", None) is not None:
        return "it has parametrizations"
    hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    if any(getattr(m, h, None) for h in hooks):
        return "it has hooks registered on it"
    return None


def _share_params(new: nn.Module, old: nn.Module, names=("weight", "bias")) -> None:
    for n in names:
        if n in old._parameters or n in new._parameters:
            new._parameters[n] = old._parameters.get(n)


def _copy_extra_attrs(new: nn.Module, old: nn.Module) -> None:
    for k, v in old.__dict__.items():
        if k not in new.__dict__ and k not in ("variance_epsilon",):
            new.__dict__[k] = v
    new.train(old.training)


def _norm_replacement(m: nn.Module, llama_fwd) -> tuple[str | None, nn.Module | None, str | None]:
    """(kind, new module, None), or (kind, None, reason left alone), or (None, None, None): not a norm."""
    if isinstance(m, (fnn.LayerNorm, fnn.RMSNorm)):
        return None, None, None
    t = type(m)
    if isinstance(m, nn.LayerNorm):
        if t.forward is not nn.LayerNorm.forward:
            return "layer_norm", None, f"{t.__name__} subclasses nn.LayerNorm with its own forward"
        why = _why_not_swappable(m)
        if why:
            return "layer_norm", None, why
        new = fnn.LayerNorm(m.normalized_shape, m.eps, m.elementwise_affine, bias=m.bias is not None, device="meta")
        _share_params(new, m)
        return "layer_norm", new, None
    if hasattr(nn, "RMSNorm") and isinstance(m, nn.RMSNorm):
        if t.forward is not nn.RMSNorm.forward:
            return "rms_norm", None, f"{t.__name__} subclasses nn.RMSNorm with its own forward"
        why = _why_not_swappable(m)
        if why:
            return "rms_norm", None, why
        new = fnn.RMSNorm(m.normalized_shape, m.eps, m.elementwise_affine, device="meta")
        _share_params(new, m, ("weight",))
        return "rms_norm", new, None
    name = t.__name__
    if name.endswith("RMSNorm"):
        w = m._parameters.get("weight")
        eps = getattr(m, "variance_epsilon", None)
        if not isinstance(w, nn.Parameter) or w.dim() != 1 or not isinstance(eps, (int, float)) or set(m._parameters) != {"weight"}:
            return "rms_norm", None, f"{name} is not Llama-style (needs a 1-D weight, variance_epsilon, no other parameters)"
        if llama_fwd is None or not same_code(t.forward, llama_fwd):
            return "rms_norm", None, f"{name}.forward is not LlamaRMSNorm's (e.g. Gemma's 1 + weight): not recognised"
        why = _why_not_swappable(m)
        if why:
            return "rms_norm", None, why
        new = HFRMSNorm(w.shape[0], float(eps), True, device="meta")
        _share_params(new, m, ("weight",))
        return "rms_norm", new, None
    if name.endswith("LayerNorm") or name.endswith("Norm"):
        return "norm", None, f"{name} is not a norm fastlm recognises"
    return None, None, None


def _patch_norms(model: nn.Module, rec: _Record, report: PatchReport) -> None:
    llama_fwd = _llama_rms_forward_code()
    memo: dict[int, nn.Module] = {}
    seen_reasons: dict[int, bool] = {}
    already = 0
    if isinstance(model, (fnn.LayerNorm, fnn.RMSNorm)) or _norm_replacement(model, llama_fwd)[1] is not None:
        report.leave("norm (the model itself)", "the root module cannot be replaced in place; patch a model that contains it")
    for pname, parent in list(model.named_modules()):
        for cname, child in list(parent._modules.items()):
            if child is None:
                continue
            path = f"{pname}.{cname}" if pname else cname
            if isinstance(child, (fnn.LayerNorm, fnn.RMSNorm)):
                already += 1
                continue
            if id(child) in memo:
                new = memo[id(child)]
                kind = "rms_norm" if isinstance(new, fnn.RMSNorm) else "layer_norm"
            else:
                kind, new, why = _norm_replacement(child, llama_fwd)
                if new is None:
                    if why and id(child) not in seen_reasons:
                        seen_reasons[id(child)] = True
                        report.leave(f"{kind} {path} ({type(child).__name__})", why)
                    continue
                _copy_extra_attrs(new, child)
                memo[id(child)] = new
                report.replaced[kind] += 1
                report.names[kind].append(path)
            parent._modules[cname] = new
            rec.undo.append((kind, _restore_child(parent, cname, child, new, path)))
    if already and not report.replaced:
        report.notes.append(f"already patched: {already} fastlm norm modules found, nothing new replaced")


def _restore_child(parent: nn.Module, cname: str, old: nn.Module, new: nn.Module, path: str):
    # weak: the record must not keep the model alive (its entry in _RECORDS is keyed weakly by it)
    parent_ref, new_ref = weakref.ref(parent), weakref.ref(new)

    def undo():
        parent, new = parent_ref(), new_ref()
        if parent is None:
            return None
        if new is None or parent._modules.get(cname) is not new:
            return f"{path} was changed after patching; left as it is"
        for n, p in new._parameters.items():
            if n in old._parameters and old._parameters[n] is not p:
                old._parameters[n] = p  # keep parameters the user replaced while patched
        old.train(new.training)
        parent._modules[cname] = old
        return None

    return undo


def _model_type(model) -> str | None:
    tf = sys.modules.get("transformers")
    if tf is None:
        return None
    for m in model.modules():
        if isinstance(m, tf.PreTrainedModel):
            return getattr(m.config, "model_type", None) or type(m).__name__
    return None


def patch(model: nn.Module, *, norm: bool = True, attention: bool = True, rotary: bool = True) -> PatchReport:
    """Patch ``model`` in place with fastlm modules and kernels; returns what was done and left alone.

    Idempotent: a second call replaces nothing already replaced (and swaps kinds not asked for before).
    Undo with ``unpatch(model)``, or use ``with patched(model): ...``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastlm.patch: model must be a torch.nn.Module, got {type(model).__name__}")
    rec = _RECORDS.get(model)
    if rec is None:
        rec = _Record()
        _RECORDS[model] = rec
    report = PatchReport(calls=rec.calls)
    mtype = _model_type(model)
    report.model_type = mtype
    if norm:
        _patch_norms(model, rec, report)
    if mtype is not None:
        from fastlm import hf

        hf.patch_model(model, rec, report, attention=attention, rotary=rotary)
    else:
        if attention:
            mha = [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
            for n in mha:
                report.leave(f"attention {n} (nn.MultiheadAttention)", "not rewritten; called with need_weights=False it uses F.scaled_dot_product_attention, which fastlm.patched_sdpa() routes")
            report.leave(
                "attention",
                "plain PyTorch model: no attention module to swap; code calling torch.nn.functional."
                "scaled_dot_product_attention opts in with fastlm.patch_sdpa() / `with fastlm.patched_sdpa():`",
            )
        if rotary:
            report.leave("rotary", "plain PyTorch model: call fastlm.ops.apply_rotary_pos_emb where the model applies rotary")
    return report


def _unpatch(model: nn.Module, keep: int = 0) -> PatchReport:
    rec = _RECORDS.get(model)
    report = PatchReport(model_type=_model_type(model))
    if rec is None:
        report.notes.append("model was not patched: nothing to undo")
        return report
    while len(rec.undo) > keep:
        kind, action = rec.undo.pop()
        problem = action()
        if problem:
            report.leave(kind, problem)
            warnings.warn(f"fastlm.unpatch: {problem}", stacklevel=3)
        else:
            report.restored[kind] += 1
    if not rec.undo:
        rec.done.clear()
        _RECORDS.pop(model, None)
    return report


def unpatch(model: nn.Module) -> PatchReport:
    """Undo every ``patch`` of ``model``: the original module objects, attention implementation and
    functions come back (``report.restored`` counts them; problems are warned and listed)."""
    return _unpatch(model, 0)


@contextlib.contextmanager
def patched(model: nn.Module, **kwargs):
    """``with fastlm.patched(model) as report: ...`` patches on entry and undoes exactly that on exit
    (a model already patched before stays as it was)."""
    rec = _RECORDS.get(model)
    keep = len(rec.undo) if rec is not None else 0
    report = patch(model, **kwargs)
    try:
        yield report
    finally:
        _unpatch(model, keep)


# --- torch.nn.functional.scaled_dot_product_attention switch -------------------------------------

_sdpa_lock = threading.RLock()
_sdpa_state = {"depth": 0, "original": None}
_sdpa_busy = threading.local()


def _fastlm_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """torch.nn.functional.scaled_dot_product_attention, routed to fastlm.ops.scaled_dot_product_attention
    (whose own torch fallback, if it calls F.scaled_dot_product_attention, reaches torch's)."""
    original = _sdpa_state["original"]
    if getattr(_sdpa_busy, "on", False) or original is None:
        return (original or torch._C._nn.scaled_dot_product_attention)(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa
        )
    _sdpa_busy.on = True
    try:
        return ops.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa
        )
    finally:
        _sdpa_busy.on = False


def patch_sdpa() -> None:
    """Route ``torch.nn.functional.scaled_dot_product_attention`` to fastlm, process-wide, for code
    that looks it up at call time (``F.scaled_dot_product_attention(...)``, HF's sdpa, nn.MultiheadAttention's
    unfused path); a name imported before (``from torch.nn.functional import ...``) is not affected.
    Nestable: each call needs one ``unpatch_sdpa()``."""
    if not hasattr(ops, "scaled_dot_product_attention"):
        raise RuntimeError("fastlm.patch_sdpa: fastlm.ops.scaled_dot_product_attention is not available in this build")
    import torch.nn.functional as F

    with _sdpa_lock:
        if _sdpa_state["depth"] == 0:
            _sdpa_state["original"] = F.scaled_dot_product_attention
            F.scaled_dot_product_attention = _fastlm_sdpa
        _sdpa_state["depth"] += 1


def unpatch_sdpa() -> None:
    """Undo one ``patch_sdpa()``; the last one puts torch's function back (the same object)."""
    import torch.nn.functional as F

    with _sdpa_lock:
        if _sdpa_state["depth"] == 0:
            return
        _sdpa_state["depth"] -= 1
        if _sdpa_state["depth"] == 0:
            if F.scaled_dot_product_attention is _fastlm_sdpa:
                F.scaled_dot_product_attention = _sdpa_state["original"]
            else:
                warnings.warn("fastlm.unpatch_sdpa: F.scaled_dot_product_attention was replaced by someone else; left as it is", stacklevel=2)
            _sdpa_state["original"] = None


@contextlib.contextmanager
def patched_sdpa():
    """``with fastlm.patched_sdpa(): ...`` routes F.scaled_dot_product_attention to fastlm inside the block."""
    patch_sdpa()
    try:
        yield
    finally:
        unpatch_sdpa()
