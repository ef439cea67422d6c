"""Generation: a static or a paged KV cache, prefill through attention / attention_varlen, decode
through decode_attention; continuous batching on the paged cache.

Which path runs: a batch whose prompts all have the same length uses the static cache (below);
a ragged batch uses the paged cache (PagedKVCache): its prefill is the packed forward (the
prompts one after another, ``fastlm.ops.attention_varlen``, no compute on padding) writing each
prompt's keys and values into its own pages, and each decode step runs ``fastlm.ops.paged_kv_append``
and ``fastlm.ops.decode_attention(block_table=...)``. On CUDA both paths capture the decode step
in a CUDA graph. ``BatchGenerator`` / ``generate_many`` run continuous batching on a paged cache:
sequences finish and waiting prompts join between decode steps (eagerly, one host sync a step).

Seeds: with ``seed=`` every sequence draws its own randomness, so it gets the tokens it gets
generated alone with that seed in any batch: its new token t (t = 0 for the token chosen by the
prefill logits) is ``fastlm.ops.sample`` of its logits row alone (row 0) with seed [seed, t]. An
int seed is every sequence's seed (identical prompts then continue identically); a list gives one
per prompt. Without a seed, each step draws one (key, offset) from the generator for the whole
batch (row b of the step is Philox row b), as ``fastlm.ops.sample`` does.

The static cache is a module with preallocated buffers, k and v of shape (n_layer, B, Hkv, S_max, D), and
``seqlens`` (B,) int32, the number of valid entries of each sequence: the prefill runs
``fastlm.ops.attention(causal=True)`` over the (B, S) prompts, and every decode step writes the new
k, v at each sequence's own position and calls ``fastlm.ops.decode_attention`` with ``seqlens + 1``;
the positions (learned, sinusoidal or rotary) are the same per-sequence numbers on both caches.
Tokens come from ``fastlm.ops.sample`` (temperature 0: greedy).

On CUDA the decode step (model + sample) is captured once into a CUDA graph and replayed: nothing
in the loop waits for the GPU unless the caller streams tokens or stops at an EOS token (checked
every 32 steps without streaming).
"""

from __future__ import annotations

import itertools
import warnings
from collections import deque

import torch
import torch.nn as nn

from fastlm import ops


class KVCache(nn.Module):
    def __init__(self, n_layer, batch, n_kv_head, max_seq_len, head_dim, dtype=torch.float32, device=None):
        super().__init__()
        shape = (n_layer, batch, n_kv_head, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("seqlens", torch.zeros(batch, dtype=torch.int32, device=device), persistent=False)
        self.graphs: dict = {}  # captured decode steps, by sampling settings

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_seq_len(self) -> int:
        return self.k.shape[3]

    def attend(self, layer, q, k, v, positions, prefill):
        """Store k, v (B, Hkv, S, D) at ``positions`` and attend q over each sequence's cache."""
        kc, vc = self.k[layer], self.v[layer]
        S = k.shape[2]
        if prefill:
            kc[:, :, :S] = k
            vc[:, :, :S] = v
            return ops.attention(q, k, v, causal=True)
        rows = torch.arange(q.shape[0], device=q.device)[:, None]
        kc[rows, :, positions] = k.transpose(1, 2).to(kc.dtype)
        vc[rows, :, positions] = v.transpose(1, 2).to(vc.dtype)
        return ops.decode_attention(q, kc, vc, self.seqlens + S)

    def advance(self, n: int) -> None:
        self.seqlens += n


def _cache_for(model, batch: int, max_seq_len: int) -> KVCache:
    """The model's cache, reallocated only when the batch, length, dtype or device changes."""
    cfg, w = model.config, model.transformer.wte.weight
    cache = model.__dict__.get("_fastlm_kv_cache")
    if cache is None or cache.batch != batch or cache.max_seq_len < max_seq_len or cache.k.dtype != w.dtype or cache.k.device != w.device:
        cache = KVCache(cfg.n_layer, batch, cfg.n_kv_head, max_seq_len, cfg.head_dim, w.dtype, w.device)
        model.__dict__["_fastlm_kv_cache"] = cache  # not a submodule: kept out of state_dict and .to()
    return cache


PAGE_SIZE = 16


class PagedKVCache(nn.Module):
    """A paged KV cache: per layer, k and v page pools (num_pages, Hkv, page_size, D) (buffers k, v of
    shape (n_layer, num_pages, Hkv, page_size, D)), and for the current batch of ``rows`` sequences a
    block table (rows, max_pages) int32 and lengths (rows,) int32 (views of buffers sized for
    ``max_batch`` rows): key j of row b lives at page block_table[b, j // page_size], slot
    j % page_size, the layout of ``fastlm.ops.decode_attention(block_table=...)``. The free pages are
    a host-side list: ``alloc`` takes pages for a sequence, ``release`` gives them back, and
    ``set_rows`` makes a list of sequences (their pages and lengths) the current batch (one
    host-to-device copy, no sync)."""

    def __init__(self, n_layer, num_pages, n_kv_head, page_size, head_dim, max_batch, max_pages, dtype=torch.float32,
                 device=None):
        super().__init__()
        if not (isinstance(page_size, int) and 16 <= page_size <= 256 and page_size & (page_size - 1) == 0):
            raise ValueError(f"PagedKVCache: page_size must be a power of two from 16 to 256, got {page_size!r}")
        for name, v in (("num_pages", num_pages), ("max_batch", max_batch), ("max_pages", max_pages)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"PagedKVCache: {name} must be an int >= 1, got {v!r}")
        shape = (n_layer, num_pages, n_kv_head, page_size, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("table", torch.zeros(max_batch, max_pages, dtype=torch.int32, device=device), persistent=False)
        self.register_buffer("lens", torch.zeros(max_batch, dtype=torch.int32, device=device), persistent=False)
        self.rows = max_batch
        self.free_pages = list(range(num_pages))
        self.slots = None  # (page, slot) of every packed token during a prefill
        self.graphs: dict = {}  # captured decode steps, by sampling settings

    @property
    def num_pages(self) -> int:
        return self.k.shape[1]

    @property
    def page_size(self) -> int:
        return self.k.shape[3]

    @property
    def max_pages(self) -> int:
        return self.table.shape[1]

    @property
    def batch(self) -> int:
        return self.rows

    @property
    def block_table(self) -> torch.Tensor:
        return self.table[: self.rows]

    @property
    def seqlens(self) -> torch.Tensor:
        return self.lens[: self.rows]

    def pages_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.page_size)

    def alloc(self, n_tokens: int) -> list[int]:
        """Pages for a sequence of up to n_tokens tokens, taken from the free list."""
        n = self.pages_for(n_tokens)
        if n > self.max_pages:
            raise ValueError(f"PagedKVCache: {n_tokens} tokens need {n} pages, more than a block-table row's {self.max_pages}")
        if n > len(self.free_pages):
            raise ValueError(f"PagedKVCache: {n_tokens} tokens need {n} pages but {len(self.free_pages)} of {self.num_pages} are free")
        pages, self.free_pages = self.free_pages[:n], self.free_pages[n:]
        return pages

    def release(self, pages: list[int]) -> None:
        self.free_pages.extend(pages)

    def reset(self) -> None:
        """Every page free, every length 0."""
        self.free_pages = list(range(self.num_pages))
        self.lens.zero_()

    def set_rows(self, pages: list[list[int]], lengths: list[int]) -> None:
        """The current batch: row b has the pages pages[b] and holds lengths[b] tokens."""
        n = len(pages)
        if n > self.table.shape[0]:
            raise ValueError(f"PagedKVCache: {n} rows exceed max_batch {self.table.shape[0]}")
        table = torch.zeros(n, self.max_pages, dtype=torch.int32)
        for b, p in enumerate(pages):
            table[b, : len(p)] = torch.tensor(p, dtype=torch.int32)
        self.rows = n
        self.block_table.copy_(table)
        self.seqlens.copy_(torch.tensor(lengths, dtype=torch.int32))

    def attend(self, layer, q, k, v, positions, prefill):
        """Decode: append k, v (B, Hkv, S, D) at each row's length and attend q over its pages."""
        if prefill:
            raise ValueError("PagedKVCache: a prefill runs packed (fastlm.generation.prefill_packed)")
        kc, vc = self.k[layer], self.v[layer]
        table, lens = self.block_table, self.seqlens
        ops.paged_kv_append(kc, vc, table, lens, k.to(kc.dtype), v.to(vc.dtype))
        return ops.decode_attention(q, kc, vc, lens + k.shape[2], block_table=table)

    def attend_packed(self, layer, q, k, v, cu_seqlens, max_seqlen):
        """Prefill: write packed k, v (T, Hkv, D) to the token slots ``self.slots`` and attend (causal)."""
        kc, vc = self.k[layer], self.v[layer]
        page, slot = self.slots
        kc[page, :, slot] = k.to(kc.dtype)
        vc[page, :, slot] = v.to(vc.dtype)
        return ops.attention_varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True)

    def advance(self, n: int) -> None:
        self.seqlens.add_(n)


def _paged_cache_for(model, batch: int, max_pages: int, num_pages: int) -> PagedKVCache:
    """The model's paged cache for generate, reallocated only when it is too small or the batch,
    dtype or device changes."""
    cfg, w = model.config, model.transformer.wte.weight
    cache = model.__dict__.get("_fastlm_paged_cache")
    if (cache is None or cache.table.shape[0] != batch or cache.max_pages < max_pages or cache.num_pages < num_pages
            or cache.k.dtype != w.dtype or cache.k.device != w.device):
        cache = PagedKVCache(cfg.n_layer, num_pages, cfg.n_kv_head, PAGE_SIZE, cfg.head_dim, batch, max_pages, w.dtype, w.device)
        model.__dict__["_fastlm_paged_cache"] = cache
    cache.reset()
    return cache


def prefill_packed(model, cache: PagedKVCache, prompts: list[list[int]], pages: list[list[int]]) -> torch.Tensor:
    """Run the prompts packed (``GPT``'s cu_seqlens form, attention_varlen), writing their keys and
    values into their pages; return the logits (n, V) of each prompt's last token. Token p of
    prompt b goes to page pages[b][p // page_size], slot p % page_size."""
    device = cache.k.device
    lengths = [len(p) for p in prompts]
    P = cache.page_size
    pos = [p for n in lengths for p in range(n)]
    page = [pg[p // P] for pg, n in zip(pages, lengths, strict=True) for p in range(n)]
    idx = torch.tensor([t for p in prompts for t in p], dtype=torch.long)[None].to(device)
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32).to(device)
    positions = torch.tensor(pos).to(device)
    cache.slots = (torch.tensor(page).to(device), positions % P)
    try:
        h = model._hidden(idx, positions, cache, True, (cu, max(lengths)))
    finally:
        cache.slots = None
    return model.logits(h[0, cu[1:].long() - 1])


def _as_prompts(prompts) -> list[list[int]]:
    if isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist()
    prompts = list(prompts)
    if prompts and not isinstance(prompts[0], (list, tuple)):
        prompts = [prompts]
    return [list(map(int, p)) for p in prompts]


def _sample(logits, kw, generator, seeds):
    """Tokens (B,) for logits (B, V): with seeds (B, 2) int64 [seed, t] each row alone with its own
    seed, then t += 1 (on the device); without, one batch-wide draw from the generator."""
    greedy = isinstance(kw.get("temperature"), (int, float)) and kw["temperature"] == 0
    if seeds is None or greedy:
        tok = ops.sample(logits, generator=generator, check=False, **kw)
    else:
        rows = [{k: v[b : b + 1] if isinstance(v, torch.Tensor) else v for k, v in kw.items()} for b in range(logits.shape[0])]
        tok = torch.cat([ops.sample(logits[b : b + 1], seed=seeds[b], check=False, **rows[b]) for b in range(logits.shape[0])])
    if seeds is not None:
        seeds[:, 1] += 1
    return tok


def _seed_rows(seed, n: int) -> list[int]:
    """One int64 seed per sequence from an int (every sequence) or a list of n ints."""
    seeds = [seed] * n if isinstance(seed, int) and not isinstance(seed, bool) else list(seed) if isinstance(seed, (list, tuple)) else None
    if seeds is None or len(seeds) != n or not all(isinstance(x, int) and not isinstance(x, bool) and -(2**63) <= x < 2**63 for x in seeds):
        raise ValueError(f"generate: seed must be an int64 or a list of one int64 per prompt ({n}), got {seed!r}")
    return seeds


class _Decoder:
    """One decode step, token (B,) -> next token (B,), eager or replayed from a CUDA graph. With
    ``seeded`` the step samples every row with its own seed from ``self.seeds`` (B, 2) (see _sample)."""

    def __init__(self, model, cache, sample_kw, generator, use_graph, seeded=False):
        self.model, self.cache, self.kw, self.gen = model, cache, sample_kw, generator
        self.seeds = torch.zeros(cache.batch, 2, dtype=torch.int64, device=cache.k.device) if seeded else None
        self.graph = None
        if use_graph:
            try:
                self._capture()
            except Exception as exc:  # e.g. a backend that syncs with the host: run eagerly
                warnings.warn(f"fastlm.generate: CUDA graph capture failed, decoding eagerly ({type(exc).__name__}: {exc})", stacklevel=3)
                self.graph = None

    def _step(self, tok):
        logits = self.model(tok.clamp(min=0)[:, None], cache=self.cache)[:, -1]
        return _sample(logits, self.kw, self.gen, self.seeds)

    def _capture(self):
        cache = self.cache
        saved = cache.seqlens.clone()
        saved_seeds = None if self.seeds is None else self.seeds.clone()

        def restore():
            cache.seqlens.copy_(saved)
            if saved_seeds is not None:
                self.seeds.copy_(saved_seeds)

        self.static_tok = torch.zeros(cache.batch, dtype=torch.long, device=cache.k.device)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: kernels compiled, autotuned and allocated outside the capture
                self._step(self.static_tok)
                restore()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self.gen is not None and hasattr(graph, "register_generator_state"):
            graph.register_generator_state(self.gen)
        with torch.cuda.graph(graph):
            self.static_out = self._step(self.static_tok)
        restore()
        self.graph = graph

    def __call__(self, tok):
        """The next tokens, a fresh tensor every step (a replay overwrites the graph's static_out)."""
        if self.graph is None:
            return self._step(tok)
        self.static_tok.copy_(tok)
        self.graph.replay()
        return self.static_out.clone()


def _check_sequences(cfg, prompts, max_new_tokens, where="generate"):
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError(f"{where}: every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    if longest > cfg.block_size:
        raise ValueError(f"prompt of {longest} tokens is longer than the model's context of {cfg.block_size} tokens")
    if longest + max_new_tokens > cfg.block_size:
        raise ValueError(
            f"prompt of {longest} tokens + max_new_tokens {max_new_tokens} exceed the model's context of "
            f"{cfg.block_size} tokens; ask for at most {cfg.block_size - longest} new tokens"
        )


@torch.no_grad()
def generate(model, prompts, max_new_tokens: int = 64, *, temperature: float = 1.0, top_k=None, top_p=None,
             min_p=None, seed=None, generator: torch.Generator | None = None,
             eos_token_id: int | None = None, stream=None, cuda_graph: bool | None = None,
             return_prefill_logits: bool = False):
    """New tokens for each prompt (a list of token ids, a list of such lists, or a (B, S) tensor).

    ``temperature=0`` is greedy decoding. ``seed``: an int (every sequence's seed) or a list of one
    int per prompt; each sequence then gets exactly the tokens it gets generated alone with its seed
    (module doc). ``stream(step, tokens)`` is called with each step's tokens (B,) as they come. A
    sequence stops at ``eos_token_id`` (kept in its output). Prompts of one length run on the
    static cache, a ragged batch on the paged cache (packed prefill, no compute on padding).
    ``cuda_graph`` (default: on for CUDA tensors) replays the captured decode step.
    ``return_prefill_logits``: also return the logits (B, V) that chose the first new token.
    """
    cfg = model.config
    if not cfg.causal:
        raise ValueError("generate needs a causal model (config.causal=True); this one is a bidirectional encoder")
    prompts = _as_prompts(prompts)
    _check_sequences(cfg, prompts, max_new_tokens)
    lengths = [len(p) for p in prompts]
    longest = max(lengths)
    B = len(prompts)
    if seed is not None and generator is not None:
        raise ValueError("generate: pass seed or generator, not both")
    seeds = None if seed is None else _seed_rows(seed, B)
    if max_new_tokens <= 0 and not return_prefill_logits:
        return [[] for _ in prompts]
    device = model.transformer.wte.weight.device
    ragged = len(set(lengths)) > 1
    was_training = model.training
    model.eval()
    try:
        if ragged:
            cache = _paged_cache_for(model, B, -(-(longest + max_new_tokens) // PAGE_SIZE),
                                     sum(-(-(n + max_new_tokens) // PAGE_SIZE) for n in lengths))
        else:
            cache = _cache_for(model, B, longest + max_new_tokens)
            cache.seqlens.zero_()
        kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
        use_graph = device.type == "cuda" if cuda_graph is None else bool(cuda_graph)
        key = (tuple(sorted(kw.items())), id(generator), use_graph, seeds is not None)
        decoder = cache.graphs.get(key)
        if decoder is None or decoder.model is not model:
            if len(cache.graphs) >= 8:
                cache.graphs.clear()
            decoder = cache.graphs[key] = _Decoder(model, cache, kw, generator, use_graph, seeded=seeds is not None)
        if seeds is not None:
            decoder.seeds.copy_(torch.tensor([[s, 0] for s in seeds], dtype=torch.int64))

        if ragged:
            pages = [cache.alloc(n + max_new_tokens) for n in lengths]
            first = prefill_packed(model, cache, prompts, pages)
            cache.set_rows(pages, lengths)
        else:
            idx = torch.tensor(prompts, dtype=torch.long).to(device)
            first = model(idx, cache=cache, prefill=True)[:, -1]
        tok = _sample(first, kw, generator, decoder.seeds)
        out = torch.empty(B, max(max_new_tokens, 0), dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        for i in range(max_new_tokens):
            if i:
                tok = decoder(tok)
            out[:, i] = tok
            if stream is not None:
                stream(i, tok)
            if eos_token_id is not None:
                done |= tok == eos_token_id
                if (stream is not None or i % 32 == 31) and bool(done.all()):
                    out = out[:, : i + 1]
                    break
    finally:
        model.train(was_training)
    result = out.tolist()
    _raise_for_status(result, "generate")
    if return_prefill_logits:
        return result, first
    if eos_token_id is not None:
        result = [r[: r.index(eos_token_id) + 1] if eos_token_id in r else r for r in result]
    return result


def _raise_for_status(rows, where):
    bad = [t for row in rows for t in row if t < 0]
    if bad:  # fastlm.ops.sample's row status: NaN/inf logits, or a bad sampling parameter
        from fastlm.reference.sampling import STATUS_MESSAGES

        raise ValueError(f"{where}: sampling failed: a row {STATUS_MESSAGES.get(bad[0], f'has status {bad[0]}')}")


class _Request:
    __slots__ = ("id", "prompt", "max_new", "seed", "tokens", "pages")

    def __init__(self, rid, prompt, max_new, seed):
        self.id, self.prompt, self.max_new, self.seed = rid, prompt, max_new, seed
        self.tokens: list[int] = []
        self.pages: list[int] = []


class BatchGenerator:
    """Continuous batching on a paged KV cache.

    ``add(prompt, max_new_tokens, seed=None)`` queues a request and returns its id; each ``step()``
    runs one decode step for the running sequences, retires those that are done (``eos_token_id``,
    kept, or their own max_new_tokens) and gives their pages back, then admits waiting prompts
    (first come, first served) while a batch row (``max_batch``) and the pages for the prompt plus
    its max_new_tokens are free, prefilling them in one packed forward (attention_varlen); it
    returns the (request id, token) pairs it produced. ``run()`` steps until every request is done
    and returns the tokens per request, in the order added. A sequence's pages are reserved when it
    joins (ceil((prompt + max_new_tokens) / page_size)), so no running sequence is ever evicted.

    Every request gets exactly the tokens ``generate`` gives its prompt alone with the same
    sampling settings and seed: its token t is ``fastlm.ops.sample`` of its own logits row with seed
    [seed, t] (a request without a seed draws one from torch's default CPU generator when added).
    The pool: ``num_pages`` pages of ``page_size`` tokens (default: enough for max_batch sequences
    of the full context). Decoding is eager, with one host sync per step (reading the new tokens).
    """

    def __init__(self, model, *, max_batch: int = 8, num_pages: int | None = None, page_size: int = PAGE_SIZE,
                 temperature: float = 1.0, top_k=None, top_p=None, min_p=None, eos_token_id: int | None = None):
        cfg = model.config
        if not cfg.causal:
            raise ValueError("BatchGenerator needs a causal model (config.causal=True); this one is a bidirectional encoder")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"BatchGenerator: max_batch must be an int >= 1, got {max_batch!r}")
        if eos_token_id is not None and not (isinstance(eos_token_id, int) and 0 <= eos_token_id < cfg.vocab_size):
            raise ValueError(f"BatchGenerator: eos_token_id must be None or a token id in [0, {cfg.vocab_size}), got {eos_token_id!r}")
        for name, v in (("top_k", top_k), ("top_p", top_p), ("min_p", min_p), ("temperature", temperature)):
            if isinstance(v, torch.Tensor):
                raise TypeError(f"BatchGenerator: {name} must be a number or None (one setting for every request), got a tensor")
        ops.sample(torch.zeros(1, 1), temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, backend="torch")  # checks them
        self.model, self.eos = model, eos_token_id
        self.kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
        max_pages = -(-cfg.block_size // page_size) if isinstance(page_size, int) else 1
        w = model.transformer.wte.weight
        self.cache = PagedKVCache(cfg.n_layer, max_batch * max_pages if num_pages is None else num_pages, cfg.n_kv_head,
                                  page_size, cfg.head_dim, max_batch, max_pages, w.dtype, w.device)
        self.cache.set_rows([], [])
        self.waiting: deque[_Request] = deque()
        self.running: list[_Request] = []
        self.requests: list[_Request] = []

    @property
    def done(self) -> bool:
        return not self.waiting and not self.running

    def add(self, prompt, max_new_tokens: int, *, seed: int | None = None) -> int:
        """Queue a prompt (token ids); returns its request id (0, 1, ... in the order added)."""
        cfg, cache = self.model.config, self.cache
        ids = list(prompt.tolist() if isinstance(prompt, torch.Tensor) else prompt)
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise TypeError(f"BatchGenerator.add: a prompt is one list of int token ids, got {str(ids)[:60]}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"BatchGenerator.add: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        _check_sequences(cfg, [ids], max_new_tokens, "BatchGenerator.add")
        bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"BatchGenerator.add: token ids must lie in [0, {cfg.vocab_size}) (the vocabulary size), got {bad[:5]}")
        need = cache.pages_for(len(ids) + max_new_tokens)
        if need > cache.num_pages:
            raise ValueError(f"BatchGenerator.add: the page pool ({cache.num_pages} pages of {cache.page_size} tokens) is too small "
                             f"for one sequence of {len(ids)} + {max_new_tokens} tokens ({need} pages); pass a larger num_pages")
        if seed is None:
            seed = int(torch.randint(-(2**63), 2**63 - 1, (1,)))
        seed = _seed_rows(seed, 1)[0]
        req = _Request(len(self.requests), ids, max_new_tokens, seed)
        self.requests.append(req)
        if max_new_tokens > 0:
            self.waiting.append(req)
        return req.id

    def _finished(self, req) -> bool:
        return len(req.tokens) >= req.max_new or (self.eos is not None and req.tokens[-1] == self.eos)

    def _sample(self, logits, reqs) -> list[int]:
        seeds = torch.tensor([[r.seed, len(r.tokens)] for r in reqs], dtype=torch.int64).to(logits.device)
        tokens = _sample(logits, self.kw, None, seeds).tolist()
        _raise_for_status([tokens], "BatchGenerator")
        for r, t in zip(reqs, tokens, strict=True):
            r.tokens.append(t)
        return tokens

    @torch.no_grad()
    def step(self) -> list[tuple[int, int]]:
        """One decode step, then retire finished sequences and admit waiting prompts (see the class doc)."""
        model, cache = self.model, self.cache
        out = []
        was_training = model.training
        model.eval()
        try:
            if self.running:
                tok = torch.tensor([r.tokens[-1] for r in self.running]).to(cache.k.device)
                logits = model(tok[:, None], cache=cache)[:, -1]
                out += zip([r.id for r in self.running], self._sample(logits, self.running), strict=True)
            keep = [r for r in self.running if not self._finished(r)]
            for r in self.running:
                if not self._finished(r):
                    continue
                cache.release(r.pages)
                r.pages = []
            joining = []
            while self.waiting and len(keep) + len(joining) < cache.table.shape[0] and (
                    cache.pages_for(len(self.waiting[0].prompt) + self.waiting[0].max_new) <= len(cache.free_pages)):
                r = self.waiting.popleft()
                r.pages = cache.alloc(len(r.prompt) + r.max_new)
                joining.append(r)
            if joining:
                first = prefill_packed(model, cache, [r.prompt for r in joining], [r.pages for r in joining])
                out += zip([r.id for r in joining], self._sample(first, joining), strict=True)
                for r in joining:
                    if self._finished(r):
                        cache.release(r.pages)
                        r.pages = []
                    else:
                        keep.append(r)
            if keep != self.running or joining:
                lengths = [len(r.prompt) + len(r.tokens) - 1 for r in keep]  # the last token is not in the cache yet
                cache.set_rows([r.pages for r in keep], lengths)
            self.running = keep
        finally:
            model.train(was_training)
        return out

    def run(self) -> list[list[int]]:
        """Step until every request is done; the new tokens of each request, in the order added."""
        while not self.done:
            self.step()
        return [r.tokens for r in self.requests]


def generate_many(model, prompts, max_new_tokens, *, max_batch: int = 8, eos_token_id: int | None = None, seed=None,
                  temperature: float = 1.0, top_k=None, top_p=None, min_p=None, num_pages: int | None = None,
                  page_size: int = PAGE_SIZE) -> list[list[int]]:
    """New tokens for each prompt through continuous batching (BatchGenerator): at most ``max_batch``
    sequences decode together, a finished one's row and pages go to the next waiting prompt.
    ``max_new_tokens``: an int or one per prompt; ``seed``: None, an int (every request's) or one per
    prompt. Each result equals ``generate`` of that prompt alone with the same settings and seed."""
    prompts = _as_prompts(prompts)
    n = len(prompts)
    news = [max_new_tokens] * n if isinstance(max_new_tokens, int) and not isinstance(max_new_tokens, bool) else list(max_new_tokens)
    seeds = [None] * n if seed is None else _seed_rows(seed, n)
    if len(news) != n:
        raise ValueError(f"generate_many: max_new_tokens must be an int or one per prompt ({n}), got {len(news)}")
    gen = BatchGenerator(model, max_batch=max_batch, num_pages=num_pages, page_size=page_size, temperature=temperature,
                         top_k=top_k, top_p=top_p, min_p=min_p, eos_token_id=eos_token_id)
    for p, m, s in zip(prompts, news, seeds, strict=True):
        gen.add(p, m, seed=s)
    return gen.run()
