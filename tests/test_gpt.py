"""The thin GPT: config and presets, the fused model against the reference backend (logits and every
parameter gradient by the tolerance rule), every op call through fastlm.ops on the selected
backend, a short convergence run, and from_pretrained against Hugging Face's GPT-2."""

import copy
import dataclasses

import pytest
import torch
from conftest import DEVICE, kernel_backends

import fastlm
from fastlm.models import GPT, PRESETS, GPTConfig
from fastlm.testing import GRAD_FACTOR_ATTENTION, assert_close

BACKENDS = kernel_backends()
TINY = dict(vocab_size=256, block_size=32, n_layer=2, n_head=4, n_embd=64)
VARIANTS = {
    "learned-layernorm": dict(),
    "rotary-rmsnorm-gqa": dict(positions="rotary", norm="rmsnorm", n_kv_head=2, bias=False),
    "sinusoidal-encoder-untied": dict(positions="sinusoidal", causal=False, tie_embeddings=False),
}


def _model(dtype=torch.float32, **kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**TINY, **kw})).to(device=DEVICE, dtype=dtype)


def test_presets_and_unknown_preset():
    assert set(PRESETS) == {"tiny", "gpt2", "gpt2-medium"}
    cfg = GPTConfig.from_preset("gpt2")
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.vocab_size) == (12, 12, 768, 1024, 50257)
    with torch.device("meta"):
        assert 123e6 < GPT(cfg).num_params() < 125e6  # GPT-2 small: 124M with tied embeddings
    assert GPTConfig.from_preset("tiny", n_layer=3).n_layer == 3
    with pytest.raises(ValueError, match="unknown GPT preset 'gpt5'; presets: tiny, gpt2, gpt2-medium"):
        GPTConfig.from_preset("gpt5")


@pytest.mark.parametrize("bad, match", [
    (dict(norm="batchnorm"), "norm must be"), (dict(positions="alibi"), "positions must be"),
    (dict(n_head=3), "multiple of n_head"), (dict(n_kv_head=3), "multiple of n_kv_head"),
])
def test_config_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**{**TINY, **bad})


def test_context_error_and_tied_embeddings():
    m = _model()
    assert m.lm_head.weight is m.transformer.wte.weight
    with pytest.raises(ValueError, match="longer than the context"):
        m(torch.zeros(1, 33, dtype=torch.long, device=DEVICE))


def _logits_and_grads(model, idx, g, backend):
    model.zero_grad(set_to_none=True)
    with fastlm.use_backend(backend):
        logits = model(idx)
    (logits * g.to(logits.dtype)).sum().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fused_model_matches_reference(variant, backend):
    """Same weights: the kernel model's logits and every parameter gradient against the float64
    reference, within 2x (logits) / 3x (gradients, which pass through attention's backward) of the
    float32 reference's own error, plus atol."""
    model = _model(**VARIANTS[variant])
    truth_model = copy.deepcopy(model).double()
    idx = torch.randint(0, TINY["vocab_size"], (2, 13), device=DEVICE)
    g = torch.randn(2, 13, TINY["vocab_size"], device=DEVICE, dtype=torch.float64)
    out, grads = _logits_and_grads(model, idx, g, backend)
    base, base_grads = _logits_and_grads(copy.deepcopy(model), idx, g, "torch")
    truth, truth_grads = _logits_and_grads(truth_model, idx, g, "torch")
    assert_close(out, truth, base, name="logits")
    assert set(grads) == set(truth_grads)
    for name in grads:
        assert grads[name] is not None, name
        assert_close(grads[name], truth_grads[name], base_grads[name], name=f"grad {name}", factor=GRAD_FACTOR_ATTENTION)


class _Counter:
    """Wraps fastlm.ops functions and fastlm.backend.resolve: which ops ran, on which backend."""

    def __init__(self, monkeypatch):
        self.calls, self.resolved = [], []
        for name in ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm", "attention", "attention_varlen",
                     "decode_attention", "rotary", "embed_sinusoidal", "sample"):
            fn = getattr(fastlm.ops, name, None)
            if fn is not None:
                monkeypatch.setattr(fastlm.ops, name, self._wrap(name, fn))
        resolve = fastlm.backend.resolve
        monkeypatch.setattr(fastlm.backend, "resolve", lambda b, d, op=None: self.resolved.append((op, resolve(b, d, op))) or self.resolved[-1][1])

    def _wrap(self, name, fn):
        def wrapped(*a, **k):
            self.calls.append(name)
            return fn(*a, **k)

        return wrapped

    def count(self, name):
        return self.calls.count(name)


@pytest.mark.parametrize("backend", ["torch", *BACKENDS])
@pytest.mark.parametrize("variant", ["learned-layernorm", "rotary-rmsnorm-gqa", "sinusoidal-encoder-untied"])
def test_every_op_goes_through_fastlm_and_follows_use_backend(monkeypatch, variant, backend):
    kw = VARIANTS[variant]
    model = _model(**kw)
    counter = _Counter(monkeypatch)
    L = TINY["n_layer"]
    idx = torch.randint(0, 256, (2, 8), device=DEVICE)
    with fastlm.use_backend(backend):
        model(idx).sum().backward()
    rms = kw.get("norm") == "rmsnorm"
    assert counter.count("rms_norm" if rms else "layer_norm") == 1  # the first block's ln_1
    assert counter.count("add_rms_norm" if rms else "add_layer_norm") == 2 * L  # ln_2 of each block, the next ln_1, ln_f
    assert counter.count("attention") == L
    assert counter.count("rotary") == (L if kw.get("positions") == "rotary" else 0)
    assert counter.count("embed_sinusoidal") == (1 if kw.get("positions") == "sinusoidal" else 0)
    assert {b for _, b in counter.resolved} == {backend}, counter.resolved
    if not kw.get("causal", True):
        return
    counter.calls.clear()
    with fastlm.use_backend(backend):
        model.generate([[1, 2, 3], [4]], 3, temperature=0, cuda_graph=False)  # a replayed graph makes no Python calls
    assert counter.count("attention_varlen") == L and counter.count("attention") == 0  # the packed prefill (ragged batch)
    assert counter.count("decode_attention") == 2 * L  # two decode steps
    assert counter.count("sample") == 3
    assert {b for _, b in counter.resolved} == {backend}, counter.resolved


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_launchers_run_under_the_model(monkeypatch, backend):
    """The norm launchers of the kernel backend really run (not only the dispatch)."""
    mod = fastlm.ops._common.launcher(backend, "layer_norm")
    n = {"fwd": 0, "bwd": 0}
    for which in n:
        fn = getattr(mod, f"layer_norm_{which}")
        monkeypatch.setattr(mod, f"layer_norm_{which}", lambda *a, _f=fn, _w=which: (n.__setitem__(_w, n[_w] + 1), _f(*a))[1])
    model = _model()
    with fastlm.use_backend(backend):
        model(torch.randint(0, 256, (1, 8), device=DEVICE)).sum().backward()
    assert n == {"fwd": 2 * TINY["n_layer"] + 1, "bwd": 2 * TINY["n_layer"] + 1}


@pytest.mark.parametrize("backend", BACKENDS)
def test_convergence_tracks_reference(backend):
    """30 AdamW steps on a learnable task (each row repeats a short random pattern): the kernel
    run's loss curve tracks the reference run's from the same weights. Tiny on purpose: the
    interpreter runs one program per row."""
    torch.manual_seed(1)
    cfg = dict(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=32, positions="rotary")
    data = torch.randint(0, 32, (2, 3), device=DEVICE).repeat(1, 3)
    x, y = data[:, :-1], data[:, 1:]

    def run(b):
        torch.manual_seed(0)
        model = GPT(GPTConfig(**cfg)).to(DEVICE)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses = []
        with fastlm.use_backend(b):
            for _ in range(30):
                _, loss = model(x, y)
                loss.backward()
                opt.step()
                opt.zero_grad()
                losses.append(loss.item())
        return losses

    ref, ker = run("torch"), run(backend)
    assert ref[-1] < 0.5 * ref[0]
    for i, (a, b) in enumerate(zip(ker, ref, strict=True)):
        assert abs(a - b) <= 1e-3 * max(1.0, abs(b)), f"step {i}: kernel loss {a} vs reference {b}"


def test_from_pretrained_matches_hugging_face(tmp_path):
    transformers = pytest.importorskip("transformers", reason="the 'hf' test extra (pip install transformers)")
    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(vocab_size=300, n_positions=64, n_embd=64, n_layer=2, n_head=4)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a mapping slip shows
        for name, p in hf.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    model = GPT.from_pretrained(tmp_path).to(DEVICE).eval()
    assert dataclasses.asdict(model.config)["vocab_size"] == 300 and model.config.block_size == 64
    idx = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        truth = hf.double()(idx).logits
        base = hf.float()(idx).logits
        with fastlm.use_backend("torch"):
            ours_ref = model(idx.to(DEVICE)).cpu()
        ours = model(idx.to(DEVICE)).cpu()
    assert_close(ours_ref, truth, base, name="logits (torch backend)")
    assert_close(ours, truth, base, name="logits (default backend)")


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        GPT.from_pretrained(tmp_path / "missing")
    with pytest.raises(ValueError, match="no config.json and model.safetensors"):
        GPT.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "vocab_size": 10, "n_positions": 8, "n_layer": 1, "n_head": 1, "n_embd": 8}')
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        GPT.from_pretrained(tmp_path)


def test_bench_entries_run_quick():
    """`fastlm bench gpt_train|gpt_decode --quick`: every implementation validates (a harness check)."""
    from fastlm.bench import runner

    _, train = runner.run(["gpt_train"], quick=True, backends=BACKENDS, sizes=[8])
    _, decode = runner.run(["gpt_decode"], quick=True, backends=BACKENDS, sizes=[2])
    for r in train + decode:
        assert r["status"] in ("ok", "skipped"), r
    ok = {(r["op"], r["impl"]) for r in train + decode if r["status"] == "ok"}
    assert {("gpt_train", "torch-eager"), ("gpt_decode", "torch-eager")} <= ok
    assert {("gpt_train", f"fastlm-{b}") for b in BACKENDS} <= ok
    assert all(r["tokens_per_s"] > 0 for r in train + decode if r["status"] == "ok")


def test_hidden_states_are_what_lm_head_reads():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=37, block_size=16, n_layer=2, n_head=2, n_embd=16)).eval()
    idx = torch.randint(0, 37, (2, 9))
    h = model.hidden_states(idx)
    assert h.shape == (2, 9, 16)
    torch.testing.assert_close(model.lm_head(h), model(idx), rtol=0, atol=0)
    with pytest.raises(ValueError, match="token ids"):
        model.hidden_states(torch.full((1, 3), 37))
    with pytest.raises(ValueError, match="longer than the context"):
        model.hidden_states(torch.zeros(1, 17, dtype=torch.long))
