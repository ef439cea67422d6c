"""The online-softmax step shared by the attention forward and the decode kernels."""

import triton
import triton.language as tl


@triton.jit
def _online_softmax_step(acc, m_i, l_i, s, v, DOT_PREC: tl.constexpr):
    """One key block of the online softmax (scores s in log2 units, -inf where masked):
    m' = max(m, max_j s), alpha = 2^(m - m'), p = 2^(s - m'), l' = l alpha + sum_j p,
    acc' = acc alpha + p v. A row that has seen only -inf keeps m = -inf, l = 0, acc = 0."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
    return acc, m_new, l_i
