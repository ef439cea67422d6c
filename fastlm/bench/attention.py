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

attention_varlen FLOPs: the sum over sequences of 4 H L^2 D (halved, causal); a realistic length
mix (lengths spread over [S/8, S], a fixed seed), about 16k tokens, H = 16, D = 128. The padded
baseline computes on every padded position (B S_max^2 work): torch eager = SDPA over the padded
batch with a boolean causal + padding mask, its output packed inside the timing (a gather, small
beside the attention). fastlm
varlen per backend; flash-attn's flash_attn_varlen_func when installed.

paged_decode bytes: the K and V pages read once (2 B Hkv L D elements), page size 64, pages shuffled
over the pool; one new token, CUDA-graph replays. torch eager gathers the pages into a contiguous
cache, then SDPA (what a torch user does); fastlm paged per backend; flash-attn's
flash_attn_with_kvcache with its block_table (page size 256, its minimum) when installed.
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


def _decode_shapes(dtype, sizes, quick):
    """(dtype, [(B, L, bytes of the K and V read)], Hq, Hkv, D) of the decode entries."""
    dt = getattr(torch, dtype)
    ls = sizes if isinstance(sizes, list) else DECODE_SIZES["quick" if quick else (sizes or "default")]
    HQ, HKV, D = (4, 2, 64) if quick else (32, 8, 128)
    grid = [(B, L, 2 * B * HKV * L * D * dt.itemsize) for B in ((1, 2) if quick else (1, 8, 32)) for L in ls]
    return dt, grid, HQ, HKV, D


def _decode_cases(dtype, mode, sizes, device, quick):
    dt, grid, HQ, HKV, D = _decode_shapes(dtype, sizes, quick)
    out = []
    for B, L, nbytes in grid:

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


# ---- attention_varlen ----------------------------------------------------------------------------


VARLEN_SIZES = {"default": [1024, 2048, 4096, 8192], "large": [512, 1024, 2048, 4096, 8192, 16384], "quick": [24]}


def _varlen_lengths(S: int, tokens: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    lens, total = [], 0
    while total < tokens:
        n = int(torch.randint(max(1, S // 8), S + 1, (1,), generator=g))
        lens.append(n)
        total += n
    return lens


def _varlen_cases(dtype, mode, sizes, device, quick):
    dt = getattr(torch, dtype)
    ss = sizes if isinstance(sizes, list) else VARLEN_SIZES["quick" if quick else (sizes or "default")]
    H, D = (2, 64) if quick else (16, 128)
    out = []
    for causal in (False, True):
        for S in ss:
            lens = _varlen_lengths(S, 3 * S if quick else TOKENS, S)
            fwd = sum(4 * H * n * n * D for n in lens) / (2 if causal else 1)
            flops = {"fwd": fwd, "bwd": 2.5 * fwd, "full": 3.5 * fwd}[mode]

            def make(S=S, lens=lens, causal=causal):
                g = torch.Generator(device=device).manual_seed(S)
                T = sum(lens)
                q, k, v, do = (torch.randn(T, H, D, device=device, dtype=dt, generator=g) for _ in range(4))
                cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device=device, dtype=torch.int32)
                return dict(q=q, k=k, v=v, do=do, cu=cu, lens=lens, causal=causal)

            label = f"seqs={len(lens)} tokens={sum(lens)} S_max={S} H={H} D={D} {'causal' if causal else 'full'}"
            out.append(Case(label, S, make, flops=flops, params=dict(seqs=len(lens), tokens=sum(lens), S=S, H=H, D=D, causal=causal)))
    return out


def _padded(inp):
    """([pad(x) (B, H, S_max, D) for x in q, k, v], the (B, S_max) validity mask)."""
    lens, S = inp["lens"], max(inp["lens"])
    B, (_, H, D) = len(lens), inp["q"].shape
    valid = torch.arange(S, device=inp["q"].device)[None, :] < torch.tensor(lens, device=inp["q"].device)[:, None]
    pads = []
    for t in (inp["q"], inp["k"], inp["v"]):
        p = t.new_zeros(B, S, H, D)
        p[valid] = t
        pads.append(p.transpose(1, 2))
    return pads, valid


def _varlen_impls(mode, device, backends):
    def packed(fn):
        def prepare(inp):
            q, k, v, do, cu, causal = inp["q"], inp["k"], inp["v"], inp["do"], inp["cu"], inp["causal"]
            S = max(inp["lens"])
            call = lambda q, k, v: fn(q, k, v, cu, S, causal)  # noqa: E731
            if mode == "fwd":
                return lambda: call(q, k, v)
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            if mode == "bwd":
                o = call(*leaves)
                return lambda: torch.autograd.grad(o, leaves, do, retain_graph=True)
            return lambda: (lambda o: (o, *torch.autograd.grad(o, leaves, do)))(call(*leaves))

        return prepare

    def padded(fn):
        def prepare(inp):
            (qp, kp, vp), valid = _padded(inp)
            causal, do = inp["causal"], inp["do"]
            call = lambda q, k, v: fn(q, k, v, valid, causal).transpose(1, 2)[valid]  # noqa: E731
            if mode == "fwd":
                return lambda: call(qp, kp, vp)
            leaves = [t.detach().requires_grad_() for t in (qp, kp, vp)]

            def grads(o):
                return [g.transpose(1, 2)[valid] for g in torch.autograd.grad(o, leaves, do, retain_graph=True)]

            if mode == "bwd":
                o = call(*leaves)
                return lambda: grads(o)
            return lambda: (lambda o: (o, *grads(o)))(call(*leaves))

        return prepare

    def sdpa(q, k, v, valid, causal):
        S = q.shape[2]
        mask = valid[:, None, None, :]
        if causal:  # bottom-right per sequence = top-left for right padding when Sq == Sk
            mask = mask & torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    d = {"torch-eager": padded(sdpa)}
    d.update(fastlm_impls(backends, lambda b: packed(
        lambda q, k, v, cu, S, causal, b=b: ops.attention_varlen(q, k, v, cu, cu, S, S, causal=causal, backend=b))))
    try:
        from flash_attn import flash_attn_varlen_func

        d["flash-attn"] = packed(lambda q, k, v, cu, S, causal: flash_attn_varlen_func(q, k, v, cu, cu, S, S, causal=causal))
    except Exception:
        pass
    return d


def _varlen_truth(inp, mode):
    ct = torch.float64 if max(inp["lens"]) <= 2048 else torch.float32
    leaves = [t.to(ct).requires_grad_(mode != "fwd") for t in (inp["q"], inp["k"], inp["v"])]
    o = ref.attention_varlen(*leaves, inp["cu"], inp["cu"], causal=inp["causal"])
    if mode == "fwd":
        return o.detach()
    grads = torch.autograd.grad(o, leaves, inp["do"].to(ct))
    return tuple(grads) if mode == "bwd" else (o.detach(), *grads)


# ---- paged decode --------------------------------------------------------------------------------


PAGE = 64


def _paged_cases(dtype, mode, sizes, device, quick):
    dt, grid, HQ, HKV, D = _decode_shapes(dtype, sizes, quick)
    page = 16 if quick else PAGE
    out = []
    for B, L, nbytes in grid:

        def make(B=B, L=L):
            g = torch.Generator(device=device).manual_seed(L + B)
            per = -(-L // page)
            pool = B * per + 3
            q = torch.randn(B, HQ, 1, D, device=device, dtype=dt, generator=g)
            kc = torch.randn(pool, HKV, page, D, device=device, dtype=dt, generator=g)
            vc = torch.randn(pool, HKV, page, D, device=device, dtype=dt, generator=g)
            perm = torch.randperm(pool, generator=torch.Generator().manual_seed(L))[: B * per]
            table = perm.view(B, per).to(device=device, dtype=torch.int32)
            lens = torch.full((B,), L, device=device, dtype=torch.int32)
            return dict(q=q, k=kc, v=vc, table=table, lens=lens)

        out.append(Case(f"B={B} Hq={HQ} Hkv={HKV} L={L} D={D} page={page}", L, make, bytes=nbytes,
                        params=dict(B=B, HQ=HQ, HKV=HKV, L=L, D=D, page=page, graph=torch.device(device).type == "cuda")))
    return out


def _gather_pages(cache, table, L):
    """(B, Hkv, L, D) contiguous keys from the pages (the torch user's way)."""
    B, per = table.shape
    pages = cache[table.long()]  # (B, per, Hkv, page, D)
    return pages.permute(0, 2, 1, 3, 4).reshape(B, cache.shape[1], per * cache.shape[2], cache.shape[3])[:, :, :L]


def _paged_impls(mode, device, backends):
    def torch_eager(inp):
        q, kc, vc, table, L = inp["q"], inp["k"], inp["v"], inp["table"], int(inp["lens"][0])
        return lambda: F.scaled_dot_product_attention(q, _gather_pages(kc, table, L), _gather_pages(vc, table, L), enable_gqa=True)

    d = {"torch-eager": torch_eager}
    d.update(fastlm_impls(backends, lambda b: lambda inp, b=b: (lambda: ops.decode_attention(
        inp["q"], inp["k"], inp["v"], inp["lens"], block_table=inp["table"], backend=b))))
    return d


def _paged_truth(inp, mode):
    L = int(inp["lens"][0])
    return ref.decode_attention(inp["q"].float(), _gather_pages(inp["k"], inp["table"], L).float(),
                                _gather_pages(inp["v"], inp["table"], L).float(), inp["lens"])


register(Entry("attention", "flops", ("fwd", "bwd"), _attention_cases, _attention_impls, _attention_truth,
               factor=GRAD_FACTOR_ATTENTION, description="fused attention (B, H, S, D), causal and not"))
register(Entry("decode_attention", "bandwidth", ("fwd",), _decode_cases, _decode_impls, _decode_truth,
               description="KV-cache decode, one new token, GQA 32/8, D=128; bytes = the K and V read"))
register(Entry("attention_varlen", "flops", ("fwd", "bwd"), _varlen_cases, _varlen_impls, _varlen_truth,
               factor=GRAD_FACTOR_ATTENTION, description="packed sequences of mixed lengths vs padded SDPA (B, H, S_max, D)"))
register(Entry("paged_decode", "bandwidth", ("fwd",), _paged_cases, _paged_impls, _paged_truth,
               description="decode over a paged KV cache (page 64), GQA 32/8, D=128; bytes = the K and V pages read"))
