"""Hugging Face transformers integration: ``attn_implementation="fastlm"``, rotary routing, sampling.

Importing this module registers "fastlm" with transformers' ``AttentionInterface`` (and, for masks,
``AttentionMaskInterface``, with the same masks as "sdpa"), so both work:

    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="fastlm")   # after `import fastlm.hf`
    fastlm.patch(model)          # norms + attention + rotary, reversible with fastlm.unpatch(model)

The attention function hands the call to ``fastlm.ops.scaled_dot_product_attention`` (GQA through
``enable_gqa``; that op itself uses torch for what its kernels do not serve, e.g. float64) whenever
transformers passes no mask, which it does for causal or bidirectional
attention without padding (and for one-token decode steps). A padding mask (right-, left- or
both-sided padding of decoders, with a dynamic cache; BERT's key-padding mask) runs on
``fastlm.ops.attention_varlen``: the real tokens are unpacked into the packed layout, attended and
padded back (counter ``attention.fastlm.varlen``; padded query rows get zeros). Any other mask
(holes, sliding windows that bite, packed sequences, a static cache's layout, float masks), a mask
under torch.compile, or arguments it does not take (position_bias, attention sinks, paged caches)
fall back to transformers' own "sdpa" function, visibly: a one-time
``FastlmFallbackWarning`` and the counters ``report.calls["attention.fallback.<why>"]`` /
``fastlm.hf.calls``. Logit soft-capping (Gemma 2's ``softcap``) and attention dropout in training
(``dropout`` > 0, i.e. module.training with attention_dropout > 0) run on the kernels' options:
fastlm's dropout mask is its own Philox stream seeded by one draw from torch's default generator
per call (reproducible under torch.manual_seed, not torch's stream: the same distribution, other
dropped entries than the unpatched model's). Inputs the kernels do not take (float64, odd head
dims) with one of these options fall back as "dropout" / "unsupported_softcap".

``fastlm.patch`` switches a model only if it currently uses "sdpa" (the masks are the same, so the
fallback is exact), and routes a model file's ``apply_rotary_pos_emb`` to
``fastlm.ops.apply_rotary_pos_emb`` when its code is Llama's or GPT-NeoX's partial-rotary form
(recognised by bytecode, so any model file that copies one of them verbatim is covered). The function is swapped in the model file's
namespace for a gate that sends only the patched model's attention layers to fastlm (other models
of the family keep the original; the gate is process-wide, so an unpatched model of the same family
running in another thread at the same moment may take fastlm's rotary too: the same math); the last
``unpatch`` of a family puts the original object back, as does dropping a patched model.
"""

from __future__ import annotations

import collections
import itertools
import sys
import warnings
import weakref

import torch
from transformers import AttentionInterface, AttentionMaskInterface, LogitsProcessor

from fastlm import ops
from fastlm.ops.attention import _sdpa_kernel_ok
from fastlm.patch import PatchReport, same_code

NAME = "fastlm"

# model types whose patching is tested (tests/test_patch_hf.py); others are patched for what is recognised
TESTED_MODEL_TYPES = {
    "gpt2": "GPT-2: LayerNorm, causal attention (learned positions: no rotary)",
    "llama": "Llama: RMSNorm, causal GQA attention, rotary",
    "mistral": "Mistral: RMSNorm, causal GQA attention (sliding window via the mask), rotary",
    "qwen2": "Qwen2: RMSNorm, causal GQA attention, rotary",
    "bert": "BERT: LayerNorm, bidirectional attention (padding mask: attention_varlen)",
}

calls: collections.Counter = collections.Counter()  # process-wide counters, every model
_model_calls: dict[int, collections.Counter] = {}  # id(config) -> the patched model's report.calls
_warned: set = set()
_ATTN = AttentionInterface()


class FastlmFallbackWarning(UserWarning):
    """A call that fastlm's HF attention handed to transformers' sdpa (said once per reason)."""


def _count(module, key: str) -> None:
    if torch.compiler.is_compiling():
        return
    calls[key] += 1
    c = _model_calls.get(id(getattr(module, "config", None)))
    if c is not None:
        c[key] += 1


def _fallback(reason: str, module, query, key, value, attention_mask, **kwargs):
    _count(module, f"attention.fallback.{reason}")
    if reason not in _warned and not torch.compiler.is_compiling():
        _warned.add(reason)
        warnings.warn(
            f"fastlm attention: {reason}; this call (and later ones like it) runs transformers' sdpa "
            "instead (counted in PatchReport.calls / fastlm.hf.calls)",
            FastlmFallbackWarning,
            stacklevel=3,
        )
    return _ATTN["sdpa"](module, query, key, value, attention_mask, **kwargs)


def _padding_layout(mask, q_len: int, k_len: int, causal: bool):
    """The packed layout of a padding mask, or None when the mask is anything else.

    A padding mask: boolean, (B, 1, Sq, Sk) or (B, Sk), whose valid keys in row b are one run
    [s_b, s_b + n_b) of key positions (right, left or both-sided padding), and whose every query row
    allows exactly those keys (causal: those at or before the query's position), as transformers'
    masks do. Bidirectional: every query row is computed (queries and keys may be different
    sequences, as in cross-attention). Causal: query i sits at key position Sk - Sq + i
    (transformers' dynamic cache) and is computed iff that position is in the run; since a static
    cache's unused slots look like right padding, with Sq != Sk every non-empty run must end at Sk.
    Returns (idx_q, idx_k, cu_seqlens_q, cu_seqlens_k, max_q, max_k): the computed rows' indices
    into the flattened (B * Sq) and (B * Sk) positions, and int32 prefix sums. One host read.
    """
    if mask.dtype != torch.bool or mask.shape[-1] != k_len or (causal and q_len > k_len):
        return None
    if mask.dim() == 2:
        m = mask[:, None, :]
    elif mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] in (1, q_len):
        m = mask[:, 0]
    else:
        return None
    b = m.shape[0]
    m = m.expand(b, q_len, k_len)
    valid = m[:, -1]
    n = valid.sum(1)
    start = torch.where(n > 0, valid.int().argmax(1), 0)
    j = torch.arange(k_len, device=mask.device)
    run = (j >= start[:, None]) & (j < (start + n)[:, None])
    want = run[:, None, :].expand(b, q_len, k_len)
    ok = (run == valid).all()
    if causal:
        pos = j[k_len - q_len:]
        q_real = (pos >= start[:, None]) & (pos < (start + n)[:, None])
        want = want & (j[None, :] <= pos[:, None])
        if q_len != k_len:
            ok = ok & ((start + n == k_len) | (n == 0)).all()
    else:
        q_real = torch.ones(b, q_len, dtype=torch.bool, device=mask.device)
    ok = ok & (m == want).all()
    nq = q_real.sum(1)
    qstart = torch.where(nq > 0, q_real.int().argmax(1), 0)
    host = torch.cat([ok.long().view(1), start, n, qstart, nq]).tolist()
    if not host[0]:
        return None
    start, n, qstart, nq = (host[1 + i * b:1 + (i + 1) * b] for i in range(4))
    dev = mask.device
    return (_run_rows(qstart, nq, q_len).to(dev), _run_rows(start, n, k_len).to(dev), _cu_seqlens(nq, dev),
            _cu_seqlens(n, dev), max(nq, default=0), max(n, default=0))


def _run_rows(first, count, stride):
    """The flat indices r * stride + first[r] + t, t < count[r], row after row (int64, CPU)."""
    return torch.cat([torch.empty(0, dtype=torch.long)]
                     + [torch.arange(r * stride + f, r * stride + f + c) for r, (f, c) in enumerate(zip(first, count, strict=True))])


def _cu_seqlens(lengths, device):
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)


def _cached_padding_layout(mask, q_len: int, k_len: int, causal: bool):
    """_padding_layout, computed once per mask tensor: transformers builds one mask per forward and
    hands the same tensor to every layer, so the cache (an attribute of the mask tensor, keyed by its
    version counter, none for inference tensors, and the shapes) costs one host read per forward,
    not one per layer."""
    key = (None if mask.is_inference() else mask._version, q_len, k_len, causal)
    cache = getattr(mask, "_fastlm_padding_layout", None)
    if cache is None or cache[0] != key:
        cache = (key, _padding_layout(mask, q_len, k_len, causal))
        mask._fastlm_padding_layout = cache
    return cache[1]


def _varlen_forward(query, key, value, layout, causal: bool, scaling, options):
    """Unpad (B, H, S, D) q, k, v into the packed rows of ``layout``, attention_varlen (with the
    options softcap / dropout_p), pad back (zeros at padded query rows): (B, Sq, Hq, D)."""
    idx_q, idx_k, cu_q, cu_k, max_q, max_k = layout
    b, hq, sq, d = query.shape
    q, k, v = (t.transpose(1, 2).reshape(b * t.shape[2], t.shape[1], d) for t in (query, key, value))
    out = ops.attention_varlen(q.index_select(0, idx_q), k.index_select(0, idx_k), v.index_select(0, idx_k),
                               cu_q, cu_k, max_q, max_k, causal=causal, scale=scaling, **options)
    full = out.new_zeros(b * sq, hq, d).index_copy(0, idx_q, out)
    return full.view(b, sq, hq, d)


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' attention-function signature: (B, H, S, D) inputs, returns ((B, S, H, D), None).

    No mask: fastlm.ops.scaled_dot_product_attention. A padding mask (see _padding_layout):
    fastlm.ops.attention_varlen on the real tokens (causal for causal modules), zeros at padded
    query rows. ``softcap`` and ``dropout`` (training) go to the kernels as their options (both
    paths). Any other mask, and every other case it does not take: transformers' sdpa, counted."""
    kw = dict(kwargs, dropout=dropout, scaling=scaling, is_causal=is_causal)
    for arg in ("position_bias", "s_aux", "sinks", "cache"):
        if kwargs.get(arg) is not None:
            return _fallback(f"unsupported_{arg}", module, query, key, value, attention_mask, **kw)
    softcap = kwargs.get("softcap") or 0.0
    options = dict(softcap=softcap) if softcap else {}
    if dropout:
        options["dropout_p"] = float(dropout)
    if options and not _sdpa_kernel_ok(query, key, value, None, 0.0, True):
        return _fallback("dropout" if dropout else "unsupported_softcap", module, query, key, value, attention_mask, **kw)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if attention_mask is not None:
        if (not hasattr(ops, "attention_varlen") or torch.compiler.is_compiling()
                or not _sdpa_kernel_ok(query, key, value, None, 0.0, True)):
            return _fallback("mask", module, query, key, value, attention_mask, **kw)
        layout = _cached_padding_layout(attention_mask, query.shape[2], key.shape[2], bool(causal))
        if layout is None:
            return _fallback("mask", module, query, key, value, attention_mask, **kw)
        out = _varlen_forward(query, key, value, layout, bool(causal), scaling, options)
        _count(module, "attention.fastlm.varlen")
        return out, None
    if not hasattr(ops, "scaled_dot_product_attention"):
        return _fallback("op_not_available", module, query, key, value, attention_mask, **kw)
    q_len = query.shape[2]
    # as transformers' sdpa: one query token attends to every key; is_causal is top-left aligned
    causal = q_len > 1 and causal
    if causal and key.shape[2] > q_len:  # prefill into an empty static cache: the extra keys are unused slots
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    if softcap:  # Sq == Sk whenever causal here, so attention's bottom-right diagonal is sdpa's top-left one
        if causal and key.shape[2] != q_len:
            return _fallback("unsupported_softcap", module, query, key, value, attention_mask, **kw)
        out = ops.attention(query, key, value, causal=bool(causal), scale=scaling, **options)
    else:
        out = ops.scaled_dot_product_attention(
            query, key, value, dropout_p=options.get("dropout_p", 0.0), is_causal=bool(causal), scale=scaling,
            enable_gqa=key.shape[1] != query.shape[1],
        )
    _count(module, "attention.fastlm")
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register "fastlm" with transformers (done on import; idempotent)."""
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, AttentionMaskInterface()["sdpa"])


register()


# --- rotary -------------------------------------------------------------------------------------
# A model file's apply_rotary_pos_emb is a module global, looked up at call time by its attention
# classes. fastlm.patch swaps it for a gate: while an attention layer of a patched model runs (a
# forward pre-hook opens the gate, a forward hook that runs even on error closes it), calls go to
# fastlm.ops.apply_rotary_pos_emb; every other caller (an unpatched model of the same family) gets
# the original function. The last unpatch of a family puts the original function object back.


class _Gate:
    depth = 0
    calls = None


_gate = _Gate()


def _make_rotary(original):
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if _gate.depth <= 0:
            return original(q, k, cos, sin, unsqueeze_dim)
        if not torch.compiler.is_compiling():
            calls["rotary.fastlm"] += 1
            if _gate.calls is not None:
                _gate.calls["rotary.fastlm"] += 1
        return ops.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)

    apply_rotary_pos_emb.__doc__ = "fastlm.ops.apply_rotary_pos_emb for patched models, else the original."
    apply_rotary_pos_emb._fastlm_original = original
    return apply_rotary_pos_emb


class _RotaryHold:
    def __init__(self, original, wrapper):
        self.original, self.wrapper = original, wrapper
        self.holders: set[int] = set()


_rotary_holds: dict[str, _RotaryHold] = {}


def _known_rotary():
    """(apply_rotary_pos_emb forms fastlm.ops.apply_rotary_pos_emb computes exactly, Llama's rotate_half):
    Llama's, and GPT-NeoX's partial-rotary form (the first cos.shape[-1] dims rotated, the rest passed)."""
    from transformers.models.llama import modeling_llama as ml

    forms = [ml.apply_rotary_pos_emb]
    try:
        from transformers.models.gpt_neox import modeling_gpt_neox as nx

        forms.append(nx.apply_rotary_pos_emb)
    except Exception:
        pass
    return forms, ml.rotate_half


def _is_known_rotary(ns, forms, rotate_half) -> bool:
    fn = getattr(ns, "apply_rotary_pos_emb", None)
    return any(same_code(fn, f) for f in forms) and same_code(getattr(ns, "rotate_half", None), rotate_half)


def _calls_rotary(cls) -> bool:
    f = getattr(cls, "forward", None)
    while f is not None:
        code = getattr(f, "__code__", None)
        if code is not None and "apply_rotary_pos_emb" in code.co_names:
            return True
        f = getattr(f, "__wrapped__", None)
    return False


def _open_gate(calls_counter):
    def pre(module, args):
        _gate.depth += 1
        _gate.calls = calls_counter

    def post(module, args, output):
        _gate.depth -= 1
        return None

    return pre, post


def _drop_rotary_holder(ns, holder: int) -> str | None:
    """Release one model's hold on a namespace; the last one puts the original function back."""
    hold = _rotary_holds.get(ns.__name__)
    if hold is None:
        return None
    hold.holders.discard(holder)
    if hold.holders:
        return None
    del _rotary_holds[ns.__name__]
    if ns.apply_rotary_pos_emb is not hold.wrapper:
        return f"{ns.__name__}.apply_rotary_pos_emb was changed by someone else while patched; left as it is"
    ns.apply_rotary_pos_emb = hold.original
    return None


def _release_rotary(ns, rec, handles, finalizer):
    def undo():
        finalizer.detach()
        for h in handles:
            h.remove()
        rec.done.discard(("rotary", ns.__name__))
        return _drop_rotary_holder(ns, id(rec))

    return undo


def _patch_rotary(model, rec, report: PatchReport) -> None:
    forms, rotate_half = _known_rotary()
    namespaces: dict[str, list] = {}
    for name, m in model.named_modules():
        mod = sys.modules.get(type(m).__module__)
        if mod is not None and mod.__name__.startswith("transformers.") and hasattr(mod, "apply_rotary_pos_emb"):
            namespaces.setdefault(mod.__name__, [mod, []])
            if _calls_rotary(type(m)):
                namespaces[mod.__name__][1].append((name, m))
    if not namespaces:
        report.leave("rotary", "no apply_rotary_pos_emb in the model's files (e.g. learned or no positions)")
        return
    for name, (ns, callers) in sorted(namespaces.items()):
        qual = f"{name}.apply_rotary_pos_emb"
        if ("rotary", name) in rec.done:
            continue
        hold = _rotary_holds.get(name)
        if hold is None:
            fn = ns.apply_rotary_pos_emb
            if not _is_known_rotary(ns, forms, rotate_half):
                report.leave(f"rotary {qual}", "its code is neither Llama's nor GPT-NeoX's partial form (e.g. interleaved or multimodal rotary): not routed")
                continue
            if not hasattr(ops, "apply_rotary_pos_emb"):
                report.leave(f"rotary {qual}", "fastlm.ops.apply_rotary_pos_emb is not available in this build")
                continue
            if not callers:
                report.leave(f"rotary {qual}", "no module of the model calls it directly: not routed")
                continue
            hold = _rotary_holds[name] = _RotaryHold(fn, _make_rotary(fn))
            ns.apply_rotary_pos_emb = hold.wrapper
        elif ns.apply_rotary_pos_emb is not hold.wrapper:
            report.leave(f"rotary {qual}", "replaced by someone else since fastlm routed it; left as it is")
            continue
        hold.holders.add(id(rec))
        handles = []
        pre, post = _open_gate(rec.calls)
        for path, m in callers:
            handles.append(m.register_forward_pre_hook(pre))
            handles.append(m.register_forward_hook(post, always_call=True))
            report.names["rotary"].append(path)
        rec.done.add(("rotary", name))
        finalizer = weakref.finalize(model, _drop_rotary_holder, ns, id(rec))  # a patched model dropped without unpatch
        rec.undo.append(("rotary", _release_rotary(ns, rec, handles, finalizer)))
        report.replaced["rotary"] += len(callers)
        report.notes.append(f"rotary: {qual} routed to fastlm.ops.apply_rotary_pos_emb for this model's {len(callers)} attention layers")


# --- attention ----------------------------------------------------------------------------------

def _outermost_pretrained(model):
    from transformers import PreTrainedModel

    found, inner = [], set()
    for m in model.modules():
        if isinstance(m, PreTrainedModel) and id(m) not in inner:
            found.append(m)
            inner.update(id(x) for x in m.modules())
    return found


def _restore_attention(pm, original: str, rec, finalizer):
    pm_ref, cfg_id = weakref.ref(pm), id(pm.config)

    def undo():
        finalizer.detach()
        _model_calls.pop(cfg_id, None)
        rec.done.discard(("attention", cfg_id))
        pm = pm_ref()
        if pm is None:
            return None
        if pm.config._attn_implementation != NAME:
            return f"{type(pm).__name__}: attention implementation changed to {pm.config._attn_implementation!r} while patched; left as it is"
        pm.set_attn_implementation(original)
        if pm.config._attn_implementation != original:
            return f"{type(pm).__name__}: could not restore attn_implementation={original!r}"
        return None

    return undo


def _patch_attention(model, rec, report: PatchReport) -> None:
    for pm in _outermost_pretrained(model):
        cfg = pm.config
        key = ("attention", id(cfg))
        if key in rec.done:
            continue
        current = cfg._attn_implementation
        label = type(pm).__name__
        if current == NAME:
            report.leave(f"attention {label}", 'already attn_implementation="fastlm" (set outside fastlm.patch); unpatch will not change it')
            continue
        if current != "sdpa":
            report.leave(f"attention {label}", f'uses attn_implementation={current!r}; fastlm replaces "sdpa" only (same masks, exact fallback)')
            continue
        if not hasattr(ops, "scaled_dot_product_attention"):
            report.leave(f"attention {label}", "fastlm.ops.scaled_dot_product_attention is not available in this build")
            continue
        pm.set_attn_implementation(NAME)
        if cfg._attn_implementation != NAME:
            report.leave(f"attention {label}", "transformers did not accept a new attention implementation for this model (no AttentionInterface)")
            continue
        rec.done.add(key)
        _model_calls[id(cfg)] = rec.calls
        finalizer = weakref.finalize(pm, _model_calls.pop, id(cfg), None)
        rec.undo.append(("attention", _restore_attention(pm, current, rec, finalizer)))
        n = 0
        configs = {id(c) for c in [cfg, *(getattr(cfg, k, None) for k in getattr(cfg, "sub_configs", {}) or {})] if c is not None}
        for name, m in pm.named_modules():
            if "Attention" in type(m).__name__ and hasattr(m, "is_causal") and id(getattr(m, "config", None)) in configs:
                n += 1
                report.names["attention"].append(name)
        report.replaced["attention"] += n
        report.notes.append(f'{label}: attn_implementation "sdpa" -> "fastlm" ({n} attention layers)')


def patch_model(model, rec, report: PatchReport, *, attention: bool, rotary: bool) -> None:
    """The Hugging Face part of fastlm.patch (norms are done by fastlm.patch itself)."""
    mtype = report.model_type
    report.recognised = mtype in TESTED_MODEL_TYPES
    if not report.recognised:
        report.notes.append(f"model type {mtype!r} is not in fastlm's tested table; patched what was recognised")
    if attention:
        _patch_attention(model, rec, report)
    if rotary:
        _patch_rotary(model, rec, report)


# --- sampling -----------------------------------------------------------------------------------

class SamplingProcessor(LogitsProcessor):
    """A transformers LogitsProcessor that applies fastlm.ops.top_k_top_p_filter to the scores:
    entries outside the top-k / top-p / min-p support become -inf."""

    def __init__(self, top_k=None, top_p=None, min_p=None):
        if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
            raise ValueError(f"fastlm.hf.sampling_processor: top_k must be None or an int >= 1, got {top_k!r}")
        if top_p is not None and not (0.0 < float(top_p) <= 1.0):
            raise ValueError(f"fastlm.hf.sampling_processor: top_p must be None or in (0, 1], got {top_p!r}")
        if min_p is not None and not (0.0 <= float(min_p) <= 1.0):
            raise ValueError(f"fastlm.hf.sampling_processor: min_p must be None or in [0, 1], got {min_p!r}")
        self.top_k, self.top_p, self.min_p = top_k, top_p, min_p

    def __call__(self, input_ids, scores):
        if not torch.compiler.is_compiling():
            calls["sampling.fastlm"] += 1
        return ops.top_k_top_p_filter(scores, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p)

    def __repr__(self):
        return f"fastlm.hf.SamplingProcessor(top_k={self.top_k}, top_p={self.top_p}, min_p={self.min_p})"


def sampling_processor(top_k=None, top_p=None, min_p=None) -> SamplingProcessor:
    """A LogitsProcessor for ``model.generate(..., do_sample=True, logits_processor=[...])`` that filters
    with fastlm.ops.top_k_top_p_filter. Leave generate's own top_k/top_p/min_p unset so they do not
    filter a second time."""
    if not hasattr(ops, "top_k_top_p_filter"):
        raise RuntimeError("fastlm.hf.sampling_processor: fastlm.ops.top_k_top_p_filter is not available in this build")
    return SamplingProcessor(top_k, top_p, min_p)
