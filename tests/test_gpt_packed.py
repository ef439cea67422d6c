"""GPT's packed form (cu_seqlens): each packed sequence's logits and every parameter gradient equal the
model run on that sequence alone, by the tolerance rule; targets with -100; clear errors."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE

import fastlm
from fastlm.models import GPT, GPTConfig
from fastlm.testing import GRAD_FACTOR_ATTENTION, assert_close

TINY = dict(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32)
VARIANTS = {
    "learned-causal": dict(),
    "rotary-gqa-rmsnorm-causal": dict(positions="rotary", n_kv_head=2, norm="rmsnorm", bias=False),
    "sinusoidal-encoder": dict(positions="sinusoidal", causal=False, tie_embeddings=False),
    "learned-encoder": dict(causal=False),
}
LENGTHS = [5, 1, 9, 3]


def _model(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**TINY, **kw})).to(DEVICE)


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _packed(model, seqs, g, backend):
    model.zero_grad(set_to_none=True)
    with fastlm.use_backend(backend):
        logits = model(torch.cat(seqs, 1), cu_seqlens=_cu([s.shape[1] for s in seqs]))
    (logits * g.to(logits.dtype)).sum().backward()
    return logits.detach(), _grads(model)


def _alone(model, seqs, g, backend):
    """Each sequence through the model on its own; gradients summed over the sequences."""
    model.zero_grad(set_to_none=True)
    out, start = [], 0
    with fastlm.use_backend(backend):
        for s in seqs:
            logits = model(s)
            (logits * g[:, start:start + s.shape[1]].to(logits.dtype)).sum().backward()
            out.append(logits.detach())
            start += s.shape[1]
    return torch.cat(out, 1), _grads(model)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_packed_sequences_equal_each_alone(variant, backend):
    model = _model(**VARIANTS[variant])
    seqs = [torch.randint(0, TINY["vocab_size"], (1, n), device=DEVICE) for n in LENGTHS]
    g = torch.randn(1, sum(LENGTHS), TINY["vocab_size"], device=DEVICE, dtype=torch.float64)
    out, grads = _packed(model, seqs, g, backend)
    base, base_grads = _alone(copy.deepcopy(model), seqs, g, "torch")
    truth, truth_grads = _alone(copy.deepcopy(model).double(), seqs, g, "torch")
    assert out.shape == (1, sum(LENGTHS), TINY["vocab_size"])
    assert_close(out, truth, base, name="logits")
    for name in grads:
        assert_close(grads[name], truth_grads[name], base_grads[name], name=f"grad {name}", factor=GRAD_FACTOR_ATTENTION)


def test_packed_loss_ignores_minus_100_and_hidden_states_match():
    """On the reference backend (the kernels are compared above); learned positions, so the explicit
    per-token positions must be the ones used."""
    model = _model().eval()
    with fastlm.use_backend("torch"):
        seqs = [torch.randint(0, TINY["vocab_size"], (1, n), device=DEVICE) for n in (4, 7)]
        idx, cu = torch.cat(seqs, 1), _cu([4, 7])
        targets = torch.randint(0, TINY["vocab_size"], (1, 11), device=DEVICE)
        targets[0, [3, 10]] = -100  # each sequence's last token has no next token
        logits, loss = model(idx, targets, cu_seqlens=cu)
        kept = targets[0] != -100
        want = F.cross_entropy(torch.cat([model(s) for s in seqs], 1)[0][kept].double(), targets[0][kept])
        torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
        h = model.hidden_states(idx, cu_seqlens=cu, max_seqlen=7)
        assert h.shape == (1, 11, TINY["n_embd"])
        torch.testing.assert_close(model.lm_head(h), logits, rtol=0, atol=0)
        explicit = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6], device=DEVICE)
        torch.testing.assert_close(model.hidden_states(idx, cu_seqlens=cu, positions=explicit), h, rtol=0, atol=0)


def test_packed_errors():
    model = _model()
    idx = torch.randint(0, TINY["vocab_size"], (1, 10), device=DEVICE)
    cu = _cu([4, 6])
    assert model(idx, cu_seqlens=cu).shape == (1, 10, TINY["vocab_size"])  # the positive control
    bad = [
        (dict(cu_seqlens=cu.long()), "cu_seqlens must be an int32 tensor"),
        (dict(cu_seqlens=cu[:1]), "cu_seqlens must be an int32 tensor"),
        (dict(cu_seqlens=_cu([4, 6]) + 1), "must rise from 0 to the 10 packed tokens"),
        (dict(cu_seqlens=torch.tensor([0, 6, 4, 10], dtype=torch.int32, device=DEVICE)), "without decreasing"),
        (dict(cu_seqlens=_cu([4, 5])), "must rise from 0 to the 10 packed tokens"),
        (dict(cu_seqlens=cu, max_seqlen=5), "max_seqlen 5 is below the longest packed sequence"),
        (dict(cu_seqlens=cu, positions=torch.arange(9, device=DEVICE)), "positions must be"),
    ]
    for kw, match in bad:
        with pytest.raises(ValueError, match=match):
            model(idx, **kw)
    with pytest.raises(ValueError, match="idx must be"):
        model(idx.view(2, 5), cu_seqlens=cu)
    long = torch.randint(0, TINY["vocab_size"], (1, 20), device=DEVICE)
    with pytest.raises(ValueError, match="packed sequence 1 of length 17 is longer than the context"):
        model(long, cu_seqlens=_cu([3, 17]))
    assert model(long, cu_seqlens=_cu([4, 16])).shape == (1, 20, TINY["vocab_size"])  # 16 = block_size fits
    from fastlm.generation import KVCache

    cache = KVCache(2, 1, 4, 16, 8)
    with pytest.raises(ValueError, match="cu_seqlens with a cache"):
        model(idx, cu_seqlens=cu, cache=cache)
    with pytest.raises(ValueError, match="token ids"):
        model(torch.full((1, 10), 64, device=DEVICE), cu_seqlens=cu)
