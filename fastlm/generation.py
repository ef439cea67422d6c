"""Generation: a static KV cache, prefill through attention, decode through decode_attention.

The cache is a module with preallocated buffers, k and v of shape (n_layer, B, Hkv, S_max, D), and
``seqlens`` (B,) int32, the number of valid entries of each sequence. A batch of prompts of
different lengths is right-padded: the prefill runs ``fastlm.ops.attention(causal=True)`` over the
padded block (a prompt's tokens never see the padding after them), then each sequence's length is
set to its own prompt length, so its first new token overwrites its padding. Every decode step
writes the new k, v at each sequence's own position and calls ``fastlm.ops.decode_attention`` with
``seqlens + 1``; the positions (learned, sinusoidal or rotary) are the same per-sequence numbers.
Tokens come from ``fastlm.ops.sample`` (temperature 0: greedy).

On CUDA the decode step (model + sample) is captured once into a CUDA graph and replayed: nothing
in the loop waits for the GPU unless the caller streams tokens or stops at an EOS token (checked
every 32 steps without streaming).
"""

from __future__ import annotations

import warnings

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
        self.seeded_generator = torch.Generator(device=device)

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


def _as_prompts(prompts) -> list[list[int]]:
    if isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist()
    prompts = list(prompts)
    if prompts and not isinstance(prompts[0], (list, tuple)):
        prompts = [prompts]
    return [list(map(int, p)) for p in prompts]


class _Decoder:
    """One decode step, token (B,) -> next token (B,), eager or replayed from a CUDA graph."""

    def __init__(self, model, cache, sample_kw, generator, use_graph):
        self.model, self.cache, self.kw, self.gen = model, cache, sample_kw, generator
        self.graph = None
        if use_graph:
            try:
                self._capture()
            except Exception as exc:  # e.g. a backend that syncs with the host: run eagerly
                warnings.warn(f"fastlm.generate: CUDA graph capture failed, decoding eagerly ({type(exc).__name__}: {exc})", stacklevel=3)
                self.graph = None

    def _step(self, tok):
        logits = self.model(tok.clamp(min=0)[:, None], cache=self.cache)[:, -1]
        return ops.sample(logits, generator=self.gen, check=False, **self.kw)

    def _capture(self):
        cache = self.cache
        saved = cache.seqlens.clone()
        self.static_tok = torch.zeros(cache.batch, dtype=torch.long, device=cache.k.device)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: kernels compiled, autotuned and allocated outside the capture
                self._step(self.static_tok)
                cache.seqlens.copy_(saved)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self.gen is not None and hasattr(graph, "register_generator_state"):
            graph.register_generator_state(self.gen)
        with torch.cuda.graph(graph):
            self.static_out = self._step(self.static_tok)
        cache.seqlens.copy_(saved)
        self.graph = graph

    def __call__(self, tok):
        """The next tokens, a fresh tensor every step (a replay overwrites the graph's static_out)."""
        if self.graph is None:
            return self._step(tok)
        self.static_tok.copy_(tok)
        self.graph.replay()
        return self.static_out.clone()


@torch.no_grad()
def generate(model, prompts, max_new_tokens: int = 64, *, temperature: float = 1.0, top_k=None, top_p=None,
             min_p=None, seed: int | None = None, generator: torch.Generator | None = None,
             eos_token_id: int | None = None, stream=None, cuda_graph: bool | None = None,
             return_prefill_logits: bool = False):
    """New tokens for each prompt (a list of token ids, a list of such lists, or a (B, S) tensor).

    ``temperature=0`` is greedy decoding. ``stream(step, tokens)`` is called with each step's
    tokens (B,) as they come. A sequence stops at ``eos_token_id`` (kept in its output).
    ``cuda_graph`` (default: on for CUDA tensors) replays the captured decode step.
    ``return_prefill_logits``: also return the logits (B, V) that chose the first new token.
    """
    cfg = model.config
    if not cfg.causal:
        raise ValueError("generate needs a causal model (config.causal=True); this one is a bidirectional encoder")
    prompts = _as_prompts(prompts)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    lengths = [len(p) for p in prompts]
    longest = max(lengths)
    if longest > cfg.block_size:
        raise ValueError(f"prompt of {longest} tokens is longer than the model's context of {cfg.block_size} tokens")
    if longest + max_new_tokens > cfg.block_size:
        raise ValueError(
            f"prompt of {longest} tokens + max_new_tokens {max_new_tokens} exceed the model's context of "
            f"{cfg.block_size} tokens; ask for at most {cfg.block_size - longest} new tokens"
        )
    B = len(prompts)
    if max_new_tokens <= 0 and not return_prefill_logits:
        return [[] for _ in prompts]
    device = model.transformer.wte.weight.device
    was_training = model.training
    model.eval()
    try:
        cache = _cache_for(model, B, longest + max_new_tokens)
        cache.seqlens.zero_()
        if generator is None and seed is not None:  # one generator per cache, re-seeded: one graph, not one per seed
            generator = cache.seeded_generator.manual_seed(seed)
        kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
        use_graph = device.type == "cuda" if cuda_graph is None else bool(cuda_graph)
        key = (tuple(sorted(kw.items())), id(generator), use_graph)
        decoder = cache.graphs.get(key)
        if decoder is None or decoder.model is not model:
            if len(cache.graphs) >= 8:
                cache.graphs.clear()
            decoder = cache.graphs[key] = _Decoder(model, cache, kw, generator, use_graph)

        idx = torch.zeros(B, longest, dtype=torch.long)
        for b, p in enumerate(prompts):
            idx[b, : len(p)] = torch.tensor(p)
        idx = idx.to(device)
        lens = torch.tensor(lengths, device=device)
        cache.seqlens.zero_()
        logits = model(idx, cache=cache, prefill=True)
        cache.seqlens.copy_(lens)
        first = logits[torch.arange(B, device=device), lens - 1]
        tok = ops.sample(first, generator=generator, check=False, **kw)
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
    bad = [t for row in result for t in row if t < 0]
    if bad:  # fastlm.ops.sample's row status: NaN/inf logits, or a bad sampling parameter
        from fastlm.reference.sampling import STATUS_MESSAGES

        raise ValueError(f"generate: sampling failed: a row {STATUS_MESSAGES.get(bad[0], f'has status {bad[0]}')}")
    if return_prefill_logits:
        return result, first
    if eos_token_id is not None:
        result = [r[: r.index(eos_token_id) + 1] if eos_token_id in r else r for r in result]
    return result
