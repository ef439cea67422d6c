"""Benchmark entries attention (fwd, bwd: TFLOP/s) and decode_attention (GB/s of the KV read).

attention FLOPs (performance.md): forward 4 B H Sq Sk D, halved when causal; backward 2.5x the
forward. Shapes: D = 128 (D = 64 added under "large"), H = 2048 / D, B * S = 16k tokens, S = 1k..16k,
causal and not. Implementations: torch eager (F.scaled_dot_product_attention with torch's own
backend choice; the validation baseline), each SDPA backend forced with
torch.nn.attention.sdpa_kernel (flash, cuDNN, efficient; math up to S = 4096, beyond it the
(S, S) matrices only cost time), fastlm per backend, and flash-attn's flash_attn_func when
installed (inputs transposed to its (B, S, H, D) layout outside the timing). Truth: the reference
in float64 up to S = 2048, else float32 upcast, one (batch, head) at a time. Validation uses the
attention-gradient factor 3 in both modes (one factor per entry; the test suite holds the forward
to factor 2).

decode_attention bytes: the K and V caches read once (2 B Hkv L D elements); Hq = 32, Hkv = 8,
D = 128, one new token, every sequence L long, timed as CUDA-graph replays. Implementations:
torch eager (F.scaled_dot_product_attention over cache[:, :, :L] with enable_gqa), the SDPA
backends, fastlm per backend, flash-attn's flash_attn_with_kvcache when installed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastlm import ops
from fastlm.bench.registry import Case, Entry, fastlm_impls, register
from fastlm.reference import attention as ref
from fastlm.testing import GRAD_FACTOR_ATTENTION

SIZES = {
    "default": [1024, 2048, 4096, 8192, 16384],
    "large": [512, 1024, 2048, 4096, 8192, 16384, 32768],
    "quick": [33, 64],
}
DECODE_SIZES = {
    "default": [1024, 4096, 16384, 32768],
    "large": [1024, 4096, 16384, 32768, 65536, 131072],
    "quick": [40, 100],
}
TOKENS = 16384
MATH_MAX_S = 4096


def _sdpa_backends():
    """{name: SDPBackend} for the SDPA backends this torch has."""
    try:
        from torch.nn.attention import SDPBackend
    except Exception:  # pragma: no cover - torch without the module
        return {}
    names = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-cudnn": "CUDNN_ATTENTION", "sdpa-efficient": "EFFICIENT_ATTENTION", "sdpa-math": "MATH"}
    return {k: getattr(SDPBackend, v) for k, v in names.items() if hasattr(SDPBackend, v)}


def _with_backend(fn, backend):
    from torch.nn.attention import sdpa_kernel

    def run(*a, **kw):
        with sdpa_kernel(backend):
            return fn(*a, **kw)

    return run


# ---- attention ---------------------------------------------------------------------------------


def _attention_cases(dtype, mode, sizes, device, quick):
    dt = getattr(torch, dtype)
    ss = sizes if isinstance(sizes, list) else SIZES["quick" if quick else (sizes or "default")]
    dims = (64,) if quick else ((128, 64) if sizes == "large" else (128,))
    out = []
    for d in dims:
        for causal in (False, True):
            for S in ss:
                B, H = (1, 2) if quick else (max(1, TOKENS // S), 2048 // d)
                fwd = 4 * B * H * S * S * d / (2 if causal else 1)
                flops = {"fwd": fwd, "bwd": 2.5 * fwd, "full": 3.5 * fwd}[mode]

                def make(B=B, H=H, S=S, d=d, causal=causal):
                    g = torch.Generator(device=device).manual_seed(S + d)
                    q, k, v, do = (torch.randn(B, H, S, d, device=device, dtype=dt, generator=g) for _ in range(4))
                    return dict(q=q, k=k, v=v, do=do, causal=causal)

                label = f"B={B} H={H} S={S} D={d} {'causal' if causal else 'full'}"
                out.append(Case(label, S, make, flops=flops, params=dict(B=B, H=H, S=S, D=d, causal=causal)))
    return out


def _attention_prepare(fn, mode):
    """fn(q, k, v, causal) -> out (B, H, S, D), wrapped into the timed closure for the mode."""

    def prepare(inp):
        q, k, v, do, causal = inp["q"], inp["k"], inp["v"], inp["do"], inp["causal"]
        if mode == "fwd":
            return lambda: fn(q, k, v, causal)
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        if mode == "bwd":
            out = fn(*leaves, causal)
            return lambda: torch.autograd.grad(out, leaves, do, retain_graph=True)
        return lambda: (lambda o: (o, *torch.autograd.grad(o, leaves, do)))(fn(*leaves, causal))

    return prepare


def _flash_attn():
    try:
        from flash_attn import flash_attn_func
    except Exception:
        return None

    def fn(q, k, v, causal):
        return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal).transpose(1, 2)

    return fn


def _attention_impls(mode, device, backends):
    sdpa = lambda q, k, v, causal: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    d = {"torch-eager": _attention_prepare(sdpa, mode)}
    if torch.device(device).type == "cuda":
        for name, be in _sdpa_backends().items():
            prep = _attention_prepare(_with_backend(sdpa, be), mode)
            if name == "sdpa-math":
                prep = _skip_long(prep, MATH_MAX_S)
            d[name] = prep
    d.update(fastlm_impls(backends, lambda b: _attention_prepare(
        lambda q, k, v, causal, b=b: ops.attention(q, k, v, causal=causal, backend=b), mode)))
    fa = _flash_attn()
    if fa is not None:

        def fa_prepare(inp, fa=fa):
            # flash-attn reads (B, S, H, D): give it that layout outside the timing.
            t = {k: (v.transpose(1, 2).contiguous().transpose(1, 2) if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}
            return _attention_prepare(fa, mode)(t)

        d["flash-attn"] = fa_prepare
    return d


def _skip_long(prepare, max_s):
    def wrapped(inp):
        if inp["q"].shape[2] > max_s:
            raise RuntimeError(f"not run beyond S = {max_s} (the (S, S) scores only cost time)")
        return prepare(inp)

    return wrapped


def _attention_truth(inp, mode):
    q, k, v, do, causal = inp["q"], inp["k"], inp["v"], inp["do"], inp["causal"]
    ct = torch.float64 if q.shape[2] <= 2048 else torch.float32
    outs = {name: [] for name in ("out", "dq", "dk", "dv")}
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            leaves = [t[b : b + 1, h : h + 1].to(ct).requires_grad_(mode != "fwd") for t in (q, k, v)]
            o = ref.attention(*leaves, causal=causal)
            outs["out"].append(o.detach())
            if mode != "fwd":
                grads = torch.autograd.grad(o, leaves, do[b : b + 1, h : h + 1].to(ct))
                for name, g in zip(("dq", "dk", "dv"), grads, strict=True):
                    outs[name].append(g)
    B, H = q.shape[:2]
    cat = {n: torch.cat(v, 0).view(B, H, *v[0].shape[2:]) if v else None for n, v in outs.items()}
    if mode == "fwd":
        return cat["out"]
    if mode == "bwd":
        return (cat["dq"], cat["dk"], cat["dv"])
    return (cat["out"], cat["dq"], cat["dk"], cat["dv"])


# ---- decode_attention ----------------------------------------------------------------------------


def _decode_cases(dtype, mode, sizes, device, quick):
    dt = getattr(torch, dtype)
    ls = sizes if isinstance(sizes, list) else DECODE_SIZES["quick" if quick else (sizes or "default")]
    HQ, HKV, D = (4, 2, 64) if quick else (32, 8, 128)
    out = []
    for B in ((1, 2) if quick else (1, 8, 32)):
        for L in ls:
            nbytes = 2 * B * HKV * L * D * dt.itemsize

            def make(B=B, L=L):
                g = torch.Generator(device=device).manual_seed(L + B)
                q = torch.randn(B, HQ, 1, D, device=device, dtype=dt, generator=g)
                kc = torch.randn(B, HKV, L, D, device=device, dtype=dt, generator=g)
                vc = torch.randn(B, HKV, L, D, device=device, dtype=dt, generator=g)
                lens = torch.full((B,), L, device=device, dtype=torch.int32)
                return dict(q=q, k=kc, v=vc, lens=lens)

            out.append(Case(f"B={B} Hq={HQ} Hkv={HKV} L={L} D={D}", L, make, bytes=nbytes,
                            params=dict(B=B, HQ=HQ, HKV=HKV, L=L, D=D, graph=torch.device(device).type == "cuda")))
    return out


def _decode_impls(mode, device, backends):
    def sdpa(q, k, v, lens):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    def prep(fn):
        return lambda inp: (lambda: fn(inp["q"], inp["k"], inp["v"], inp["lens"]))

    d = {"torch-eager": prep(sdpa)}
    if torch.device(device).type == "cuda":
        for name, be in _sdpa_backends().items():
            if name != "sdpa-math":
                d[name] = prep(_with_backend(sdpa, be))
    d.update(fastlm_impls(backends, lambda b: prep(lambda q, k, v, lens, b=b: ops.decode_attention(q, k, v, lens, backend=b))))
    try:
        from flash_attn import flash_attn_with_kvcache

        def fa_prepare(inp):
            q, k, v = (t.transpose(1, 2).contiguous() for t in (inp["q"], inp["k"], inp["v"]))
            lens = inp["lens"]
            return lambda: flash_attn_with_kvcache(q, k, v, cache_seqlens=lens, causal=True).transpose(1, 2)

        d["flash-attn"] = fa_prepare
    except Exception:
        pass
    return d


def _decode_truth(inp, mode):
    return ref.decode_attention(inp["q"].float(), inp["k"].float(), inp["v"].float(), inp["lens"])


register(Entry("attention", "flops", ("fwd", "bwd"), _attention_cases, _attention_impls, _attention_truth,
               factor=GRAD_FACTOR_ATTENTION, description="fused attention (B, H, S, D), causal and not"))
register(Entry("decode_attention", "bandwidth", ("fwd",), _decode_cases, _decode_impls, _decode_truth,
               description="KV-cache decode, one new token, GQA 32/8, D=128; bytes = the K and V read"))
