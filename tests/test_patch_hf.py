"""fastlm.patch on Hugging Face transformers models built from tiny random configs (no network).

Each family is checked the same way: the patched float32 model against the unpatched one, with the
unpatched model in float64 as the truth and the unpatched float32 model as the baseline (the
tolerance rule in fastlm.testing), for outputs and every parameter gradient; the Triton launchers
are counted, so a pass proves the kernels computed the patched model. Works with the transformers
of the CPU machines (5.23) and of the GPU machine (5.17): only AttentionInterface /
AttentionMaskInterface, set_attn_implementation and the config classes are used.
"""

import collections
import copy
import warnings

import pytest
import torch
from conftest import DEVICE

import fastlm
from fastlm.patch import HFRMSNorm
from fastlm.testing import FACTOR, GRAD_FACTOR_ATTENTION, assert_close

tf = pytest.importorskip("transformers")
import fastlm.hf  # noqa: E402  (registers attn_implementation="fastlm")

HAS_SDPA_OP = hasattr(fastlm.ops, "scaled_dot_product_attention")
HAS_FILTER_OP = hasattr(fastlm.ops, "top_k_top_p_filter")
needs_sdpa_op = pytest.mark.xfail(not HAS_SDPA_OP, reason="op not landed yet: fastlm.ops.scaled_dot_product_attention", strict=False)
needs_filter_op = pytest.mark.xfail(not HAS_FILTER_OP, reason="op not landed yet: fastlm.ops.top_k_top_p_filter", strict=False)

V = 101
LLAMA_LIKE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=V, max_position_embeddings=64, initializer_range=0.1)


def build(family, layers=2, **over):
    """A tiny random model of a family, in float32 on DEVICE, attention "sdpa" (transformers' default)."""
    if family in ("llama", "mistral", "qwen2"):
        cfg_cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config}[family]
        cfg = cfg_cls(**{**LLAMA_LIKE, "num_hidden_layers": layers, **over})
        cls = {"llama": tf.LlamaForCausalLM, "mistral": tf.MistralForCausalLM, "qwen2": tf.Qwen2ForCausalLM}[family]
    elif family == "gpt2":
        cfg = tf.GPT2Config(**{**dict(n_embd=64, n_layer=layers, n_head=4, vocab_size=V, n_positions=64, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.1), **over})
        cls = tf.GPT2LMHeadModel
    elif family == "bert":
        cfg = tf.BertConfig(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=96,
                            vocab_size=V, max_position_embeddings=64, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0, initializer_range=0.1, **over)
        cls = tf.BertModel
    elif family == "gpt_neox":
        cfg = tf.GPTNeoXConfig(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=96,
                               vocab_size=V, max_position_embeddings=64, hidden_dropout=0.0, attention_dropout=0.0,
                               initializer_range=0.1, **over)
        cls = tf.GPTNeoXForCausalLM
    else:
        raise ValueError(family)
    model = cls(cfg).to(DEVICE)
    assert model.config._attn_implementation == "sdpa"
    return model


def _out(model, ids, **kw):
    o = model(ids, **kw)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


def fwd_bwd(model, ids, dy_seed=1, **kw):
    model.zero_grad(set_to_none=True)
    y = _out(model, ids, **kw)
    g = torch.Generator(device="cpu").manual_seed(dy_seed)
    y.backward(torch.randn(y.shape, generator=g, dtype=torch.float64).to(device=y.device, dtype=y.dtype))
    return y.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def references(model, ids, **kw):
    """(truth, baseline): the unpatched model in float64 and in float32, outputs and gradients."""
    truth = fwd_bwd(copy.deepcopy(model).double(), ids, **kw)
    base = fwd_bwd(copy.deepcopy(model), ids, **kw)
    return truth, base


def check(patched, truth, base, grad_factor=FACTOR):
    assert_close(patched[0], truth[0], base[0], name="output")
    assert set(patched[1]) == set(truth[1])
    for n in truth[1]:
        assert_close(patched[1][n], truth[1][n], base[1][n], name=f"grad {n}", factor=grad_factor)


@pytest.fixture
def launches(monkeypatch):
    """Counts calls of the Triton launchers (the kernels, not the reference)."""
    counts = collections.Counter()

    def wrap(mod, name):
        if hasattr(mod, name):
            f = getattr(mod, name)
            monkeypatch.setattr(mod, name, lambda *a, **k: (counts.update([name]), f(*a, **k))[1])

    from fastlm.triton import layer_norm as tln
    from fastlm.triton import rotary as trot

    for n in ("layer_norm_fwd", "layer_norm_bwd"):
        wrap(tln, n)
    for n in ("rotary_table_fwd", "rotary_table_bwd"):
        wrap(trot, n)
    if HAS_SDPA_OP:
        from fastlm.triton import attention as tat

        for n in ("attention_fwd", "attention_bwd", "attention_varlen_fwd", "attention_varlen_bwd"):
            wrap(tat, n)
    return counts


NORMS = {"gpt2": ("layer_norm", 5), "bert": ("layer_norm", 5), "llama": ("rms_norm", 5), "mistral": ("rms_norm", 5), "qwen2": ("rms_norm", 5)}
ROTARY = {"llama", "mistral", "qwen2"}


@pytest.mark.parametrize("family", ["gpt2", "llama", "mistral", "qwen2", "bert"])
def test_patched_family_matches_unpatched_and_runs_fastlm(family, launches):
    torch.manual_seed(0)
    model = build(family)
    ids = torch.randint(0, V, (2, 12), device=DEVICE)
    truth, base = references(model, ids)
    report = fastlm.patch(model)
    assert report.model_type == family and report.recognised
    kind, n_norms = NORMS[family]
    assert report.replaced[kind] == n_norms
    assert report.replaced["rotary"] == (2 if family in ROTARY else 0)
    if family not in ROTARY:
        assert any(what == "rotary" for what, _ in report.left_alone)
    if HAS_SDPA_OP:
        assert report.replaced["attention"] == 2 and model.config._attn_implementation == "fastlm"
    else:
        assert any("scaled_dot_product_attention is not available" in why for _, why in report.left_alone)
    with fastlm.use_backend("triton"):
        out = fwd_bwd(model, ids)
    assert launches["layer_norm_fwd"] == n_norms and launches["layer_norm_bwd"] == n_norms
    if family in ROTARY:
        assert launches["rotary_table_fwd"] == 2 and launches["rotary_table_bwd"] == 2
        assert report.calls["rotary.fastlm"] == 2
    if HAS_SDPA_OP:
        assert report.calls["attention.fastlm"] == 2
        assert launches["attention_fwd"] >= 2 and launches["attention_bwd"] >= 2
    check(out, truth, base, GRAD_FACTOR_ATTENTION if report.replaced["attention"] else FACTOR)
    fastlm.unpatch(model)
    assert model.config._attn_implementation == "sdpa"


@needs_sdpa_op
@pytest.mark.parametrize("family", ["llama", "bert"])
def test_attention_runs_on_fastlm_kernels(family, launches):
    """GQA causal (Llama) and bidirectional (BERT, no padding): every layer on fastlm, none fell back."""
    torch.manual_seed(0)
    model = build(family)
    ids = torch.randint(0, V, (2, 9), device=DEVICE)
    truth, base = references(model, ids)
    report = fastlm.patch(model, norm=False, rotary=False)
    assert report.replaced == {"attention": 2}
    with fastlm.use_backend("triton"):
        out = fwd_bwd(model, ids)
    assert dict(report.calls) == {"attention.fastlm": 2}
    assert launches["attention_fwd"] >= 2 and launches["attention_bwd"] >= 2
    check(out, truth, base, GRAD_FACTOR_ATTENTION)
    fastlm.unpatch(model)


@needs_sdpa_op
@pytest.mark.parametrize("family,why", [("bert", "holes"), ("gpt2", "holes"), ("mistral", "sliding window")])
def test_masks_fall_back_to_sdpa_visibly(family, why):
    """Masks that are not padding (valid keys that are not one run per row, a window that bites)."""
    torch.manual_seed(0)
    model = build(family, **({"sliding_window": 4} if family == "mistral" else {}))
    ids = torch.randint(0, V, (2, 10), device=DEVICE)
    kw = {}
    if why == "holes":
        mask = torch.ones(2, 10, dtype=torch.long, device=DEVICE)
        mask[1, 3:5] = 0  # a hole inside the second row: not padding
        kw = {"attention_mask": mask}
    truth, base = references(model, ids, **kw)
    report = fastlm.patch(model)
    fastlm.hf._warned.discard("mask")
    with fastlm.use_backend("triton"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fwd_bwd(model, ids, **kw)
    assert report.calls["attention.fallback.mask"] == 2 and report.calls["attention.fastlm"] == 0
    assert any(issubclass(w.category, fastlm.hf.FastlmFallbackWarning) for w in caught)
    check(out, truth, base, GRAD_FACTOR_ATTENTION)
    fastlm.unpatch(model)


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
def test_greedy_generate_gives_the_same_tokens(family):
    torch.manual_seed(0)
    model = build(family).eval()
    prompt = torch.randint(1, V, (2, 5), device=DEVICE)  # no pad token (0): no padding mask
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(prompt))
    with torch.no_grad():
        expected = model.generate(prompt, **kw)
        with fastlm.patched(model) as report, fastlm.use_backend("triton"):
            got = model.generate(prompt, **kw)
    assert torch.equal(got, expected)
    if HAS_SDPA_OP:
        assert report.calls["attention.fastlm"] == 2 * 6  # prefill + 5 decode steps, 2 layers
    if family in ROTARY:
        assert report.calls["rotary.fastlm"] == 2 * 6


def test_unpatch_restores_modules_functions_and_attention():
    from transformers.models.llama import modeling_llama

    model = build("llama")
    original_rotary = modeling_llama.apply_rotary_pos_emb
    norms = {n: m for n, m in model.named_modules() if type(m).__name__ == "LlamaRMSNorm"}
    hooks = {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()}
    params = dict(model.named_parameters())
    fastlm.patch(model)
    assert modeling_llama.apply_rotary_pos_emb is not original_rotary
    assert all(isinstance(m, HFRMSNorm) for n, m in model.named_modules() if n in norms)
    report = fastlm.unpatch(model)
    assert report.restored["rms_norm"] == 5 and report.restored["rotary"] == 1
    assert modeling_llama.apply_rotary_pos_emb is original_rotary
    assert all(dict(model.named_modules())[n] is m for n, m in norms.items())
    assert {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()} == hooks
    assert dict(model.named_parameters()) == params
    assert model.config._attn_implementation == "sdpa"


def test_patching_is_per_model_and_idempotent(launches):
    """An unpatched model of the same family keeps torch's rotary while another is patched; patching
    twice changes nothing; the function comes back when the last patched model is unpatched."""
    from transformers.models.llama import modeling_llama

    original_rotary = modeling_llama.apply_rotary_pos_emb
    a, b = build("llama", layers=1), build("llama", layers=1)
    ids = torch.randint(0, V, (1, 6), device=DEVICE)
    fastlm.patch(a)
    again = fastlm.patch(a)
    assert not again.replaced and a.config._attn_implementation == ("fastlm" if HAS_SDPA_OP else "sdpa")
    with torch.no_grad(), fastlm.use_backend("triton"):
        b(ids)
        assert launches["rotary_table_fwd"] == 0 and launches["layer_norm_fwd"] == 0
        a(ids)
        assert launches["rotary_table_fwd"] == 1
    fastlm.patch(b)
    fastlm.unpatch(a)
    assert modeling_llama.apply_rotary_pos_emb is not original_rotary, "b still holds it"
    with torch.no_grad(), fastlm.use_backend("triton"):
        a(ids)
        assert launches["rotary_table_fwd"] == 1
    fastlm.unpatch(b)
    assert modeling_llama.apply_rotary_pos_emb is original_rotary


def test_a_model_not_on_sdpa_keeps_its_attention():
    model = build("llama", layers=1)
    model.set_attn_implementation("eager")
    report = fastlm.patch(model, norm=False, rotary=False)
    assert not report.replaced and model.config._attn_implementation == "eager"
    assert any("uses attn_implementation='eager'" in why for _, why in report.left_alone)
    fastlm.unpatch(model)
    assert model.config._attn_implementation == "eager"


def test_a_patched_model_dropped_without_unpatch_releases_everything():
    import gc
    import weakref

    from transformers.models.llama import modeling_llama

    original_rotary = modeling_llama.apply_rotary_pos_emb
    model = build("llama", layers=1)
    fastlm.patch(model)
    assert modeling_llama.apply_rotary_pos_emb is not original_rotary
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None, "fastlm's record must not keep a patched model alive"
    assert modeling_llama.apply_rotary_pos_emb is original_rotary


def test_unknown_model_type_is_patched_for_what_is_recognised(launches):
    """GPT-NeoX is not in the tested table: its LayerNorms, sdpa attention and partial rotary (the
    first half of each head rotated, recognised as GPT-NeoX's form) are swapped all the same."""
    torch.manual_seed(0)
    model = build("gpt_neox", rotary_pct=0.5)
    ids = torch.randint(0, V, (2, 8), device=DEVICE)
    truth, base = references(model, ids)
    report = fastlm.patch(model)
    assert report.model_type == "gpt_neox" and not report.recognised
    assert "not in fastlm's tested table" in str(report)
    assert report.replaced == {"layer_norm": 5, "attention": 2, "rotary": 2}
    with fastlm.use_backend("triton"):
        out = fwd_bwd(model, ids)
    assert report.calls["attention.fastlm"] == 2 and report.calls["rotary.fastlm"] == 2
    assert launches["rotary_table_fwd"] == 2 and launches["layer_norm_fwd"] == 5
    check(out, truth, base, GRAD_FACTOR_ATTENTION)
    fastlm.unpatch(model)


def test_unrecognised_rotary_is_left_alone(monkeypatch):
    """A model file whose apply_rotary_pos_emb is not a form fastlm computes keeps it, and says so."""
    from transformers.models.mistral import modeling_mistral

    original = modeling_mistral.apply_rotary_pos_emb

    def custom_rotary(q, k, cos, sin, unsqueeze_dim=1):
        return original(q, k, cos, sin, unsqueeze_dim)

    monkeypatch.setattr(modeling_mistral, "apply_rotary_pos_emb", custom_rotary)
    model = build("mistral", layers=1)
    report = fastlm.patch(model)
    assert modeling_mistral.apply_rotary_pos_emb is custom_rotary and report.replaced["rotary"] == 0
    assert any(what.startswith("rotary") and "neither Llama's" in why for what, why in report.left_alone)
    fastlm.unpatch(model)
    assert modeling_mistral.apply_rotary_pos_emb is custom_rotary


def test_compiled_patched_model_runs():
    torch.manual_seed(0)
    model = build("llama", layers=1)
    ids = torch.randint(0, V, (2, 8), device=DEVICE)
    fastlm.patch(model)
    with fastlm.use_backend("triton"):
        eager = _out(model, ids)
        compiled = torch.compile(model, backend="aot_eager" if DEVICE == "cpu" else "inductor")
        out = _out(compiled, ids)
        out.sum().backward()
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None
    fastlm.unpatch(model)


def test_convergence_mini_llama():
    """Liger-style: 30 AdamW steps of a mini Llama, patched vs unpatched, the loss at every step by the
    tolerance rule (truth: the unpatched run in float64; baseline: the unpatched run in float32)."""
    torch.manual_seed(0)
    model = build("llama", layers=1)
    batch = torch.randint(0, V, (1, 8), device=DEVICE)  # one batch, learned by heart: the loss must fall

    def train(m):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.01)
        losses = []
        for _ in range(30):
            loss = m(batch, labels=batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        return torch.stack(losses)

    truth = train(copy.deepcopy(model).double())
    base = train(copy.deepcopy(model))
    with fastlm.patched(model), fastlm.use_backend("triton"):
        got = train(model)
    assert truth[-1] < truth[0] - 1.0, "the run must actually learn"
    assert_close(got, truth, base, name="loss per step")


def test_attn_implementation_fastlm_is_registered():
    assert "fastlm" in tf.AttentionInterface() and "fastlm" in tf.AttentionMaskInterface()
    cfg = tf.LlamaConfig(**LLAMA_LIKE)
    model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="fastlm")
    assert model.config._attn_implementation == "fastlm"
    model.set_attn_implementation("sdpa")
    model.set_attn_implementation("fastlm")
    assert model.config._attn_implementation == "fastlm"


# --- sampling ------------------------------------------------------------------------------------


def _hf_filter(scores, top_k=None, top_p=None, min_p=None):
    from transformers.generation.logits_process import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    out = scores.clone()
    if top_k is not None:
        out = TopKLogitsWarper(top_k)(None, out)
    if top_p is not None:
        out = TopPLogitsWarper(top_p)(None, out)
    if min_p is not None:
        out = MinPLogitsWarper(min_p)(None, out)
    return out


def test_sampling_processor_validates():
    if not HAS_FILTER_OP:
        with pytest.raises(RuntimeError, match="not available"):
            fastlm.hf.sampling_processor(top_k=5)
        return
    with pytest.raises(ValueError, match="top_k"):
        fastlm.hf.sampling_processor(top_k=0)
    with pytest.raises(ValueError, match="top_p"):
        fastlm.hf.sampling_processor(top_p=1.5)
    assert isinstance(fastlm.hf.sampling_processor(top_k=5), tf.LogitsProcessor)


@needs_filter_op
@pytest.mark.parametrize("params", [dict(top_k=7), dict(top_p=0.8), dict(min_p=0.2), dict(top_k=20, top_p=0.9)])
def test_sampling_processor_keeps_the_same_support_as_hf(params):
    """Sampled tokens are random, so the test is on the support: the tokens left finite are exactly
    those transformers' own warpers keep, with their logits unchanged (distinct logits: no ties)."""
    scores = torch.randn(4, V, device=DEVICE, dtype=torch.float32) * 3
    proc = fastlm.hf.sampling_processor(**params)
    with fastlm.use_backend("triton"):
        got = proc(None, scores.clone())
    want = _hf_filter(scores, **params)
    assert torch.equal(torch.isfinite(got), torch.isfinite(want))
    keep = torch.isfinite(want)
    assert torch.equal(got[keep], scores[keep])


@needs_filter_op
def test_generate_with_sampling_processor():
    torch.manual_seed(0)
    model = build("llama", layers=1).eval()
    prompt = torch.randint(1, V, (2, 4), device=DEVICE)
    before = fastlm.hf.calls["sampling.fastlm"]
    with torch.no_grad(), fastlm.use_backend("triton"):
        greedy = model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
        top1 = model.generate(prompt, max_new_tokens=5, do_sample=True, pad_token_id=0, top_k=None, top_p=None,
                              logits_processor=tf.LogitsProcessorList([fastlm.hf.sampling_processor(top_k=1)]))
    assert torch.equal(top1, greedy), "top_k=1 sampling is greedy decoding"
    assert fastlm.hf.calls["sampling.fastlm"] - before == 5


# --- padded batches on attention_varlen ----------------------------------------------------------



def _padding_mask(side, b=3, s=7):
    """Row 0 full, row 1 with 3 pad positions, row 2 a single real token; pads on the given side."""
    mask = torch.ones(b, s, dtype=torch.long, device=DEVICE)
    real = [s, s - 3, 1]
    for r, n in enumerate(real):
        if side == "right":
            mask[r, n:] = 0
        else:
            mask[r, : s - n] = 0
    return mask


def fwd_bwd_real(model, ids, mask, dy_seed=1):
    """Outputs on the real tokens, and the parameter gradients of a random upstream gradient that is
    zero at padded positions (what sdpa and fastlm put in padded rows is not part of the contract)."""
    model.zero_grad(set_to_none=True)
    y = _out(model, ids, attention_mask=mask)
    g = torch.Generator(device="cpu").manual_seed(dy_seed)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(device=y.device, dtype=y.dtype)
    y.backward(dy * mask[..., None].to(y.dtype))
    return y.detach()[mask.bool()], {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("family", ["gpt2", "llama", "mistral", "qwen2", "bert"])
def test_padded_batches_run_on_attention_varlen(family, side, launches):
    """Right- and left-padded batches (a row with a single real token among them): every layer on
    fastlm.ops.attention_varlen's kernels, none fell back; real-token outputs and all gradients
    equal the unpatched model's by the tolerance rule."""
    torch.manual_seed(0)
    model = build(family, layers=2)
    ids = torch.randint(1, V, (3, 7), device=DEVICE)
    mask = _padding_mask(side)
    truth = fwd_bwd_real(copy.deepcopy(model).double(), ids, mask)
    base = fwd_bwd_real(copy.deepcopy(model), ids, mask)
    report = fastlm.patch(model, norm=False, rotary=False)
    with fastlm.use_backend("triton"):
        out = fwd_bwd_real(model, ids, mask)
    assert dict(report.calls) == {"attention.fastlm.varlen": 2}
    assert launches["attention_varlen_fwd"] == 2 and launches["attention_varlen_bwd"] == 2
    check(out, truth, base, GRAD_FACTOR_ATTENTION)
    fastlm.unpatch(model)


def test_padding_layout_is_read_once_per_forward(monkeypatch):
    """The mask is recognised once per forward (one host read), not once per layer, also for the
    inference tensors of torch.inference_mode (which have no version counter)."""
    seen = []
    layout = fastlm.hf._padding_layout
    monkeypatch.setattr(fastlm.hf, "_padding_layout", lambda *a: (seen.append(a[1:]), layout(*a))[1])
    torch.manual_seed(0)
    model = build("llama", layers=3)
    ids = torch.randint(1, V, (3, 7), device=DEVICE)
    mask = _padding_mask("left")
    with torch.no_grad():
        expected = _out(model, ids, attention_mask=mask)
    with fastlm.patched(model, norm=False, rotary=False) as report, fastlm.use_backend("triton"):
        with torch.no_grad():
            _out(model, ids, attention_mask=_padding_mask("right"))
        with torch.inference_mode():
            got = _out(model, ids, attention_mask=mask)
    assert report.calls["attention.fastlm.varlen"] == 6 and len(seen) == 2
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], rtol=1e-5, atol=1e-5)


def _causal_padding(valid, q_len):
    """transformers' causal-and-padding mask (B, 1, Sq, Sk) for key validity ``valid`` (B, Sk)."""
    k_len = valid.shape[1]
    pos = torch.arange(k_len - q_len, k_len)
    return (valid[:, None, :] & (torch.arange(k_len)[None, :] <= pos[:, None]))[:, None]


def test_padding_layout_recognises_padding_and_nothing_else():
    valid = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 1]], dtype=torch.bool)
    idx_q, idx_k, cu_q, cu_k, max_q, max_k = fastlm.hf._padding_layout(_causal_padding(valid, 5), 5, 5, True)
    assert cu_q.tolist() == cu_k.tolist() == [0, 5, 8, 10, 11] and max_q == max_k == 5
    assert idx_q.tolist() == idx_k.tolist() == [0, 1, 2, 3, 4, 7, 8, 9, 10, 11, 19]
    # decode steps (queries at the last positions) of a left-padded batch
    left = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 0, 1, 1], [0, 0, 0, 0, 1]], dtype=torch.bool)
    idx_q, idx_k, cu_q, cu_k, *_ = fastlm.hf._padding_layout(_causal_padding(left, 2), 2, 5, True)
    assert cu_k.tolist() == [0, 5, 8, 10, 11] and cu_q.tolist() == [0, 2, 4, 6, 7] and idx_q.tolist() == [0, 1, 2, 3, 4, 5, 7]
    # with Sq != Sk, keys after a run are a static cache's empty slots (the query is not at Sk - 1)
    # or right padding in the middle of a generation: not taken
    assert fastlm.hf._padding_layout(_causal_padding(valid, 1), 1, 5, True) is None
    assert fastlm.hf._padding_layout(valid[2:3, None, None, :], 1, 5, True) is None
    # BERT: a key-padding mask, 4-D or 2-D; every query row is computed (also with Sq != Sk, as in
    # cross-attention over a padded encoder output)
    bidir = valid[:, None, None, :].expand(4, 1, 5, 5)
    idx_q, idx_k, cu_q, cu_k, max_q, max_k = fastlm.hf._padding_layout(bidir, 5, 5, False)
    assert cu_k.tolist() == [0, 5, 8, 10, 11] and cu_q.tolist() == [0, 5, 10, 15, 20] and idx_q.tolist() == list(range(20))
    assert fastlm.hf._padding_layout(valid, 5, 5, False)[3].tolist() == [0, 5, 8, 10, 11]
    idx_q, idx_k, cu_q, cu_k, max_q, max_k = fastlm.hf._padding_layout(valid[:, None, None, :], 2, 5, False)
    assert cu_q.tolist() == [0, 2, 4, 6, 8] and cu_k.tolist() == [0, 5, 8, 10, 11] and (max_q, max_k) == (2, 5)
    # not padding: a hole, a bidirectional mask given to a causal layer (and the reverse), a window,
    # a float mask, per-head masks
    holes = valid.clone()
    holes[0, 2] = False
    assert fastlm.hf._padding_layout(_causal_padding(holes, 5), 5, 5, True) is None
    assert fastlm.hf._padding_layout(bidir, 5, 5, True) is None
    assert fastlm.hf._padding_layout(_causal_padding(valid, 5), 5, 5, False) is None
    window = _causal_padding(valid, 5) & (torch.arange(5)[None, :] > torch.arange(5)[:, None] - 2)
    assert fastlm.hf._padding_layout(window, 5, 5, True) is None
    assert fastlm.hf._padding_layout(_causal_padding(valid, 5).float(), 5, 5, True) is None
    assert fastlm.hf._padding_layout(_causal_padding(valid, 5).expand(4, 2, 5, 5), 5, 5, True) is None


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
def test_greedy_generate_left_padded_batch_on_varlen(family):
    """A left-padded batch (prefill and every decode step carry a padding mask) gives the tokens of
    the unpatched model, with every attention call on attention_varlen."""
    torch.manual_seed(0)
    model = build(family).eval()
    prompt = torch.randint(1, V, (3, 5), device=DEVICE)
    mask = _padding_mask("left", 3, 5)
    prompt = prompt * mask
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, attention_mask=mask)
    with torch.no_grad():
        expected = model.generate(prompt, **kw)
        with fastlm.patched(model, norm=False, rotary=False) as report, fastlm.use_backend("triton"):
            got = model.generate(prompt, **kw)
    assert torch.equal(got, expected)
    assert dict(report.calls) == {"attention.fastlm.varlen": 2 * 4}


def test_greedy_generate_left_padded_batch_with_static_cache():
    """A static cache's empty slots look like right padding and its queries are not at the last key
    position: such masks keep the sdpa fallback (taking them as padding gave zero rows), and the
    tokens are the unpatched model's."""
    torch.manual_seed(0)
    model = build("llama").eval()
    mask = _padding_mask("left", 3, 5)
    prompt = torch.randint(1, V, (3, 5), device=DEVICE) * mask
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, attention_mask=mask, cache_implementation="static")
    with torch.no_grad():
        expected = model.generate(prompt, **kw)
        with fastlm.patched(model, norm=False, rotary=False) as report, fastlm.use_backend("triton"):
            got = model.generate(prompt, **kw)
    assert torch.equal(got, expected)
    assert report.calls["attention.fallback.mask"] >= 2 and sum(report.calls.values()) == 2 * 4


# --- attention options: dropout in training (GPT-2), logit soft-capping (Gemma 2) ----------------


def test_gpt2_train_mode_dropout_runs_on_the_kernels(launches):
    """attn_pdrop > 0 in train mode: no fallback, finite loss, gradients flow, the same output for the
    same torch.manual_seed and another for another seed; eval mode equals the unpatched model."""
    torch.manual_seed(0)
    model = build("gpt2", attn_pdrop=0.3)
    ids = torch.randint(0, V, (2, 12), device=DEVICE)
    report = fastlm.patch(model, norm=False)
    model.train()
    outs = []
    with fastlm.use_backend("triton"):
        for seed in (1, 1, 2):
            torch.manual_seed(seed)
            y, grads = fwd_bwd(model, ids)
            assert torch.isfinite(y).all() and grads and all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())
            outs.append(y)
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    assert not any(key.startswith("attention.fallback") for key in report.calls)
    assert report.calls["attention.fastlm"] == 6 and launches["attention_fwd"] >= 6 and launches["attention_bwd"] >= 6
    model.eval()
    fastlm.unpatch(model)
    truth, base = references(model, ids)
    fastlm.patch(model, norm=False)
    with fastlm.use_backend("triton"):
        out = fwd_bwd(model, ids)
    check(out, truth, base, GRAD_FACTOR_ATTENTION)
    fastlm.unpatch(model)


def test_hf_dropout_keeps_1_minus_p():
    """attention_forward(dropout=p) on one-hot values: the output reveals the keep mask, whose kept
    fraction is 1 - p within 5 standard deviations (false alarm ~ 6e-7)."""
    torch.manual_seed(0)
    model = build("gpt2", layers=1, attn_pdrop=0.25)
    fastlm.patch(model, norm=False)
    module = model.transformer.h[0].attn
    b, h, s, d, p = 2, 4, 32, 32, 0.25
    q, k = torch.randn(b, h, s, d, device=DEVICE) * 0.1, torch.randn(b, h, s, d, device=DEVICE) * 0.1
    v = torch.eye(s, d, device=DEVICE).expand(b, h, s, d).contiguous()
    with fastlm.use_backend("triton"):
        out, _ = fastlm.hf.attention_forward(module, q, k, v, None, dropout=p, scaling=1.0, is_causal=False)
    kept = out.transpose(1, 2)[..., :s] != 0
    frac = kept.float().mean().item()
    assert abs(frac - (1 - p)) < 5 * (p * (1 - p) / kept.numel()) ** 0.5, frac
    fastlm.unpatch(model)


@pytest.mark.skipif(not hasattr(tf, "Gemma2Config"), reason="this transformers has no Gemma 2")
@pytest.mark.parametrize("padded", [False, True])
def test_gemma2_softcap_runs_on_the_kernels(padded, launches):
    """A tiny Gemma 2 (attn_logit_softcapping = 2, small enough to bite): softcap passed to the kernels
    (no fallback), outputs and gradients equal the unpatched model's; padded: on attention_varlen."""
    torch.manual_seed(0)
    cfg = tf.Gemma2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=16, vocab_size=V, max_position_embeddings=64, sliding_window=64, attn_logit_softcapping=2.0,
                          final_logit_softcapping=None, initializer_range=0.1, query_pre_attn_scalar=16)
    model = tf.Gemma2ForCausalLM(cfg).to(DEVICE).eval()
    ids = torch.randint(1, V, (3, 7), device=DEVICE)
    mask = _padding_mask("right") if padded else torch.ones_like(ids)
    run = lambda m: fwd_bwd_real(m, ids, mask)  # noqa: E731
    model.set_attn_implementation("eager")  # Gemma 2 has no sdpa path (and transformers' sdpa refuses softcap)
    truth, base = run(copy.deepcopy(model).double()), run(copy.deepcopy(model))
    model.set_attn_implementation("fastlm")  # fastlm.patch switches sdpa models only: the registered name instead
    before = collections.Counter(fastlm.hf.calls)
    with fastlm.use_backend("triton"):
        out = run(model)
    calls = fastlm.hf.calls - before
    assert not any(key.startswith("attention.fallback") for key in calls), dict(calls)
    assert calls["attention.fastlm.varlen" if padded else "attention.fastlm"] == 2
    assert launches["attention_varlen_fwd" if padded else "attention_fwd"] == 2
    check(out, truth, base, GRAD_FACTOR_ATTENTION)
