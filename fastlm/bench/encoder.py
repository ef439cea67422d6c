"""Benchmark entry encoder_fwd: the bidirectional fastlm stack (``GPTConfig(causal=False)``, the
encoder that masked-LM pretraining and classification train) at BERT-base's shape.

One inference forward to the final normed hidden states (``GPT.hidden_states``) of the "gpt2"
preset's 12 x 768 stack with ``causal=False`` (BERT-base's layers, heads and width) at B = 32,
T = 512 (--sizes large: also T = 128 and 1024 at 16k tokens), in the given dtype, under no_grad.
FLOPs = (2 N + 4 L H D T) per token: the forward third of nanoGPT's 6 N + 12 L H D T (full,
unmasked attention). Implementations: the fastlm kernel backends, the reference backend in eager
mode ("torch-eager") and under torch.compile ("torch-compile"); validated against the float64
reference on the same weights. --quick: a 2-layer model, a harness check only.
"""

from __future__ import annotations

import copy

import torch

import fastlm
from fastlm.bench.registry import Case, Entry, fastlm_impls, register
from fastlm.models.gpt import GPT, GPTConfig

QUICK_MODEL = dict(vocab_size=256, block_size=64, n_layer=2, n_head=4, n_embd=64, causal=False)
SIZES = {"default": [(32, 512)], "large": [(128, 128), (32, 512), (16, 1024)], "quick": [(2, 16)]}


def _config(quick: bool, seq: int) -> GPTConfig:
    if quick:
        return GPTConfig(**QUICK_MODEL)
    return GPTConfig.from_preset("gpt2", block_size=max(1024, seq), causal=False)


def _flops_per_token(model: GPT, seq: int) -> float:
    c = model.config
    return 2 * model.num_params() + 4 * c.n_layer * c.n_head * c.head_dim * seq


def _cases(dtype, mode, sizes, device, quick):
    table = SIZES["quick" if quick else (sizes if isinstance(sizes, str) and sizes in SIZES else "default")]
    if isinstance(sizes, list):
        table = [(2 if quick else max(1, 16384 // t), t) for t in sizes]
    out = []
    for b, s in table:
        cfg = _config(quick, s)
        with torch.device("meta"):
            fpt = _flops_per_token(GPT(cfg), s)

        def make(cfg=cfg, b=b, s=s):
            torch.manual_seed(0)
            model = GPT(cfg)
            ids = torch.randint(0, cfg.vocab_size, (b, s), generator=torch.Generator().manual_seed(s))
            return dict(model=model, x=ids.to(device), dtype=getattr(torch, dtype), device=device)

        out.append(Case(f"{'quick' if quick else 'bert-base'} encoder B={b} T={s}", b * s, make, flops=fpt * b * s,
                        params=dict(B=b, T=s, tokens=b * s, layers=cfg.n_layer, d=cfg.n_embd)))
    return out


def _prepare(backend=None, compile=False):
    def prepare(inp):
        model = copy.deepcopy(inp["model"]).to(device=inp["device"], dtype=inp["dtype"]).eval()
        fwd = torch.compile(model.hidden_states) if compile else model.hidden_states
        x = inp["x"]

        def run():
            with torch.no_grad(), fastlm.use_backend(backend or "torch"):
                return fwd(x).float()

        return run

    return prepare


def _impls(mode, device, backends):
    d = {"torch-eager": _prepare(), "torch-compile": _prepare(compile=True)}
    d.update(fastlm_impls(backends, _prepare))
    return d


def _truth(inp, mode):
    model = copy.deepcopy(inp["model"]).to(device=inp["device"], dtype=torch.float64)
    with torch.no_grad(), fastlm.use_backend("torch"):
        return model.hidden_states(inp["x"])


register(Entry("encoder_fwd", "flops", ("fwd",), _cases, _impls, _truth, dtypes=("bfloat16", "float16", "float32"),
               description="bidirectional 12x768 stack (BERT-base shape, causal=False) forward at B=32, T=512; TFLOP/s"))
