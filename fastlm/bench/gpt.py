"""Benchmark entries gpt_train and gpt_decode: the whole fastlm GPT.

gpt_train ("full"): one training step of the "gpt2" preset (124M) at B·T = 16k tokens (B=16,
T=1024) under bf16 autocast: forward, loss, backward, gradient clipping and a fused AdamW step.
The same model runs on the fastlm kernel backends, on the reference backend in eager mode
("torch-eager") and under torch.compile ("torch-compile"). FLOPs per token = 6 N + 12 L H D T
(nanoGPT's estimate_mfu), so TFLOP/s over the measured matmul rate is the MFU. The run returns the
step's loss (before its update), validated against the float64 reference.

gpt_decode ("fwd"): greedy ``GPT.generate`` (prefill, then one token per step from the static KV
cache, CUDA-graphed on the kernel backends) at batch 1 and 16, against the reference backend
without graphs and Hugging Face ``generate`` on the same weights (when transformers is installed).
Validated on the logits that choose the first new token; bytes = the weights read once per decode
step. Both entries report tokens/s.

--quick (any device): a 2-layer model and a handful of tokens, a harness check only.
"""

from __future__ import annotations

import copy
import importlib.util

import torch

import fastlm
from fastlm.bench.registry import Case, Entry, register
from fastlm.models.gpt import GPT, GPTConfig

QUICK_MODEL = dict(vocab_size=256, block_size=64, n_layer=2, n_head=4, n_embd=64)
TRAIN = {"default": [(16, 1024)], "large": [(16, 1024), (8, 2048)], "quick": [(1, 16)]}
DECODE = {"default": [(1, 64, 128), (16, 64, 128)], "large": [(1, 512, 512), (16, 512, 512)], "quick": [(1, 8, 4), (2, 8, 4)]}


def _config(quick, seq):
    if quick:
        return GPTConfig(**QUICK_MODEL)
    return GPTConfig.from_preset("gpt2", block_size=max(1024, seq))


def _preset(sizes, quick, table):
    """The preset's shapes; a list of sizes means T (train, B = 16k / T) or the batch (decode)."""
    if isinstance(sizes, list):
        if table is TRAIN:
            return [(1 if quick else max(1, 16384 // t), t) for t in sizes]
        p, n = table["quick" if quick else "default"][0][1:]
        return [(b, p, n) for b in sizes]
    return table["quick" if quick else (sizes if isinstance(sizes, str) and sizes in table else "default")]


def _make(cfg, device, b, s, dtype, new=None):
    def make():
        torch.manual_seed(0)
        model = GPT(cfg)  # built on the CPU in fp32: the same weights for every implementation
        g = torch.Generator().manual_seed(s)
        ids = torch.randint(0, cfg.vocab_size, (b, s + 1), generator=g)
        return dict(model=model, x=ids[:, :-1].to(device), y=ids[:, 1:].to(device), new=new, dtype=dtype, device=device)

    return make


def _train_cases(dtype, mode, sizes, device, quick):
    out = []
    for b, s in _preset(sizes, quick, TRAIN):
        cfg = _config(quick, s)
        with torch.device("meta"):
            fpt = GPT(cfg).flops_per_token(s)
        out.append(Case(f"{'quick' if quick else 'gpt2'} train B={b} T={s}", b * s, _make(cfg, device, b, s, getattr(torch, dtype)),
                        flops=fpt * b * s, params=dict(B=b, T=s, tokens=b * s, layers=cfg.n_layer, d=cfg.n_embd)))
    return out


def _train_prepare(backend=None, compile=False):
    def prepare(inp):
        device, dt = torch.device(inp["device"]), inp["dtype"]
        model = copy.deepcopy(inp["model"]).to(device)
        fused = {"fused": True} if device.type == "cuda" else {}
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, **fused)
        fwd = torch.compile(model) if compile else model
        x, y = inp["x"], inp["y"]

        def step():
            with torch.autocast(device.type, dtype=dt, enabled=dt != torch.float32):
                _, loss = fwd(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach().float()

        def run():
            with fastlm.use_backend(backend or "torch"):
                return step()

        return run

    return prepare


def train_impls(mode, device, backends):
    """One training step (autocast forward returning (out, loss), backward, clipping, AdamW) of the case's
    model on its (x, y): eager and compiled on the reference backend, and on each kernel backend."""
    d = {"torch-eager": _train_prepare(), "torch-compile": _train_prepare(compile=True)}
    d.update({f"fastlm-{b}": _train_prepare(b) for b in backends if b != "torch"})
    return d


def _train_truth(inp, mode):
    model = copy.deepcopy(inp["model"]).to(device=inp["device"], dtype=torch.float64)
    with torch.no_grad(), fastlm.use_backend("torch"):
        return model(inp["x"], inp["y"])[1]


def _decode_cases(dtype, mode, sizes, device, quick):
    out = []
    dt = getattr(torch, dtype)
    for b, p, n in _preset(sizes, quick, DECODE):
        cfg = _config(quick, p + n)
        with torch.device("meta"):
            nparams = GPT(cfg).num_params(non_embedding=False)
        out.append(Case(f"{'quick' if quick else 'gpt2'} decode B={b} prompt={p} new={n}", b, _make(cfg, device, b, p, dt, n),
                        bytes=(n - 1) * nparams * dt.itemsize, params=dict(B=b, prompt=p, new=n, tokens=b * n)))
    return out


def _decode_prepare(backend=None, graph=None):
    def prepare(inp):
        model = copy.deepcopy(inp["model"]).to(device=inp["device"], dtype=inp["dtype"]).eval()
        ids = inp["x"]

        def run():
            with fastlm.use_backend(backend or "torch"):
                _, first = model.generate(ids, inp["new"], temperature=0, cuda_graph=graph, return_prefill_logits=True)
            return first.float()

        return run

    return prepare


def to_hf(model: GPT):
    """The same weights as a transformers GPT2LMHeadModel (learned positions, LayerNorm, tied)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.config
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
                                    n_head=c.n_head, layer_norm_epsilon=c.norm_eps, resid_pdrop=0.0, embd_pdrop=0.0,
                                    attn_pdrop=0.0, activation_function="gelu_new" if c.gelu == "tanh" else "gelu"))
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    sd = {k: (v.t() if k.endswith(conv1d) else v) for k, v in model.state_dict().items()}
    hf.load_state_dict(sd, strict=False)
    return hf


def _hf_prepare(inp):
    hf = to_hf(inp["model"]).to(device=inp["device"], dtype=inp["dtype"]).eval()
    ids, n = inp["x"], inp["new"]
    kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None,
              attention_mask=torch.ones_like(ids), return_dict_in_generate=True, output_logits=True)

    def run():
        with torch.no_grad():
            return hf.generate(ids, **kw).logits[0].float()

    return run


def _decode_impls(mode, device, backends):
    d = {"torch-eager": _decode_prepare(graph=False)}
    d.update({f"fastlm-{b}": _decode_prepare(b) for b in backends if b != "torch"})
    if importlib.util.find_spec("transformers") is not None:
        d["hf-generate"] = _hf_prepare
    return d


def _decode_truth(inp, mode):
    model = copy.deepcopy(inp["model"]).to(device=inp["device"], dtype=torch.float64)
    with torch.no_grad(), fastlm.use_backend("torch"):
        return model(inp["x"])[:, -1]


register(Entry("gpt_train", "flops", ("full",), _train_cases, train_impls, _train_truth, dtypes=("bfloat16", "float32"),
               description="GPT-2 124M training step (fwd, bwd, AdamW) at B*T=16k under bf16 autocast; tokens/s, MFU"))
register(Entry("gpt_decode", "bandwidth", ("fwd",), _decode_cases, _decode_impls, _decode_truth, dtypes=("bfloat16", "float32"),
               description="GPT-2 124M greedy generate (static KV cache, CUDA graph) at batch 1 and 16 vs HF generate; tokens/s"))
