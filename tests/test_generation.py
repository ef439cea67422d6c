"""Generation: the static KV cache gives exactly the greedy tokens of recomputing the whole sequence,
a batch of prompts of different lengths gives each prompt's own tokens, seeds, streaming, EOS,
clear errors, and (on a GPU) the CUDA-graph decode without a host sync per token."""

import warnings

import pytest
import torch
from conftest import DEVICE

import fastlm
from fastlm.generation import KVCache
from fastlm.models import GPT, GPTConfig

TINY = dict(vocab_size=128, block_size=24, n_layer=2, n_head=4, n_embd=64)
VARIANTS = {
    "learned": dict(),
    "rotary-gqa-rms": dict(positions="rotary", n_kv_head=2, norm="rmsnorm"),
    "sinusoidal": dict(positions="sinusoidal"),
}


def _model(**kw):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**TINY, **kw})).to(DEVICE).eval()
    with torch.no_grad():  # large weights: well-separated logits, so greedy picks are not near-ties
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


def _recompute_greedy(model, prompt, n):
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([seq], device=DEVICE))[0, -1]
            seq.append(int(logits.argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_with_kv_cache_equals_recompute(variant):
    model = _model(**VARIANTS[variant])
    prompts = [[5, 17, 3, 99, 42, 7, 1], [64, 2]]
    out = model.generate(prompts, 8, temperature=0)
    for p, o in zip(prompts, out, strict=True):
        assert o == _recompute_greedy(model, p, 8)


def test_batch_of_different_lengths_equals_each_alone():
    model = _model(positions="rotary")
    prompts = [[1, 2, 3, 4, 5, 6], [7], [8, 9, 10]]
    batch = model.generate(prompts, 6, temperature=0)
    assert [len(o) for o in batch] == [6, 6, 6]
    for p, o in zip(prompts, batch, strict=True):
        assert model.generate(p, 6, temperature=0) == [o]
    assert model.generate(torch.tensor([[1, 2, 3, 4, 5, 6]]), 6, temperature=0) == batch[:1]


def test_sampling_is_seeded_and_streams():
    model = _model()
    a = model.generate([[1, 2, 3]], 10, temperature=1.5, top_k=50, seed=1)
    assert a == model.generate([[1, 2, 3]], 10, temperature=1.5, top_k=50, seed=1)
    assert a != model.generate([[1, 2, 3]], 10, temperature=1.5, top_k=50, seed=2)
    assert all(0 <= t < TINY["vocab_size"] for t in a[0])
    seen = []
    out = model.generate([[1, 2, 3], [4]], 5, temperature=0, stream=lambda i, tok: seen.append((i, tok.tolist())))
    assert [i for i, _ in seen] == list(range(5))
    assert [[s[1][b] for s in seen] for b in range(2)] == out


def test_eos_stops_a_sequence():
    model = _model()
    full = model.generate([[1, 2, 3]], 8, temperature=0)[0]
    eos = full[3]
    out = model.generate([[1, 2, 3]], 8, temperature=0, eos_token_id=eos)[0]
    assert out == full[: full.index(eos) + 1]


def test_kv_cache_is_a_module_with_buffers_outside_the_state_dict():
    model = _model()
    keys = set(model.state_dict())
    model.generate([[1, 2]], 3, temperature=0)
    assert set(model.state_dict()) == keys
    cache = model.__dict__["_fastlm_kv_cache"]
    assert isinstance(cache, KVCache) and {n for n, _ in cache.named_buffers()} == {"k", "v", "seqlens"}
    assert cache.k.shape == (2, 1, 4, 5, 16) and cache.seqlens.dtype == torch.int32


def test_generation_errors():
    model = _model()
    with pytest.raises(ValueError, match="prompt of 25 tokens is longer than the model's context of 24"):
        model.generate([[1] * 25], 1)
    with pytest.raises(ValueError, match="ask for at most 4 new tokens"):
        model.generate([[1] * 20], 5)
    with pytest.raises(ValueError, match="at least one token"):
        model.generate([[1, 2], []], 2)
    with pytest.raises(ValueError, match="needs a causal model"):
        _model(causal=False).generate([[1]], 2)
    assert model.generate([[1] * 20], 4, temperature=0)  # the positive control: exactly fills the context


@pytest.mark.gpu
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cuda_graph_decode_matches_eager(variant):
    model = _model(**VARIANTS[variant])
    prompts = [[5, 17, 3, 99], [64, 2]]
    eager = model.generate(prompts, 10, temperature=0, cuda_graph=False)
    graphed = model.generate(prompts, 10, temperature=0, cuda_graph=True)
    decoders = [d for d in model.__dict__["_fastlm_kv_cache"].graphs.values() if d.graph is not None]
    assert decoders, "the decode step was not captured"
    assert graphed == eager
    for p, o in zip(prompts, graphed, strict=True):
        assert o == _recompute_greedy(model, p, 10)


@pytest.mark.gpu
def test_cuda_graph_decode_has_no_host_sync_per_token():
    model = _model()
    model.generate([[1, 2, 3]], 4, temperature=1.0, seed=0)  # capture outside the count

    def syncs(n):
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                model.generate([[1, 2, 3]], n, temperature=1.0, seed=0)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        return len([x for x in w if "synchroniz" in str(x.message)])

    assert syncs(16) == syncs(4)


@pytest.mark.gpu
def test_generate_bf16_on_gpu_follows_backend():
    model = _model().to(torch.bfloat16)
    with fastlm.use_backend("torch"):
        ref = model.generate([[1, 2, 3]], 6, temperature=0, cuda_graph=False)
    out = model.generate([[1, 2, 3]], 6, temperature=0)
    assert len(out[0]) == len(ref[0]) == 6


class _FakeGraph:
    """Stands in for a captured CUDA graph on the CPU: replay() runs the step into the static buffer."""

    def __init__(self, replay):
        self.replay = replay


def test_cuda_graph_decode_returns_a_fresh_tensor_each_step():
    """Regression: the graph path returned its static output buffer, so a token tensor kept from one
    step was overwritten by the next replay."""
    from fastlm.generation import _Decoder

    dec = _Decoder(model=None, cache=None, sample_kw={}, generator=None, use_graph=False)
    dec.static_tok = torch.zeros(3, dtype=torch.long)
    dec.static_out = torch.zeros(3, dtype=torch.long)
    dec.graph = _FakeGraph(lambda: dec.static_out.copy_(dec.static_tok * 10 + 1))
    first = dec(torch.tensor([1, 2, 3]))
    second = dec(torch.tensor([4, 5, 6]))
    assert first.tolist() == [11, 21, 31]
    assert second.tolist() == [41, 51, 61]
    assert first.data_ptr() != dec.static_out.data_ptr() != second.data_ptr()


def test_cuda_graph_decode_streamed_tokens_are_not_overwritten(monkeypatch):
    """generate() on the graph path (a fake capture replaying the eager step into static buffers):
    the tensors handed to stream() keep their step's tokens, and the result matches eager decoding."""
    from fastlm.generation import _Decoder

    def fake_capture(self):
        self.static_tok = torch.zeros(self.cache.batch, dtype=torch.long, device=DEVICE)
        self.static_out = torch.zeros_like(self.static_tok)
        self.graph = _FakeGraph(lambda: self.static_out.copy_(self._step(self.static_tok)))

    monkeypatch.setattr(_Decoder, "_capture", fake_capture)
    model = _model()
    prompts = [[5, 17, 3, 99], [64, 2]]
    eager = model.generate(prompts, 6, temperature=0, cuda_graph=False)
    kept = []
    graphed = model.generate(prompts, 6, temperature=0, cuda_graph=True, stream=lambda i, tok: kept.append(tok))
    assert any(d.graph is not None for d in model.__dict__["_fastlm_kv_cache"].graphs.values())
    assert len(set(zip(*eager, strict=True))) > 1, "the tokens must differ between steps"
    assert graphed == eager
    assert [[int(t[b]) for t in kept] for b in range(2)] == eager
