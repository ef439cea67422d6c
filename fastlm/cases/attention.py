"""Cases for attention (forward, LSE and the three gradients) and decode_attention.

Truth: the reference in float64 (decode: fastlm.reference.attention.attention per sequence over
cache[b, :, :L_b], an oracle independent of the vectorised decode reference); baseline: the same
reference in the kernel's dtype. Outputs use the factor-2 rule, gradients the attention factor 3.
"""

from __future__ import annotations

import itertools
import zlib

import torch

from fastlm import ops
from fastlm.cases import Case
from fastlm.reference import attention as ref
from fastlm.testing import GRAD_FACTOR_ATTENTION, assert_close

DTYPES_CPU = ("float32", "float16")  # bf16 arithmetic is wrong in the Triton interpreter: GPU only
DTYPES_GPU = ("float32", "float16", "bfloat16")

_SEQ_PAIRS = [(1, 1), (1, 200), (200, 1), (17, 97), (97, 17), (128, 128), (200, 200), (97, 200), (200, 97), (17, 128)]
_HEAD_DIMS_CPU = (16, 64, 80, 128)
_WINDOWS = [((8, -1), True), ((8, -1), False), ((-1, 4), False), ((5, 3), False), ((16, 0), False), ((0, 0), True)]


def _attn(device, **kw) -> Case:
    p = dict(B=1, Hq=2, Hkv=2, Sq=97, Sk=97, D=64, dtype="float32", causal=False, window=None, layout="contiguous", dlse=False)
    p.update(kw)
    return Case("attention", p, device)


def _dec(device, **kw) -> Case:
    p = dict(B=3, Hq=4, Hkv=2, Sq=1, S_max=100, D=64, lens=(100, 37, 1), dtype="float32", window=None)
    p.update(kw)
    return Case("decode_attention", p, device)


def attention_cases(device: str, full: bool = False) -> list[Case]:
    gpu = device == "cuda"
    dtypes = DTYPES_GPU if gpu else DTYPES_CPU
    out = []
    # every Sq/Sk pair both ways, causal and not; head dim and dtype rotate through the grid
    for i, ((sq, sk), causal) in enumerate(itertools.product(_SEQ_PAIRS, (False, True))):
        out.append(_attn(device, Sq=sq, Sk=sk, causal=causal, D=_HEAD_DIMS_CPU[i % 4], dtype=dtypes[(i // 4) % len(dtypes)]))
    # every head dim in every dtype (causal, odd length)
    for d, dt in itertools.product(_HEAD_DIMS_CPU, dtypes):
        out.append(_attn(device, Sq=97, Sk=97, D=d, dtype=dt, causal=True))
    # GQA ratios 2 and 4, MQA; batch > 1
    for (hq, hkv), causal in itertools.product(((4, 2), (8, 2), (4, 1)), (False, True)):
        out.append(_attn(device, B=2 if hq == 4 and hkv == 2 else 1, Hq=hq, Hkv=hkv, Sq=97, Sk=128, D=64, causal=causal, dtype=dtypes[causal]))
    # sliding windows (alone, with causal, one-sided, empty rows when Sq > Sk)
    for (window, causal), (sq, sk) in zip(_WINDOWS, itertools.cycle(((128, 128), (97, 200), (200, 97)))):
        out.append(_attn(device, Sq=sq, Sk=sk, window=window, causal=causal, D=64))
    # layouts: (B, S, H, D) storage viewed as (B, H, S, D), non-contiguous random dO; LSE gradient
    for dt in dtypes:
        out.append(_attn(device, B=2, Hq=4, Hkv=2, Sq=97, Sk=97, D=80, dtype=dt, causal=True, layout="bshd"))
        out.append(_attn(device, Sq=17, Sk=97, D=64, dtype=dt, causal=True, window=(8, -1), dlse=True))
    # the shapes the CUDA kernel serves (fp16, head dim 64/128, no window): ragged both ways, one
    # query, GQA, (B, S, H, D) storage, the LSE gradient; on CPU they run the host build of csrc
    for (sq, sk), d, causal in itertools.product(((97, 200), (200, 97), (1, 130)), (64, 128), (False, True)):
        out.append(_attn(device, Sq=sq, Sk=sk, D=d, dtype="float16", causal=causal))
    out.append(_attn(device, B=2, Hq=8, Hkv=2, Sq=65, Sk=129, D=128, dtype="float16", causal=True, layout="bshd"))
    out.append(_attn(device, Hq=4, Hkv=1, Sq=63, Sk=63, D=64, dtype="float16", causal=True, dlse=True))
    # the CUDA forward's windows (masked first tiles, masked last tiles, rows that see nothing),
    # head dim 96, and more than one 128-row query block with a 64-key tail
    for (window, causal), (sq, sk), d in zip(_WINDOWS, itertools.cycle(((130, 130), (97, 200), (200, 97))),
                                             itertools.cycle((64, 128, 96))):
        out.append(_attn(device, Sq=sq, Sk=sk, window=window, causal=causal, D=d, dtype="float16"))
    out.append(_attn(device, Sq=97, Sk=200, D=96, dtype="float16", causal=True, layout="bshd", Hq=4, Hkv=2))
    out.append(_attn(device, Sq=260, Sk=330, D=64, dtype="float16", causal=True))
    if gpu:
        for (sq, sk), causal, dt in itertools.product(((1025, 1025), (2048, 2048), (1025, 2048), (2048, 1025)), (False, True), ("float16", "bfloat16")):
            out.append(_attn(device, B=2, Hq=4, Hkv=2, Sq=sq, Sk=sk, D=128, dtype=dt, causal=causal))
        for d in range(16, 257, 8):
            out.append(_attn(device, Sq=300, Sk=300, D=d, dtype="bfloat16", causal=True))
        for d in (96, 112, 256):
            out.append(_attn(device, Sq=257, Sk=300, D=d, dtype="float32", causal=False))
            out.append(_attn(device, Sq=257, Sk=300, D=d, dtype="float16", causal=True, window=(64, -1)))
        if full:
            for causal in (False, True):
                out.append(_attn(device, B=1, Hq=2, Hkv=1, Sq=8192, Sk=8192, D=128, dtype="bfloat16", causal=causal))
    return out


def decode_cases(device: str, full: bool = False) -> list[Case]:
    gpu = device == "cuda"
    dtypes = DTYPES_GPU if gpu else DTYPES_CPU
    out = []
    for dt in dtypes:
        out.append(_dec(device, dtype=dt))
        out.append(_dec(device, Sq=5, D=80, Hq=4, Hkv=1, lens=(70, 3, 0), S_max=70, dtype=dt))
    out.append(_dec(device, Sq=16, D=16, Hq=8, Hkv=2, B=2, lens=(90, 50), S_max=90, window=(10, -1)))
    out.append(_dec(device, Sq=3, D=128, Hq=2, Hkv=2, B=2, lens=(200, 151), S_max=200))
    out.append(_dec(device, Sq=2, D=64, Hq=6, Hkv=3, B=1, lens=(1,), S_max=1, dtype="float16"))
    # the CUDA split-KV kernel's instantiations (head dim 64/128/256, query blocks of 1, 4 and 16),
    # ragged and empty lengths, windows
    for d, sq in zip((64, 128, 256, 64, 128, 256), (1, 4, 16, 5, 1, 3), strict=True):
        out.append(_dec(device, Sq=sq, D=d, Hq=4, Hkv=2, B=3, lens=(257, 0, 40), S_max=257, dtype="float16",
                        window=(33, -1) if sq == 5 else None))
    # whole GQA groups per CUDA block: 8:1 with 4 new tokens (32 rows), 8:1 with 8 (64 rows, 4 m tiles)
    out.append(_dec(device, Sq=4, D=128, Hq=16, Hkv=2, B=2, lens=(140, 1), S_max=140, dtype="float16"))
    out.append(_dec(device, Sq=8, D=64, Hq=8, Hkv=1, B=2, lens=(130, 64), S_max=130, dtype="float16", window=(50, -1)))
    if gpu:
        for d, dt in itertools.product((64, 128, 256), ("float16", "bfloat16")):
            out.append(_dec(device, B=4, Hq=32, Hkv=8, Sq=1, S_max=4096, D=d, lens=(4096, 4000, 1, 2049), dtype=dt))
        out.append(_dec(device, B=1, Hq=32, Hkv=8, Sq=4, S_max=16384, D=128, lens=(16383,), dtype="bfloat16"))
        out.append(_dec(device, B=2, Hq=64, Hkv=1, Sq=16, S_max=1000, D=128, lens=(999, 16), dtype="float16"))
    return out


def cases(device: str, full: bool = False) -> list[Case]:
    return attention_cases(device, full) + decode_cases(device, full)


def _rand(shape, generator, dtype, device):
    return torch.randn(*shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)


def _attention_inputs(case: Case, g: torch.Generator):
    p = case.params
    dt, dev = getattr(torch, p["dtype"]), case.device
    B, Hq, Hkv, Sq, Sk, D = (p[k] for k in ("B", "Hq", "Hkv", "Sq", "Sk", "D"))
    if p["layout"] == "bshd":
        q = _rand((B, Sq, Hq, D), g, dt, dev).transpose(1, 2)
        k = _rand((B, Sk, Hkv, D), g, dt, dev).transpose(1, 2)
        v = _rand((B, Sk, Hkv, D), g, dt, dev).transpose(1, 2)
        do = _rand((B, Hq, D, Sq), g, dt, dev).transpose(2, 3)  # unit stride along S, not D
    else:
        q = _rand((B, Hq, Sq, D), g, dt, dev)
        k = _rand((B, Hkv, Sk, D), g, dt, dev)
        v = _rand((B, Hkv, Sk, D), g, dt, dev)
        do = _rand((B, Hq, Sq, D), g, dt, dev)
    dlse = _rand((B, Hq, Sq), g, torch.float32, dev) if p["dlse"] else None
    return q, k, v, do, dlse


def _run_attention(p, q, k, v, do, dlse, backend):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    kw = dict(causal=p["causal"], window=p["window"], return_lse=True)
    if backend is None:
        out, lse = ref.attention(*leaves, **kw)
    else:
        out, lse = ops.attention(*leaves, **kw, backend=backend)
    outs, grads = [out], [do]
    if dlse is not None:
        outs.append(lse)
        grads.append(dlse.to(lse.dtype))
    torch.autograd.backward(outs, grads)
    return dict(out=out.detach(), lse=lse.detach(), dq=leaves[0].grad, dk=leaves[1].grad, dv=leaves[2].grad)


def _check_attention(case: Case, backend: str) -> dict[str, float]:
    g = torch.Generator().manual_seed(zlib.crc32(case.id.encode()))
    q, k, v, do, dlse = _attention_inputs(case, g)
    originals = [t.clone() for t in (q, k, v, do)]
    got = _run_attention(case.params, q, k, v, do, dlse, backend)
    for orig, t in zip(originals, (q, k, v, do), strict=True):
        if not torch.equal(orig, t):
            raise AssertionError("attention: an input was modified in place")
    base = _run_attention(case.params, q, k, v, do, dlse, None)
    f64 = lambda t: t.double() if t is not None else None
    truth = _run_attention(case.params, f64(q), f64(k), f64(v), f64(do), f64(dlse), None)
    ratios = {}
    for name in ("out", "lse", "dq", "dk", "dv"):
        factor = GRAD_FACTOR_ATTENTION if name.startswith("d") else 2.0
        # lse is fp32 for every input dtype; its atol follows the inputs' dtype (the kernel's dtype).
        ratios[name] = assert_close(got[name], truth[name], base[name], name=f"attention {name}", factor=factor, dtype=q.dtype)
    return ratios


def _decode_inputs(case: Case, g: torch.Generator):
    p = case.params
    dt, dev = getattr(torch, p["dtype"]), case.device
    q = _rand((p["B"], p["Hq"], p["Sq"], p["D"]), g, dt, dev)
    kc = _rand((p["B"], p["Hkv"], p["S_max"], p["D"]), g, dt, dev)
    vc = _rand((p["B"], p["Hkv"], p["S_max"], p["D"]), g, dt, dev)
    lens = torch.tensor(p["lens"], dtype=torch.int32, device=dev)
    return q, kc, vc, lens


def _decode_per_sequence(q, kc, vc, lens, window):
    """The oracle: full (causal, bottom-right) attention of each sequence over its own keys."""
    outs = []
    for b, n in enumerate(lens.tolist()):
        outs.append(ref.attention(q[b : b + 1], kc[b : b + 1, :, :n], vc[b : b + 1, :, :n], causal=True, window=window))
    return torch.cat(outs, 0)


def _check_decode(case: Case, backend: str) -> dict[str, float]:
    g = torch.Generator().manual_seed(zlib.crc32(case.id.encode()))
    q, kc, vc, lens = _decode_inputs(case, g)
    w = case.params["window"]
    got = ops.decode_attention(q, kc, vc, lens, window=w, backend=backend)
    base = _decode_per_sequence(q, kc, vc, lens, w)
    truth = _decode_per_sequence(q.double(), kc.double(), vc.double(), lens, w)
    return {"out": assert_close(got, truth, base, name="decode_attention out")}


def check(case: Case, backend: str) -> dict[str, float]:
    if case.op == "decode_attention":
        return _check_decode(case, backend)
    return _check_attention(case, backend)
