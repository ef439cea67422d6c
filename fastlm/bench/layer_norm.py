"""Benchmark entries layer_norm and rms_norm: fwd, bwd and full, in GB/s against copy bandwidth.

Bytes (performance.md): fwd = read x + write y + weight (+ bias); bwd = read x, dy, mean/rstd +
write dx + read weight + write dweight (+ dbias); the weight-gradient partials are not counted, so
the figure is against the true floor. Rows M = 2^25 / N keep each tensor at 32 Mi elements, well
beyond L2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastlm import ops
from fastlm.bench.registry import Case, Entry, fastlm_impls, register
from fastlm.reference import layer_norm as ref

SIZES = {
    "default": [1024, 2048, 4096, 8192, 16384],
    "large": [1024, 2048, 4096, 8192, 16384, 32768, 65536],
    "quick": [64, 257],
}


def _cases(is_rms):
    def cases(dtype, mode, sizes, device, quick):
        dt = getattr(torch, dtype)
        ns = sizes if isinstance(sizes, list) else SIZES["quick" if quick else (sizes or "default")]
        out = []
        for n in ns:
            m = 8 if quick else max(1, 2**25 // n)
            e = dt.itemsize
            w_bytes = n * e * (1 if is_rms else 2)
            fwd = 2 * m * n * e + w_bytes
            bwd = 3 * m * n * e + 2 * m * 4 + 2 * w_bytes
            nbytes = {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}[mode]

            def make(m=m, n=n):
                g = torch.Generator(device=device).manual_seed(n)
                x = torch.randn(m, n, device=device, dtype=dt, generator=g)
                w = torch.randn(n, device=device, dtype=dt, generator=g)
                b = None if is_rms else torch.randn(n, device=device, dtype=dt, generator=g)
                dy = torch.randn(m, n, device=device, dtype=dt, generator=g)
                return dict(x=x, w=w, b=b, dy=dy)

            out.append(Case(f"M={m} N={n}", n, make, bytes=nbytes, params=dict(M=m, N=n)))
        return out

    return cases


def _prepare(fn, mode):
    """Wrap y = fn(x, w, b) into the timed closure for the mode."""

    def prepare(inp):
        x, w, b, dy = inp["x"], inp["w"], inp["b"], inp["dy"]
        if mode == "fwd":
            return lambda: fn(x, w, b)
        leaves = [t.detach().requires_grad_() for t in (x, w, b) if t is not None]
        args = leaves + [None] * (3 - len(leaves))
        if mode == "bwd":
            y = fn(*args)
            return lambda: torch.autograd.grad(y, leaves, dy, retain_graph=True)
        return lambda: (lambda y: (y, *torch.autograd.grad(y, leaves, dy)))(fn(*args))

    return prepare


def _peers(is_rms):
    """Peer implementations found installed: Liger-Kernel and flash-attn's Triton norms."""
    peers = {}
    try:
        from liger_kernel.transformers.functional import liger_layer_norm, liger_rms_norm

        if is_rms:
            peers["liger"] = lambda x, w, b, eps=1e-6: liger_rms_norm(x, w, eps)
        else:
            peers["liger"] = lambda x, w, b, eps=1e-5: liger_layer_norm(x, w, b, eps)
    except Exception:
        pass
    try:
        from flash_attn.ops.triton.layer_norm import layer_norm_fn

        peers["flash-attn"] = lambda x, w, b: layer_norm_fn(x, w, b, eps=1e-6 if is_rms else 1e-5, is_rms_norm=is_rms)
    except Exception:
        pass
    return peers


def _entry(name, is_rms):
    eps = 1e-6 if is_rms else 1e-5
    if is_rms:
        fl = lambda backend: (lambda x, w, b: ops.rms_norm(x, x.shape[-1:], w, eps, backend=backend))
        eager = lambda x, w, b: F.rms_norm(x, x.shape[-1:], w, eps)
        reference = lambda x, w, b: ref.rms_norm(x, x.shape[-1:], w, eps)
    else:
        fl = lambda backend: (lambda x, w, b: ops.layer_norm(x, x.shape[-1:], w, b, eps, backend=backend))
        eager = lambda x, w, b: F.layer_norm(x, x.shape[-1:], w, b, eps)
        reference = lambda x, w, b: ref.layer_norm(x, x.shape[-1:], w, b, eps)

    def impls(mode, device, backends):
        d = {"torch-eager": _prepare(eager, mode), "torch-compile": _prepare(torch.compile(reference, dynamic=False), mode)}
        d.update(fastlm_impls(backends, lambda b: _prepare(fl(b), mode)))
        d.update({k: _prepare(v, mode) for k, v in _peers(is_rms).items()})
        return d

    def truth(inp, mode):
        f64 = {k: (v.double() if v is not None else None) for k, v in inp.items()}
        return _prepare(reference, mode)(f64)()

    return Entry(name, "bandwidth", ("fwd", "bwd", "full"), _cases(is_rms), impls, truth,
                 description=("RMSNorm" if is_rms else "LayerNorm") + " over the last dim, weight" + ("" if is_rms else " and bias"))


register(_entry("layer_norm", False))
register(_entry("rms_norm", True))
