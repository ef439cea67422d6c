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
    decoders = [d for d in model.__dict__["_fastlm_paged_cache"].graphs.values() if d.graph is not None]
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
    assert any(d.graph is not None for d in model.__dict__["_fastlm_paged_cache"].graphs.values())
    assert len(set(zip(*eager, strict=True))) > 1, "the tokens must differ between steps"
    assert graphed == eager
    assert [[int(t[b]) for t in kept] for b in range(2)] == eager


def _count_calls(monkeypatch, name):
    calls = []
    real = getattr(fastlm.ops, name)

    def wrapped(*a, **k):
        calls.append(a)
        return real(*a, **k)

    monkeypatch.setattr(fastlm.ops, name, wrapped)
    return calls


# The Triton interpreter takes about a second per decode step of this model: the position kinds
# run on the reference backend, the kernels under the model once.
@pytest.mark.parametrize("variant, backend", [(v, "torch") for v in VARIANTS] + [("rotary-gqa-rms", "triton")])
def test_ragged_batch_prefills_packed_into_the_paged_cache(monkeypatch, variant, backend):
    """A ragged batch: one packed prefill through attention_varlen over exactly the prompts' tokens
    (no padding), no padded attention, paged decode; each sequence gets its tokens generated alone."""
    model = _model(**VARIANTS[variant])
    prompts = [[5, 17, 3, 99, 42, 7, 1], [64], [8, 9, 10]]
    with fastlm.use_backend(backend):
        alone = [model.generate([p], 4, temperature=0)[0] for p in prompts]
        varlen, padded = _count_calls(monkeypatch, "attention_varlen"), _count_calls(monkeypatch, "attention")
        paged = _count_calls(monkeypatch, "decode_attention")
        batch = model.generate(prompts, 4, temperature=0)
    assert batch == alone
    assert len(set(map(tuple, batch))) > 1 and any(len(set(o)) > 1 for o in batch), "the test needs varied tokens"
    assert padded == [] and len(varlen) == TINY["n_layer"]
    assert all(q.shape[0] == 11 and cu.tolist() == [0, 7, 8, 11] for q, _, _, cu, *_ in varlen)
    assert len(paged) == 3 * TINY["n_layer"] and all(c[1].dim() == 4 and c[1].shape[2] == 16 for c in paged)
    from fastlm.generation import PagedKVCache

    cache = model.__dict__["_fastlm_paged_cache"]
    assert isinstance(cache, PagedKVCache) and cache.seqlens.tolist() == [10, 4, 6]


def test_seeded_sampling_gives_each_sequence_its_tokens_alone():
    """seed= makes every sequence's draws its own (Philox row 0, counter = its token index): the same
    tokens in a ragged batch, a same-length batch (the static cache) and alone. On the reference
    backend (the Triton sampling kernel equals it bit for bit: tests/test_sampling.py)."""
    model = _model(positions="rotary")
    kw = dict(temperature=1.0, top_k=40)
    ragged = [[1, 2, 3, 4, 5, 6], [7], [8, 9, 10]]
    seeds = [11, -3, 2**62]
    with fastlm.use_backend("torch"):
        alone = [model.generate([p], 7, seed=s, **kw)[0] for p, s in zip(ragged, seeds, strict=True)]
        assert model.generate(ragged, 7, seed=seeds, **kw) == alone
        assert len(set(map(tuple, alone))) == 3
        same = [[1, 2, 3], [4, 5, 6]]
        alone = [model.generate([p], 7, seed=5, **kw)[0] for p in same]
        assert model.generate(same, 7, seed=5, **kw) == alone
        assert model.generate([[1, 2, 3], [1, 2, 3]], 7, seed=[5, 6], **kw)[0] == alone[0]
        with pytest.raises(ValueError, match="one int64 per prompt"):
            model.generate(same, 2, seed=[1, 2, 3])
        with pytest.raises(ValueError, match="seed or generator, not both"):
            model.generate(same, 2, seed=1, generator=torch.Generator())


def test_paged_kv_cache_pages_and_errors():
    from fastlm.generation import PagedKVCache

    cache = PagedKVCache(2, 5, 2, 16, 8, max_batch=2, max_pages=3)
    a = cache.alloc(33)
    assert a == [0, 1, 2] and cache.free_pages == [3, 4]
    with pytest.raises(ValueError, match="33 tokens need 3 pages but 2 of 5 are free"):
        cache.alloc(33)
    with pytest.raises(ValueError, match="more than a block-table row's 3"):
        cache.alloc(49)
    b = cache.alloc(17)
    cache.set_rows([a, b], [33, 17])
    assert cache.block_table.tolist() == [[0, 1, 2], [3, 4, 0]] and cache.seqlens.tolist() == [33, 17]
    cache.release(a)
    assert sorted(cache.free_pages) == [0, 1, 2]
    cache.set_rows([b], [17])
    assert cache.batch == 1 and cache.block_table.shape == (1, 3)
    with pytest.raises(ValueError, match="page_size must be a power of two from 16 to 256"):
        PagedKVCache(2, 5, 2, 24, 8, max_batch=1, max_pages=1)
    with pytest.raises(ValueError, match="num_pages must be an int >= 1"):
        PagedKVCache(2, 0, 2, 16, 8, max_batch=1, max_pages=1)


@pytest.mark.parametrize("prompts, cache", [([[5, 17, 3, 99], [64, 2]], "_fastlm_paged_cache"),
                                             ([[5, 17, 3], [64, 2, 8]], "_fastlm_kv_cache")])
def test_graph_decode_matches_eager_on_both_caches(monkeypatch, prompts, cache):
    """The CUDA-graph path (a fake capture replaying the eager step into static buffers) on the
    paged cache (a ragged batch) and the static one (prompts of one length): the same tokens as
    eager decoding, greedy and with per-sequence seeds."""
    from fastlm.generation import _Decoder

    def fake_capture(self):
        self.static_tok = torch.zeros(self.cache.batch, dtype=torch.long, device=DEVICE)
        self.static_out = torch.zeros_like(self.static_tok)
        self.graph = _FakeGraph(lambda: self.static_out.copy_(self._step(self.static_tok)))

    monkeypatch.setattr(_Decoder, "_capture", fake_capture)
    model = _model()
    with fastlm.use_backend("torch"):
        for kw in (dict(temperature=0), dict(temperature=1.0, seed=[3, 4])):
            eager = model.generate(prompts, 6, cuda_graph=False, **kw)
            assert model.generate(prompts, 6, cuda_graph=True, **kw) == eager
    assert sum(d.graph is not None for d in model.__dict__[cache].graphs.values()) == 2
