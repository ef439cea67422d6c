"""CUDA launchers for the sinusoidal encoding (csrc/sinusoidal.cu), with the signatures of
fastlm/triton/sinusoidal.py (fastlm._C on CUDA tensors, fastlm._C_host on CPU tensors).

The deterministic backward sorts the ids (torch.sort, stable) before its two kernels and gives them
an fp32 workspace (chunks of embed_bwd_chunk_rows() sorted positions, 2 partial rows each); the
atomic one accumulates into an fp32 buffer (the gradient itself when it is fp32 and contiguous).
"""

from __future__ import annotations

import torch

from fastlm.cuda import check, dtype_code, lib, ptr, stream_handle


def _bits(t) -> int:
    return 0 if t is None else t.element_size() * 8


def _fwd(ids, weight, positions, offset, scale, base, out) -> None:
    T, S, D = out.shape
    if T * S == 0 or D == 0:
        return
    has_w = weight is not None
    s_pt = 0
    if positions is not None and positions.dim() == 2 and positions.shape[0] == T and T > 1:
        s_pt = positions.stride(0)
    code = lib(out.device).embed_sinusoidal_fwd(
        ptr(ids), _bits(ids), ptr(weight), ptr(positions), _bits(positions), ptr(out), T, S, D,
        weight.shape[0] if has_w else 0,
        ids.stride(0) if has_w else 0, ids.stride(1) if has_w else 0,
        weight.stride(0) if has_w else 0, weight.stride(1) if has_w else 0,
        s_pt, positions.stride(-1) if positions is not None else 0, *out.stride(),
        int(offset), 1.0 if scale is None else float(scale), scale is not None, float(base), dtype_code(out),
        stream_handle(out),
    )
    check(code, "embed_sinusoidal_fwd")


def sinusoidal_fwd(positions, base, out) -> None:
    """See fastlm.triton.sinusoidal.sinusoidal_fwd."""
    _fwd(None, None, positions, 0, None, base, out)


def embed_sinusoidal_fwd(input_ids, weight, positions, offset, scale, base, out) -> None:
    """See fastlm.triton.sinusoidal.embed_sinusoidal_fwd."""
    _fwd(input_ids, weight, positions, offset, scale, base, out)


def embed_sinusoidal_bwd(dout, input_ids, scale, deterministic, dweight) -> None:
    """See fastlm.triton.sinusoidal.embed_sinusoidal_bwd. dweight: (V, D) with unit column stride."""
    T, S, D = dout.shape
    V, N = dweight.shape[0], T * S
    dweight.zero_()
    if N == 0 or D == 0 or V == 0:
        return
    sc, has = (1.0, False) if scale is None else (float(scale), True)
    stream = stream_handle(dout)
    if deterministic:
        C = lib(dout.device)
        sorted_ids, order = torch.sort(input_ids.reshape(N).to(torch.int64), stable=True)
        d2 = dout.reshape(N, D)
        rows = C.embed_bwd_chunk_rows()
        ws = torch.empty(((N + rows - 1) // rows, 2, D), device=dout.device, dtype=torch.float32)
        code = C.embed_sinusoidal_bwd_sorted(
            ptr(d2), ptr(sorted_ids), ptr(order), ptr(dweight), ptr(ws), N, D, V, d2.stride(0), d2.stride(1),
            dweight.stride(0), sc, has, dtype_code(dweight), stream,
        )
        check(code, "embed_sinusoidal_bwd_sorted")
        return
    acc = dweight if dweight.dtype == torch.float32 and dweight.is_contiguous() else torch.zeros(
        (V, D), device=dweight.device, dtype=torch.float32
    )
    code = lib(dout.device).embed_sinusoidal_bwd_atomic(
        ptr(dout), ptr(input_ids), _bits(input_ids), ptr(acc), T, S, D, V, *dout.stride(), *input_ids.stride(),
        sc, has, dtype_code(dout), stream,
    )
    check(code, "embed_sinusoidal_bwd_atomic")
    if acc is not dweight:
        dweight.copy_(acc)
