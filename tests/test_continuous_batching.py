"""Continuous batching (fastlm.generation.BatchGenerator / generate_many): with fewer batch rows and
pages than the requests need at once, sequences finish (EOS or their own max_new_tokens) and waiting
prompts join between decode steps, and every request gets exactly the tokens that generate gives
its prompt alone (greedy, and sampled with the same seed); every page is free at the end; clear
errors. Tokens are integers: compared exactly."""

import pytest
import torch
from conftest import DEVICE

import fastlm
from fastlm.generation import BatchGenerator, generate_many
from fastlm.models import GPT, GPTConfig

TINY = dict(vocab_size=128, block_size=24, n_layer=2, n_head=4, n_embd=64, positions="rotary")
PROMPTS = [[5, 17, 3, 99, 42, 7], [64], [8, 9, 10], [11, 12], [13, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [3, 1], [70, 71, 72]]
NEW = [11, 7, 3, 1, 6, 0, 4]  # with 16-token pages the first and fifth sequences need 2 pages, the others 1


def _model(**kw):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**TINY, **kw})).to(DEVICE).eval()
    with torch.no_grad():  # large weights: well-separated logits, so greedy picks are not near-ties
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


def _run_logged(gen):
    """Step to the end; per step the request ids running after it."""
    log = []
    while not gen.done:
        gen.step()
        log.append({r.id for r in gen.running})
        assert len(gen.running) <= gen.cache.table.shape[0]
        used = sum(len(r.pages) for r in gen.running)
        assert used + len(gen.cache.free_pages) == gen.cache.num_pages
    return log


def _greedy_case(prompts, news, **gen_kw):
    model = _model()
    alone = [model.generate([p], n, temperature=0)[0] for p, n in zip(prompts, news, strict=True)]
    gen = BatchGenerator(model, temperature=0, **gen_kw)
    for p, n in zip(prompts, news, strict=True):
        gen.add(p, n)
    log = _run_logged(gen)
    assert [r.tokens for r in gen.requests] == alone
    assert sorted(gen.cache.free_pages) == list(range(gen.cache.num_pages))
    joined_while_running = any(before & after and after - before for before, after in zip(log[:-1], log[1:], strict=True))
    assert joined_while_running, f"no prompt joined a running batch: {log}"
    return alone, log


def test_greedy_continuous_batching_equals_each_alone():
    """Reference backend: 7 requests, 3 rows, 4 pages (the first and fifth need 2)."""
    with fastlm.use_backend("torch"):
        alone, log = _greedy_case(PROMPTS, NEW, max_batch=3, num_pages=4)
    assert len(set(map(tuple, alone))) > 3, "the test needs varied tokens"
    assert max(map(len, log)) == 3


def test_greedy_continuous_batching_on_the_kernels():
    """The Triton kernels (interpreter: about a second per decode step): 3 requests on 2 rows."""
    _greedy_case([[5, 17, 3, 99], [64], [8, 9, 10]], [3, 1, 2], max_batch=2)


def test_sampled_continuous_batching_equals_each_alone_with_its_seed():
    """Reference backend (the Triton sampling kernel equals it bit for bit: tests/test_sampling.py)."""
    model = _model()
    kw = dict(temperature=1.0, top_p=0.9)
    seeds = [7, 7, -1, 2**40, 5, 0, 3]
    with fastlm.use_backend("torch"):
        alone = [model.generate([p], n, seed=s, **kw)[0] for p, n, s in zip(PROMPTS, NEW, seeds, strict=True)]
        out = generate_many(model, PROMPTS, NEW, max_batch=2, num_pages=3, seed=seeds, **kw)
        torch.manual_seed(123)
        a = generate_many(model, PROMPTS[:3], 4, max_batch=2, **kw)
        torch.manual_seed(123)
        b = generate_many(model, PROMPTS[:3], 4, max_batch=2, **kw)
    assert out == alone
    assert len(set(map(tuple, alone))) == len(PROMPTS)
    assert a == b  # unseeded requests draw their seeds from torch's CPU generator


def test_eos_finishes_a_sequence_and_frees_its_row():
    model = _model()
    with fastlm.use_backend("torch"):
        full = [model.generate([p], 7, temperature=0)[0] for p in PROMPTS[:4]]
        eos = next(t for t in full[0][1:] if any(t not in o for o in full[1:]))  # ends some sequences, not all
        alone = [model.generate([p], 7, temperature=0, eos_token_id=eos)[0] for p in PROMPTS[:4]]
        gen = BatchGenerator(model, max_batch=2, temperature=0, eos_token_id=eos)
        for p in PROMPTS[:4]:
            gen.add(p, 7)
        log = _run_logged(gen)
    assert any(len(o) < 7 for o in alone) and any(len(o) == 7 for o in alone)
    assert [r.tokens for r in gen.requests] == alone
    assert sorted(gen.cache.free_pages) == list(range(gen.cache.num_pages))
    assert len(log) < sum(len(o) for o in alone)  # rows were shared, not one request after another


def test_continuous_batching_errors():
    model = _model()
    gen = BatchGenerator(model, max_batch=2, num_pages=1, temperature=0)
    assert gen.add([1, 2, 3], 13) == 0  # the positive control: 16 tokens fill the one page
    with pytest.raises(ValueError, match=r"page pool \(1 pages of 16 tokens\) is too small for one sequence of 3 \+ 14 tokens"):
        gen.add([1, 2, 3], 14)
    with pytest.raises(ValueError, match="prompt of 25 tokens is longer than the model's context of 24"):
        gen.add([1] * 25, 0)
    with pytest.raises(ValueError, match="ask for at most 4 new tokens"):
        gen.add([1] * 20, 5)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 128\)"):
        gen.add([1, 128], 2)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 128\)"):
        gen.add([-1], 2)
    with pytest.raises(ValueError, match="at least one token"):
        gen.add([], 2)
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 0"):
        gen.add([1], -1)
    with pytest.raises(ValueError, match="max_batch must be an int >= 1"):
        BatchGenerator(model, max_batch=0)
    with pytest.raises(ValueError, match="page_size must be a power of two"):
        BatchGenerator(model, page_size=8)
    with pytest.raises(ValueError, match="needs a causal model"):
        BatchGenerator(_model(causal=False))
    with pytest.raises(ValueError, match="top_p must be in"):
        BatchGenerator(model, top_p=1.5)
    with pytest.raises(ValueError, match="one per prompt"):
        generate_many(model, [[1], [2]], [1, 2, 3])
    with pytest.raises(ValueError, match="one int64 per prompt"):
        generate_many(model, [[1], [2]], 1, seed=[1])
    with fastlm.use_backend("torch"):
        assert len(gen.run()[0]) == 13 and gen.done and gen.cache.free_pages == [0]
    with pytest.raises(TypeError, match="a prompt is one list of int token ids"):
        BatchGenerator(model).add([[1, 2], [3]], 2)
