"""CUDA launchers for rotary (csrc/rotary.cu), with the signatures of fastlm/triton/rotary.py.

Each passes data pointers, sizes, element strides (0 on a broadcast batch), dtype codes and the
current stream to fastlm._C.rotary (fastlm._C_host.rotary on CPU tensors) and raises on a non-zero CUDA error code.
"""

from __future__ import annotations

from fastlm.cuda import check, dtype_code, lib, ptr, stream_handle


def _bcast(t, B: int, dim: int = 0) -> int:
    return t.stride(dim) if t.shape[dim] == B and B > 1 else 0


def _strides(q, k, qo, ko, positions, cos, sin) -> list[int]:
    B = q.shape[0]
    pos_strides = [0, 0]
    if positions is not None:
        pos_strides = [0, positions.stride(0)] if positions.dim() == 1 else [_bcast(positions, B), positions.stride(1)]
    table = [0, 0, 0, 0, 0, 0]
    if cos is not None:
        table = [_bcast(cos, B), cos.stride(1), cos.stride(2), _bcast(sin, B), sin.stride(1), sin.stride(2)]
    return [*q.stride(), *k.stride(), *qo.stride(), *ko.stride(), *pos_strides, *table]


def vector_path(q, k, qo, ko, rotary_dim, interleaved, cos=None, sin=None) -> bool:
    """Whether the launch takes the vector (16-byte) path of csrc/rotary.cu rather than the any-stride one."""
    B, HQ, S, D = q.shape
    return lib(q.device).rotary_vector_ok(
        ptr(q), ptr(k), ptr(qo), ptr(ko), ptr(cos), ptr(sin), dtype_code(cos), B, S, HQ, k.shape[1], D, rotary_dim,
        _strides(q, k, qo, ko, None, cos, sin), bool(interleaved), dtype_code(q),
    )


def _launch(q, k, qo, ko, positions, offset, theta, rotary_dim, interleaved, backward, cos=None, sin=None) -> None:
    B, HQ, S, D = q.shape
    HK = k.shape[1]
    if B == 0 or S == 0 or HQ + HK == 0 or D == 0:
        return
    strides = _strides(q, k, qo, ko, positions, cos, sin)
    code = lib(q.device).rotary(
        ptr(q), ptr(k), ptr(qo), ptr(ko), ptr(positions), 0 if positions is None else positions.element_size() * 8,
        ptr(cos), ptr(sin), dtype_code(cos), B, S, HQ, HK, D, rotary_dim, strides, int(offset), float(theta),
        bool(interleaved), bool(backward), dtype_code(q), stream_handle(q),
    )
    check(code, "rotary_bwd" if backward else "rotary_fwd")


def rotary_fwd(q, k, positions, offset, theta, rotary_dim, interleaved, q_out, k_out) -> None:
    """See fastlm.triton.rotary.rotary_fwd."""
    _launch(q, k, q_out, k_out, positions, offset, theta, rotary_dim, interleaved, False)


def rotary_bwd(dq_out, dk_out, positions, offset, theta, rotary_dim, interleaved, dq, dk) -> None:
    """See fastlm.triton.rotary.rotary_bwd."""
    _launch(dq_out, dk_out, dq, dk, positions, offset, theta, rotary_dim, interleaved, True)


def rotary_table_fwd(q, k, cos, sin, q_out, k_out, interleaved=False) -> None:
    """See fastlm.triton.rotary.rotary_table_fwd."""
    _launch(q, k, q_out, k_out, None, 0, 1.0, cos.shape[-1], interleaved, False, cos, sin)


def rotary_table_bwd(dq_out, dk_out, cos, sin, dq, dk, interleaved=False) -> None:
    """See fastlm.triton.rotary.rotary_table_bwd."""
    _launch(dq_out, dk_out, dq, dk, None, 0, 1.0, cos.shape[-1], interleaved, True, cos, sin)
