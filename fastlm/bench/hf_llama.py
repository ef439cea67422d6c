"""Benchmark entry hf_llama: a Hugging Face Llama-style model (GQA) patched by fastlm.patch, against
the same weights unpatched with attn_implementation="eager" (the baseline) and "sdpa" (transformers'
default).

Modes: "full" is one training step without the optimizer (forward, loss, backward; the run returns
the loss and every parameter gradient, validated by the tolerance rule against the model in float64,
factor 3 because the gradients pass through attention); "fwd" is greedy ``generate`` (prefill, then
one-token decode steps with transformers' dynamic KV cache), validated on the first step's logits
(later tokens may legitimately differ between dtypes). FLOPs: 2 * (matmul parameters) per token
forward, 3x that for a training step, plus attention (performance.md: 4·B·H·Sq·Sk·D forward,
halved when causal, backward 2.5x). Needs transformers (the "hf" extra); without it the entry has
no cases. torch.compile is not timed here (HF generate recompiles per length).
"""

from __future__ import annotations

import copy
import importlib.util

import torch

from fastlm.bench.registry import Case, Entry, register

# (hidden, layers, heads, kv_heads, intermediate, vocab), (batch, seq) for a training step,
# (batch, prompt, new tokens) for generate
SIZES = {
    "default": dict(model=(1024, 8, 16, 4, 2816, 32000), train=[(8, 512), (4, 2048)], gen=[(1, 128, 32), (8, 128, 32)]),
    "large": dict(model=(2048, 16, 16, 4, 5632, 32000), train=[(8, 1024), (2, 4096)], gen=[(1, 512, 128), (16, 512, 128)]),
    "quick": dict(model=(64, 2, 4, 2, 96, 101), train=[(1, 16)], gen=[(1, 8, 4)]),
}


def _config(spec):
    from transformers import LlamaConfig

    h, layers, heads, kv, inter, vocab = spec
    return LlamaConfig(hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                       intermediate_size=inter, vocab_size=vocab, max_position_embeddings=8192, initializer_range=0.02,
                       tie_word_embeddings=False)


def _matmul_params(spec) -> int:
    h, layers, heads, kv, inter, vocab = spec
    d = h // heads
    return layers * (2 * h * h + 2 * h * kv * d + 3 * h * inter) + h * vocab


def _attn_flops(spec, batch, sq, sk, causal=True) -> float:
    h, layers, heads = spec[0], spec[1], spec[2]
    f = 4.0 * batch * heads * sq * sk * (h // heads) * layers
    return f / 2 if causal and sq == sk else f


def _cases(dtype, mode, sizes, device, quick):
    if importlib.util.find_spec("transformers") is None:
        return []
    preset = SIZES["quick" if quick else (sizes if isinstance(sizes, str) and sizes in SIZES else "default")]
    spec = preset["model"]
    dt = getattr(torch, dtype)
    P = _matmul_params(spec)
    out = []
    if mode == "full":
        shapes = [(b, s) for b, s in preset["train"]]
        if isinstance(sizes, list):
            shapes = [(max(1, preset["train"][0][0] * preset["train"][0][1] // s), s) for s in sizes]
        for b, s in shapes:
            flops = 6.0 * P * b * s + 3.5 * _attn_flops(spec, b, s, s)
            out.append(Case(f"train B={b} S={s}", s, _make(spec, dt, device, b, s), flops=flops,
                            params=dict(B=b, S=s, hidden=spec[0], layers=spec[1])))
    else:
        for b, p, n in preset["gen"]:
            flops = 2.0 * P * b * (p + n) + _attn_flops(spec, b, p, p) + sum(_attn_flops(spec, b, 1, p + i, False) for i in range(n))
            nbytes = (n - 1) * P * dt.itemsize  # every decode step reads the weights once
            out.append(Case(f"generate B={b} prompt={p} new={n}", p, _make(spec, dt, device, b, p, n), flops=flops,
                            bytes=nbytes, params=dict(B=b, prompt=p, new=n, hidden=spec[0], layers=spec[1])))
    return out


def _make(spec, dt, device, b, s, new=None):
    def make():
        from transformers import LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(_config(spec))  # built on the CPU in fp32, the same weights for all
        g = torch.Generator(device="cpu").manual_seed(s)
        ids = torch.randint(1, spec[5], (b, s), generator=g).to(device)
        return dict(model=model, ids=ids, new=new, dtype=dt, device=device)

    return make


def _model(inp, impl, dtype=None):
    m = copy.deepcopy(inp["model"])
    m.set_attn_implementation("eager" if impl == "eager" else "sdpa")
    return m.to(device=inp["device"], dtype=dtype or inp["dtype"])


def _train_step(model, ids):
    params = [p for p in model.parameters() if p.requires_grad]

    def run():
        loss = model(ids, labels=ids).loss
        return (loss.detach(), *torch.autograd.grad(loss, params))

    return run


def _generate(model, ids, new):
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=None,
              attention_mask=torch.ones_like(ids), return_dict_in_generate=True, output_logits=True)

    def run():
        with torch.no_grad():
            return model.generate(ids, **kw).logits[0]

    return run


def _prepare(impl, mode, backend=None):
    def prepare(inp):
        model = _model(inp, impl)
        if impl == "fastlm":
            import fastlm

            fastlm.patch(model)
        run = _train_step(model, inp["ids"]) if mode == "full" else _generate(model.eval(), inp["ids"], inp["new"])
        if backend is None:
            return run
        import fastlm

        def run_on_backend():
            with fastlm.use_backend(backend):
                return run()

        return run_on_backend

    return prepare


def _impls(mode, device, backends):
    d = {"torch-eager": _prepare("eager", mode), "hf-sdpa": _prepare("sdpa", mode)}
    for b in backends:
        if b != "torch":
            d[f"fastlm-{b}"] = _prepare("fastlm", mode, b)
    return d


def _truth(inp, mode):
    model = _model(inp, "sdpa", torch.float64)
    run = _train_step(model, inp["ids"]) if mode == "full" else _generate(model.eval(), inp["ids"], inp["new"])
    return run()


register(Entry("hf_llama", "flops", ("full", "fwd"), _cases, _impls, _truth, factor=3.0,
               dtypes=("bfloat16", "float16", "float32"),
               description="HF Llama-style model (GQA) patched by fastlm.patch: training step (full), greedy generate (fwd)"))
