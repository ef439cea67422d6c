"""sample and top_k_top_p_filter: validation, RNG state, dispatch, torch.library.

The kernel backends run through two custom ops, fastlm::sample and fastlm::top_k_top_p_filter,
whose launchers come from fastlm/triton/sampling.py or fastlm/cuda/sampling.py; the torch backend
is the sort-based reference (fastlm/reference/sampling.py), which defines the result exactly.

Randomness: a call draws its Philox key and counter offset as one
``torch.randint(-2**63, 2**63 - 1, (2,), dtype=torch.int64, generator=generator, device=logits.device)``
(the generator's, or the device's default generator's, state advances by exactly that draw), or
takes them from ``seed=`` (an int64 tensor [seed, offset] on the logits' device; nothing advances).
Either way the values stay on the device: no host sync, and the call can be captured in a CUDA graph.

Bad input: Python-number parameters are checked on the host (no sync needed). Row data and
per-row parameter tensors are checked by the kernel, which writes a row status (see the
reference's STATUS_MESSAGES); with ``check=True`` (the default) the op reads it back (one host
sync) and raises ValueError naming the rows and reasons; with ``check=False`` it never syncs and
returns the status as a negative token id (a NaN log-prob / a NaN row for the filter). Under
torch.compile the check=True read-back runs inside a custom op, fastlm::check_status, that passes
the result through (a copy), so a compiled call raises the same ValueError.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor

from fastlm import backend as _backend
from fastlm.ops._common import check_int64, check_kernel_dtype, check_same_device, check_tensor, launcher
from fastlm.reference import sampling as ref

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _opt(t: Optional[Tensor], v):
    return t if t is not None else v


@torch.library.custom_op("fastlm::sample", mutates_args=())
def _sample_op(
    logits: Tensor, seed: Tensor,
    temperature: Optional[Tensor], top_k: Optional[Tensor], top_p: Optional[Tensor], min_p: Optional[Tensor],
    t_val: Optional[float], k_val: Optional[int], p_val: Optional[float], mp_val: Optional[float],
    return_logprobs: bool, backend: str,
) -> tuple[Tensor, Tensor]:
    B = logits.shape[0]
    tokens = torch.empty(B, device=logits.device, dtype=torch.int64)
    logprobs = torch.empty(B if return_logprobs else 0, device=logits.device, dtype=torch.float32)
    launcher(backend, "sampling").sample(
        logits, _opt(temperature, t_val), _opt(top_k, k_val), _opt(top_p, p_val), _opt(min_p, mp_val),
        seed, tokens, logprobs if return_logprobs else None,
    )
    return tokens, logprobs


@_sample_op.register_fake
def _(logits, seed, temperature, top_k, top_p, min_p, t_val, k_val, p_val, mp_val, return_logprobs, backend):
    B = logits.shape[0]
    return logits.new_empty(B, dtype=torch.int64), logits.new_empty(B if return_logprobs else 0, dtype=torch.float32)


@torch.library.custom_op("fastlm::top_k_top_p_filter", mutates_args=())
def _filter_op(
    logits: Tensor, top_k: Optional[Tensor], top_p: Optional[Tensor], min_p: Optional[Tensor],
    k_val: Optional[int], p_val: Optional[float], mp_val: Optional[float], backend: str,
) -> tuple[Tensor, Tensor]:
    out = torch.empty_like(logits)
    status = torch.empty(logits.shape[0], device=logits.device, dtype=torch.int64)
    launcher(backend, "sampling").top_k_top_p_filter(
        logits, _opt(top_k, k_val), _opt(top_p, p_val), _opt(min_p, mp_val), out, status,
    )
    return out, status


@_filter_op.register_fake
def _(logits, top_k, top_p, min_p, k_val, p_val, mp_val, backend):
    return torch.empty_like(logits), logits.new_empty(logits.shape[0], dtype=torch.int64)


def _filter_setup(ctx, inputs, output):
    ctx.save_for_backward(output[0])


def _filter_backward(ctx, dout, dstatus):
    (out,) = ctx.saved_tensors
    return dout.masked_fill(out == -math.inf, 0.0), None, None, None, None, None, None, None


_filter_op.register_autograd(_filter_backward, setup_context=_filter_setup)


# ---- validation ---------------------------------------------------------------------------------


def _check_logits(op: str, logits) -> tuple[int, int]:
    check_tensor("logits", logits, op=op, dtypes=FLOAT_DTYPES)
    if logits.dim() != 2:
        raise ValueError(f"fastlm.ops.{op}: logits must have shape (B, V), got {list(logits.shape)}")
    B, V = logits.shape
    if V == 0:
        raise ValueError(f"fastlm.ops.{op}: logits has an empty vocabulary (shape {list(logits.shape)})")
    return B, V


def _param(op: str, name: str, v, logits: Tensor, *, integer: bool, ok, rule: str):
    """A parameter as (tensor or None, scalar or None); scalars are checked here (no sync)."""
    if v is None:
        return None, None
    if isinstance(v, Tensor):
        dtypes = INT_DTYPES if integer else FLOAT_DTYPES
        check_tensor(name, v, op=op, dtypes=dtypes)
        B = logits.shape[0]
        if v.dim() == 0 or tuple(v.shape) != (B,):
            raise ValueError(f"fastlm.ops.{op}: {name} must be a number or a tensor of shape ({B},) (one per row), got shape {list(v.shape)}")
        check_same_device(op, "logits", logits, **{name: v})
        return (v if v.stride(0) == 1 else v.contiguous()), None
    if isinstance(v, bool) or not isinstance(v, numbers.Integral if integer else numbers.Real):
        kind = "an int" if integer else "a number"
        raise TypeError(f"fastlm.ops.{op}: {name} must be {kind} or a tensor, got {type(v).__name__}")
    v = check_int64(op, name, int(v)) if integer else float(v)
    if not ok(v):
        raise ValueError(f"fastlm.ops.{op}: {name} must be {rule}, got {v!r}")
    return None, v


def _params(op, logits, temperature, top_k, top_p, min_p):
    T = _param(op, "temperature", temperature, logits, integer=False,
               ok=lambda t: math.isfinite(t) and t >= 0, rule="a finite number >= 0 (0 means greedy)")
    K = _param(op, "top_k", top_k, logits, integer=True, ok=lambda k: k >= 1, rule=">= 1 (None turns it off)")
    P = _param(op, "top_p", top_p, logits, integer=False, ok=lambda p: 0 < p <= 1, rule="in (0, 1] (None turns it off)")
    MP = _param(op, "min_p", min_p, logits, integer=False, ok=lambda p: 0 <= p <= 1, rule="in [0, 1] (None turns it off)")
    return T, K, P, MP


def _raise_for_status(op: str, status: Tensor) -> None:
    """The one host sync of check=True: raise ValueError naming the failing rows."""
    bad = status < 0
    if not bool(bad.any()):
        return
    rows = torch.nonzero(bad).flatten().tolist()
    codes = status[bad].tolist()
    parts = [f"row {r} of logits {ref.STATUS_MESSAGES.get(int(c), f'has status {c}')}" for r, c in zip(rows[:8], codes[:8], strict=True)]
    more = f" (and {len(rows) - 8} more rows)" if len(rows) > 8 else ""
    raise ValueError(f"fastlm.ops.{op}: " + "; ".join(parts) + more +
                     " (pass check=False to get the row status as negative tokens instead of an error)")


@torch.library.custom_op("fastlm::check_status", mutates_args=())
def _check_status(status: Tensor, result: Tensor, op: str) -> Tensor:
    """check=True inside a compiled graph: raise as _raise_for_status, else a copy of result (an
    output, so the check is never removed as dead code)."""
    _raise_for_status(op, status)
    return result.clone()


@_check_status.register_fake
def _(status, result, op):
    return torch.empty_like(result)


def _checked(op: str, status: Tensor, result: Tensor) -> Tensor:
    if torch.compiler.is_compiling():
        return _check_status(status, result, op)
    _raise_for_status(op, status)
    return result


def _seed(op: str, logits: Tensor, generator, seed) -> Tensor:
    if seed is not None:
        if generator is not None:
            raise ValueError(f"fastlm.ops.{op}: pass generator or seed, not both")
        if isinstance(seed, int) and not isinstance(seed, bool):
            if not -(2**63) <= seed < 2**63:
                raise ValueError(f"fastlm.ops.{op}: seed must fit in int64, got {seed}")
            return torch.tensor([seed, 0], dtype=torch.int64, device=logits.device)
        if not isinstance(seed, torch.Tensor):
            raise TypeError(f"fastlm.ops.{op}: seed must be an int or an int64 tensor [seed, offset], got {type(seed).__name__}")
        check_tensor("seed", seed, op=op, dtypes=(torch.int64,))
        if tuple(seed.shape) != (2,):
            raise ValueError(f"fastlm.ops.{op}: seed must be an int64 tensor [seed, offset] of shape (2,), got shape {list(seed.shape)}")
        check_same_device(op, "logits", logits, seed=seed)
        return seed if seed.stride(0) == 1 else seed.contiguous()
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"fastlm.ops.{op}: generator must be a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != logits.device.type:
            raise ValueError(f"fastlm.ops.{op}: generator is on {generator.device} but logits is on {logits.device}")
    return torch.randint(-(2**63), 2**63 - 1, (2,), dtype=torch.int64, generator=generator, device=logits.device)


# ---- public ops ---------------------------------------------------------------------------------


def sample(logits, *, temperature=1.0, top_k=None, top_p=None, min_p=None, generator=None,
           return_logprobs=False, seed=None, check=True, backend=None):
    """One token per row of logits (B, V): temperature, then top-k, top-p and min-p (Hugging
    Face's order and tie rule: every token tied at a threshold is kept), then a draw from the
    renormalised distribution. Each parameter is a Python number, None (off) or a (B,) tensor;
    ``temperature=0`` is greedy (the lowest index of the max). Returns int64 tokens (B,) and, with
    ``return_logprobs``, the fp32 log-probability of each token under the filtered distribution
    (0 for greedy rows). ``seed``: an int (= the tensor [seed, 0]) or an int64 tensor [seed, offset] used instead of ``generator``.
    ``check=False``: no host sync; bad rows come back as negative tokens (see the module doc)."""
    op = "sample"
    B, V = _check_logits(op, logits)
    (tT, tv), (kT, kv), (pT, pv), (mT, mv) = _params(op, logits, temperature, top_k, top_p, min_p)
    if tT is None and tv is None:
        tv = 1.0
    seed_t = _seed(op, logits, generator, seed)
    name = _backend.resolve(backend, logits.device, op)
    x = logits.detach()
    if name == "torch":
        tokens, logprobs = ref.sample(x, _opt(tT, tv), _opt(kT, kv), _opt(pT, pv), _opt(mT, mv), seed=seed_t)
    else:
        check_kernel_dtype(op, name, logits=x)
        x = x if x.stride(1) == 1 else x.contiguous()
        tokens, logprobs = _sample_op(x, seed_t, tT, kT, pT, mT, tv, kv, pv, mv, bool(return_logprobs), name)
    if check:
        tokens = _checked(op, tokens, tokens)
    return (tokens, logprobs) if return_logprobs else tokens


def top_k_top_p_filter(logits, *, top_k=None, top_p=None, min_p=None, check=True, backend=None):
    """The logits with -inf outside the top-k / top-p / min-p support (same rules as ``sample``,
    at temperature 1), in the logits' dtype: a Hugging Face logits processor. With
    ``check=False`` a bad row comes back all NaN instead of raising."""
    op = "top_k_top_p_filter"
    _check_logits(op, logits)
    _, (kT, kv), (pT, pv), (mT, mv) = _params(op, logits, None, top_k, top_p, min_p)
    name = _backend.resolve(backend, logits.device, op)
    if name == "torch":
        out, status = ref.top_k_top_p_filter(logits, _opt(kT, kv), _opt(pT, pv), _opt(mT, mv))
    else:
        check_kernel_dtype(op, name, logits=logits)
        x = logits if logits.stride(1) == 1 else logits.contiguous()
        out, status = _filter_op(x, kT, pT, mT, kv, pv, mv, name)
    if check:
        out = _checked(op, status, out)
    return out
