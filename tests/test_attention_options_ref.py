"""The reference's attention options (softcap, ALiBi, dropout) against their formulas written out by hand."""

import math

import torch

from fastlm.reference import attention as ref


def _inputs():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 8, dtype=torch.float64, generator=g)
    k = torch.randn(2, 2, 7, 8, dtype=torch.float64, generator=g)
    v = torch.randn(2, 2, 7, 8, dtype=torch.float64, generator=g)
    return q, k, v


SLOPES = torch.tensor([0.5, 0.25, 0.125, 0.0625])
SEED = torch.tensor([123456789012, 5])


def test_softcap_alibi_dropout_follow_the_formulas():
    q, k, v = _inputs()
    out = ref.attention(q, k, v, causal=True, softcap=3.0, alibi_slopes=SLOPES, dropout_p=0.3, seed=SEED)
    kr, vr = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    s = 3.0 * torch.tanh(q @ kr.transpose(-1, -2) / math.sqrt(8) / 3.0)
    i, j = torch.arange(5)[:, None], torch.arange(7)[None]
    s = s - SLOPES.double()[:, None, None] * (i + 2 - j).abs()
    p = s.masked_fill(j > i + 2, float("-inf")).softmax(-1)
    b, h = torch.arange(2)[:, None, None, None], torch.arange(4)[None, :, None, None]
    keep = ref.dropout_keep(SEED, 0.3, b * 5 + i, b * 7 + j, h)
    torch.testing.assert_close(out, (p * keep / 0.7) @ vr, rtol=0, atol=1e-12)
    assert 0.6 < keep.double().mean() < 0.8


def test_dropout_keep_is_philox_word_by_key_column():
    seed = torch.tensor([(7 << 32) | 11, 3])
    keep = ref.dropout_keep(seed, 0.5, torch.tensor(9), torch.arange(8), torch.tensor(2))
    words = ref.philox4x32(torch.tensor([0, 1]), torch.tensor(9), torch.tensor(2), torch.tensor(3), torch.tensor(11), torch.tensor(7))
    expect = torch.stack(words, -1).reshape(-1) >= 2**31
    assert torch.equal(keep, expect)
    assert ref.dropout_threshold(0.0) == 0 and ref.dropout_threshold(0.25) == 2**30


def test_varlen_drops_the_same_entries_as_the_batch():
    q, k, v = _inputs()
    out = ref.attention(q, k, v, softcap=2.0, alibi_slopes=SLOPES, dropout_p=0.4, seed=SEED)
    cq, ck = torch.tensor([0, 5, 10], dtype=torch.int32), torch.tensor([0, 7, 14], dtype=torch.int32)
    packed = ref.attention_varlen(q.transpose(1, 2).reshape(10, 4, 8), k.transpose(1, 2).reshape(14, 2, 8),
                                  v.transpose(1, 2).reshape(14, 2, 8), cq, ck, softcap=2.0, alibi_slopes=SLOPES,
                                  dropout_p=0.4, seed=SEED)
    torch.testing.assert_close(packed.reshape(2, 5, 4, 8).transpose(1, 2), out, rtol=0, atol=0)


def test_decode_options_equal_attention_on_the_prefix():
    q, _, _ = _inputs()
    g = torch.Generator().manual_seed(1)
    kc, vc = torch.randn(2, 2, 9, 8, dtype=torch.float64, generator=g), torch.randn(2, 2, 9, 8, dtype=torch.float64, generator=g)
    lens = torch.tensor([7, 4], dtype=torch.int32)
    slopes = torch.stack([SLOPES, 2 * SLOPES])
    out = ref.decode_attention(q[:, :, :2], kc, vc, lens, softcap=2.0, alibi_slopes=slopes)
    for b in range(2):
        one = ref.attention(q[b:b + 1, :, :2], kc[b:b + 1, :, :lens[b]], vc[b:b + 1, :, :lens[b]], causal=True, softcap=2.0,
                            alibi_slopes=slopes[b])
        torch.testing.assert_close(out[b:b + 1], one, rtol=0, atol=1e-14)
