"""The thin GPT on fastlm's fused ops, in one file (nanoGPT / gpt-fast style).

    tokens -> embedding (+ learned | sinusoidal positions, or rotary inside attention)
           -> n_layer x [ pre-norm -> attention -> residual, pre-norm -> GELU MLP -> residual ]
           -> final norm -> logits for every next token

``norm_placement="post"`` is the original Transformer's and BERT's order instead: a norm ``ln_e``
on the summed embeddings, then every block h = ln_1(h + attn(h)); h = ln_2(h + mlp(h)) (the normed
value is the residual stream), and no final norm. ``mlm_head`` puts BERT's prediction head
(dense -> GELU -> norm) before a biased ``lm_head``.

Every norm (``fastlm.ops.add_layer_norm`` / ``add_rms_norm``: the residual add fused with the next
norm), attention, positional encoding and sampling call goes through ``fastlm.ops``, so the model
follows ``fastlm.use_backend``. With ``causal=False`` it is a bidirectional encoder (BERT's
shape). ``n_kv_head < n_head`` gives grouped-query attention. ``GPT.from_pretrained`` reads local
Hugging Face GPT-2 and BERT directories and fastlm checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import math
import stat
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastlm import ops
from fastlm.nn import LayerNorm, RMSNorm

PRESETS = {
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=128, vocab_size=4096),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024, vocab_size=50257),
}


@dataclasses.dataclass
class GPTConfig:
    vocab_size: int = 50257
    block_size: int = 1024  # the context: the longest sequence the model sees
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_kv_head: int | None = None  # None: = n_head; fewer: grouped-query attention
    norm: str = "layernorm"  # "layernorm" | "rmsnorm"
    positions: str = "learned"  # "learned" | "sinusoidal" | "rotary"
    causal: bool = True  # False: a bidirectional encoder
    tie_embeddings: bool = True
    bias: bool = True
    dropout: float = 0.0
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    gelu: str = "tanh"  # "tanh" (GPT-2's gelu_new) | "none" (exact erf)
    norm_placement: str = "pre"  # "pre" (GPT-2) | "post" (BERT: norm after each residual add, ln_e, no ln_f)
    mlm_head: bool = False  # BERT's prediction head (dense -> GELU -> norm) before a biased lm_head

    def __post_init__(self):
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        for f in dataclasses.fields(self):
            v, t = getattr(self, f.name), str(f.type)
            if "int" in t and not (isinstance(v, int) and not isinstance(v, bool)):
                raise TypeError(f"GPTConfig: {f.name} must be an integer, got {v!r}")
            if "float" in t and not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)):
                raise TypeError(f"GPTConfig: {f.name} must be a finite number, got {v!r}")
            if "bool" in t and not isinstance(v, bool):
                raise TypeError(f"GPTConfig: {f.name} must be true or false, got {v!r}")
        sizes = {k: getattr(self, k) for k in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "n_kv_head")}
        if min(sizes.values()) <= 0:
            raise ValueError(f"GPTConfig: sizes must be positive, got {', '.join(f'{k}={v}' for k, v in sizes.items() if v <= 0)}")
        checks = [
            (0 <= self.dropout < 1, f"dropout must lie in [0, 1), got {self.dropout}"),
            (self.norm_eps > 0 and self.rope_theta > 0, f"norm_eps and rope_theta must be positive, got {self.norm_eps}, {self.rope_theta}"),
            (self.norm in ("layernorm", "rmsnorm"), f"norm must be 'layernorm' or 'rmsnorm', got {self.norm!r}"),
            (self.positions in ("learned", "sinusoidal", "rotary"), f"positions must be 'learned', 'sinusoidal' or 'rotary', got {self.positions!r}"),
            (self.gelu in ("tanh", "none"), f"gelu must be 'tanh' or 'none', got {self.gelu!r}"),
            (self.norm_placement in ("pre", "post"), f"norm_placement must be 'pre' or 'post', got {self.norm_placement!r}"),
            (not (self.mlm_head and self.causal), "mlm_head (BERT's masked-LM head) is for a bidirectional model: "
                                                  "it needs causal=False, got causal=True"),
            (self.n_embd % self.n_head == 0, f"n_embd {self.n_embd} must be a multiple of n_head {self.n_head}"),
            (self.n_head % self.n_kv_head == 0, f"n_head {self.n_head} must be a multiple of n_kv_head {self.n_kv_head}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"GPTConfig: {msg}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_preset(cls, name: str, **overrides) -> GPTConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown GPT preset {name!r}; presets: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        if not isinstance(d, dict):
            raise TypeError(f"GPTConfig.from_dict: expected a dict, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"GPTConfig: unknown field(s) {', '.join(sorted(unknown))}")
        return cls(**d)


# Sizes past these are refused before a model is built from an untrusted config (gpt2-medium is 24 x 1024).
LIMITS = dict(vocab_size=1 << 22, block_size=1 << 20, n_layer=1024, n_head=1024, n_embd=1 << 16)


def check_limits(cfg: GPTConfig) -> None:
    """ValueError if a size of ``cfg`` exceeds LIMITS."""
    over = [f"{k}={getattr(cfg, k)} (at most {v})" for k, v in LIMITS.items() if getattr(cfg, k) > v]
    if over:
        raise ValueError(f"GPTConfig: sizes beyond fastlm's limits: {', '.join(over)}")


def _check_ids(idx, vocab_size: int) -> None:
    if idx.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"GPT: token ids must be an integer tensor, got {idx.dtype}")
    if idx.numel():
        lo, hi = (int(v) for v in idx.aminmax())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"GPT: token ids must lie in [0, {vocab_size}) (the vocabulary size), got ids from {lo} to {hi}")


def _check_packed(idx, cu_seqlens, max_seqlen, block_size: int) -> int:
    """Validate the packed form (idx (1, T), cu_seqlens int32 (B + 1,) prefix sums from 0 to T, no
    sequence longer than block_size) and return max_seqlen (the longest sequence when None). The
    values are read on the host (one sync on CUDA) except while compiling, where max_seqlen is required."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or len(cu_seqlens) < 2:
        what = f"{cu_seqlens.dtype} of shape {list(cu_seqlens.shape)}" if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens).__name__
        raise ValueError(f"GPT: cu_seqlens must be an int32 tensor (B + 1,) of prefix sums with B >= 1, got {what}")
    if cu_seqlens.device != idx.device:
        raise ValueError(f"GPT: cu_seqlens is on {cu_seqlens.device} but idx is on {idx.device}")
    if idx.dim() != 2 or idx.shape[0] != 1:
        raise ValueError(f"GPT: with cu_seqlens, idx must be (1, total) packed tokens, got shape {list(idx.shape)}")
    if max_seqlen is not None and (isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0):
        raise ValueError(f"GPT: max_seqlen must be None or an int >= 0, got {max_seqlen!r}")
    if torch.compiler.is_compiling():
        if max_seqlen is None:
            raise ValueError("GPT: under torch.compile the packed form needs max_seqlen")
        return max_seqlen
    cu = cu_seqlens.tolist()
    lens = [b - a for a, b in zip(cu[:-1], cu[1:], strict=True)]
    if cu[0] != 0 or min(lens) < 0 or cu[-1] != idx.shape[1]:
        raise ValueError(f"GPT: cu_seqlens must rise from 0 to the {idx.shape[1]} packed tokens without decreasing, got {cu[:8]}"
                         + (" ..." if len(cu) > 8 else ""))
    longest = max(lens)
    if longest > block_size:
        b = lens.index(longest)
        raise ValueError(f"GPT: packed sequence {b} of length {longest} is longer than the context (block_size {block_size})")
    if max_seqlen is not None and max_seqlen < longest:
        raise ValueError(f"GPT: max_seqlen {max_seqlen} is below the longest packed sequence ({longest} tokens)")
    return longest if max_seqlen is None else max_seqlen


def packed_positions(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Positions (total,) int64 restarting at 0 in every sequence of cu_seqlens (on the device, no sync)."""
    t = torch.arange(total, device=cu_seqlens.device, dtype=torch.int32)
    seq = torch.searchsorted(cu_seqlens[1:], t, right=True).clamp_max(len(cu_seqlens) - 2)
    return (t - cu_seqlens[seq]).long()


def _add_norm(norm: nn.Module, h: torch.Tensor, delta: torch.Tensor | None):
    """(norm(h + delta), h + delta) in one fused op; (norm(h), h) without a delta."""
    if delta is None:
        return norm(h), h
    delta = delta.to(h.dtype)  # under autocast the branch is bf16 and the residual stream fp32
    if isinstance(norm, RMSNorm):
        return ops.add_rms_norm(delta, h, norm.weight, norm.eps)
    return ops.add_layer_norm(delta, h, norm.weight, norm.bias, norm.eps)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        H, Hkv, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.c_attn = nn.Linear(cfg.n_embd, (H + 2 * Hkv) * D, bias=cfg.bias)
        self.c_proj = nn.Linear(H * D, cfg.n_embd, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, positions, cache=None, prefill=False, packed=None):
        """packed: None, or (cu_seqlens, max_seqlen) for x (1, T, C) holding the sequences one after another."""
        cfg = self.cfg
        B, S, _ = x.shape
        H, Hkv, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        q, k, v = self.c_attn(x).split([H * D, Hkv * D, Hkv * D], dim=-1)
        q = q.view(B, S, H, D).transpose(1, 2)  # (B, H, S, D)
        k = k.view(B, S, Hkv, D).transpose(1, 2)
        v = v.view(B, S, Hkv, D).transpose(1, 2)
        if cfg.positions == "rotary":
            q, k = ops.rotary(q, k, positions, theta=cfg.rope_theta)
        if packed is not None:
            cu, max_seqlen = packed
            q3, k3, v3 = q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1)  # (T, H, D)
            if cache is None:
                y3 = ops.attention_varlen(q3, k3, v3, cu, cu, max_seqlen, max_seqlen, causal=cfg.causal)
            else:
                y3 = cache.attend_packed(self.layer, q3, k3, v3, cu, max_seqlen)
            y = y3.transpose(0, 1)[None]
        elif cache is None:
            y = ops.attention(q, k, v, causal=cfg.causal)
        else:
            y = cache.attend(self.layer, q, k, v, positions, prefill)
        y = y.transpose(1, 2).reshape(B, S, H * D)
        return self.drop(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)
        self.approximate = cfg.gelu

    def forward(self, x):
        return self.drop(self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate)))


def _make_norm(cfg: GPTConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
    return LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


class Head(nn.Module):
    """BERT's masked-LM prediction transform: norm(GELU(c_fc(h)))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc, self.ln, self.approximate = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias), _make_norm(cfg), cfg.gelu

    def forward(self, h):
        return self.ln(F.gelu(self.c_fc(h), approximate=self.approximate))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.ln_1, self.attn, self.ln_2, self.mlp = _make_norm(cfg), Attention(cfg, layer), _make_norm(cfg), MLP(cfg)
        self.post = cfg.norm_placement == "post"

    def forward(self, h, delta, positions, cache=None, prefill=False, packed=None):
        """h: the residual stream; delta: the previous block's MLP output, not yet added to it (pre-norm;
        post-norm blocks take and return None: their output h is already normed)."""
        if self.post:
            h, _ = _add_norm(self.ln_1, h, self.attn(h, positions, cache, prefill, packed))
            h, _ = _add_norm(self.ln_2, h, self.mlp(h))
            return h, None
        y, h = _add_norm(self.ln_1, h, delta)
        a = self.attn(y, positions, cache, prefill, packed)
        y, h = _add_norm(self.ln_2, h, a)
        return h, self.mlp(y)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = cfg = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layer)]),
        ))
        self.transformer["ln_e" if cfg.norm_placement == "post" else "ln_f"] = _make_norm(cfg)
        if cfg.positions == "learned":
            self.transformer["wpe"] = nn.Embedding(cfg.block_size, cfg.n_embd)
        if cfg.mlm_head:
            self.transformer["head"] = Head(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=cfg.mlm_head)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2: residual projections scaled by 1/sqrt(2 L)
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding=True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 N + 12 L H D T (PaLM appendix B, as nanoGPT counts them)."""
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.n_head * c.head_dim * seq_len

    def embed(self, idx, positions, generating=False):
        wte, cfg = self.transformer.wte, self.config
        if cfg.positions == "sinusoidal":
            x = ops.embed_sinusoidal(idx, wte.weight, positions=positions, check=not generating)
        elif cfg.positions == "learned":
            x = wte(idx) + self.transformer.wpe(positions)
        else:
            x = wte(idx)
        if cfg.norm_placement == "post":
            x = self.transformer.ln_e(x)
        return self.transformer.drop(x)

    def forward(self, idx, targets=None, *, cache=None, prefill=False, positions=None, cu_seqlens=None, max_seqlen=None):
        """Logits (B, S, V) for idx (B, S), and the mean next-token cross-entropy if targets are given
        (ignore_index -100).

        With a KV cache (fastlm.generation.KVCache) the tokens are appended at each sequence's
        cache length (the positions follow from it); ``prefill`` says the cache starts empty.

        Packed form: with ``cu_seqlens`` (int32 (B + 1,) prefix sums from 0 to T) idx is (1, T), the
        B sequences one after another, and so are the logits (1, T, V) and targets (1, T). Every
        sequence is the model run on it alone: positions restart at 0 in each (unless ``positions``
        (T,) gives them), attention is ``fastlm.ops.attention_varlen`` (causal per sequence when
        config.causal), so no token sees another sequence and no compute is spent on padding.
        ``max_seqlen`` (the longest sequence) is read from cu_seqlens when None (a host sync on CUDA).
        """
        if cu_seqlens is not None and cache is not None:
            raise ValueError("GPT: cu_seqlens with a cache: a packed batch runs without a KV cache here "
                             "(fastlm.generation prefills a ragged batch into its paged cache itself)")
        if cu_seqlens is not None:
            h = self.hidden_states(idx, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, positions=positions)
            logits = self.logits(h)
            return logits if targets is None else (logits, self._loss(logits, targets))
        B, S = idx.shape
        if cache is None and not torch.compiler.is_compiling():
            _check_ids(idx, self.config.vocab_size)
        if cache is None and S > self.config.block_size:
            raise ValueError(f"sequence length {S} is longer than the context (block_size {self.config.block_size})")
        if positions is None:
            if cache is not None and not prefill:
                positions = cache.seqlens.long()[:, None] + torch.arange(S, device=idx.device)
            else:
                positions = torch.arange(S, device=idx.device)
        logits = self.logits(self._hidden(idx, positions, cache, prefill))
        if cache is not None:
            cache.advance(S)
        if targets is None:
            return logits
        return logits, self._loss(logits, targets)

    def logits(self, h):
        """lm_head (after the mlm head when config.mlm_head) on hidden states h (..., n_embd)."""
        return self.lm_head(self.transformer.head(h) if self.config.mlm_head else h)

    @staticmethod
    def _loss(logits, targets):
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)

    def _hidden(self, idx, positions, cache=None, prefill=False, packed=None):
        h, delta = self.embed(idx, positions, cache is not None), None
        for block in self.transformer.h:
            h, delta = block(h, delta, positions, cache, prefill, packed)
        if self.config.norm_placement == "post":
            return h
        y, _ = _add_norm(self.transformer.ln_f, h, delta)
        return y

    def hidden_states(self, idx, *, cu_seqlens=None, max_seqlen=None, positions=None):
        """The final hidden states (B, S, n_embd) for idx (B, S): what the mlm head or lm_head (or a task
        head) reads: ln_f's output (pre-norm), the last block's output (post-norm, already normed).

        With ``cu_seqlens`` the packed form of ``forward``: idx (1, T), hidden states (1, T, n_embd).
        """
        if not torch.compiler.is_compiling():
            if not isinstance(idx, torch.Tensor) or idx.dim() != 2:
                raise ValueError(f"GPT: idx must be a (B, S) tensor of token ids, got {getattr(idx, 'shape', type(idx).__name__)}")
            _check_ids(idx, self.config.vocab_size)
        B, S = idx.shape
        packed = None
        if cu_seqlens is not None:
            packed = (cu_seqlens, _check_packed(idx, cu_seqlens, max_seqlen, self.config.block_size))
            if positions is None:
                positions = packed_positions(cu_seqlens, S)
            elif tuple(positions.shape) not in ((S,), (1, S)):
                raise ValueError(f"GPT: with cu_seqlens, positions must be (T,) = ({S},) per-token positions, got {list(positions.shape)}")
            positions = positions.reshape(S)
        elif S > self.config.block_size:
            raise ValueError(f"sequence length {S} is longer than the context (block_size {self.config.block_size})")
        if positions is None:
            positions = torch.arange(S, device=idx.device)
        return self._hidden(idx, positions, packed=packed)

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens: int = 64, **kwargs):
        """Continue each prompt (token ids; a batch may mix lengths). See fastlm.generation.generate."""
        from fastlm.generation import _as_prompts, generate

        V = self.config.vocab_size
        bad = [t for p in _as_prompts(prompts) for t in p if not 0 <= t < V]
        if bad:
            raise ValueError(f"GPT.generate: token ids must lie in [0, {V}) (the vocabulary size), got {bad[:5]}")
        return generate(self, prompts, max_new_tokens, **kwargs)

    @classmethod
    def from_pretrained(cls, path, **overrides) -> GPT:
        """A local Hugging Face GPT-2 or BERT checkpoint directory (config.json model_type gpt2 or
        bert; see ``_from_bert``), or a fastlm checkpoint directory."""
        path = Path(path)
        try:
            hf = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: config.json is unreadable or not JSON ({exc})") from None
        if isinstance(hf, dict) and hf.get("model_type") == "bert":
            return cls._from_bert(path, hf, **overrides)
        if not isinstance(hf, dict) or hf.get("model_type") != "gpt2":
            from fastlm.training import load_model

            return load_model(path)
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
            raise ValueError(f"{path}: activation_function {act!r} is not supported (gelu_new or gelu)")
        try:
            cfg = GPTConfig(
                vocab_size=hf["vocab_size"], block_size=hf["n_positions"], n_layer=hf["n_layer"], n_head=hf["n_head"],
                n_embd=hf["n_embd"], norm_eps=hf.get("layer_norm_epsilon", 1e-5), gelu="none" if act == "gelu" else "tanh",
                tie_embeddings=hf.get("tie_word_embeddings", True), **overrides,
            )
            check_limits(cfg)
        except KeyError as exc:
            raise ValueError(f"{path}: config.json has no {exc.args[0]!r}") from None
        except TypeError as exc:
            raise ValueError(f"{path}: config.json: {exc}") from None
        sd = _read_hf_weights(path)
        conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        ours = {}
        for k, v in sd.items():
            if k.endswith((".attn.bias", ".attn.masked_bias")):
                continue  # causal-mask buffers of older transformers
            k = k.removeprefix("transformer.")
            k = k if k.startswith("lm_head.") else "transformer." + k
            ours[k] = v.t() if k.endswith(conv1d) else v  # HF Conv1D stores (in, out)
        model = cls(cfg)
        if cfg.tie_embeddings:
            ours.pop("lm_head.weight", None)
        return _load_mapped(model, ours, [], path, "GPT-2")

    @classmethod
    def _from_bert(cls, path: Path, hf: dict, **overrides) -> GPT:
        """A Hugging Face BERT directory (BertModel, BertForMaskedLM, BertForPreTraining,
        BertForSequenceClassification; weights with or without the ``bert.`` prefix) as a post-norm,
        bidirectional GPT. Single-segment input: token_type_embeddings[0] is folded into wpe (exact
        for token_type_ids all 0, what HF uses for one text). ``cls.predictions`` becomes the mlm head
        and lm_head's bias; without it ``mlm_head=False`` and the logits are the tied word embedding's
        (lm_head = wte). The pooler, the NSP head (``cls.seq_relationship``) and a classifier are not
        part of the GPT and are ignored."""
        act, pos = hf.get("hidden_act", "gelu"), hf.get("position_embedding_type", "absolute")
        refusals = [
            (act in ("gelu", "gelu_new", "gelu_pytorch_tanh"), f"hidden_act {act!r} is not supported (gelu, gelu_new or gelu_pytorch_tanh)"),
            (pos == "absolute", f"position_embedding_type {pos!r} is not supported (absolute)"),
            (not hf.get("is_decoder", False), "is_decoder is true: fastlm reads BERT encoders (is_decoder false)"),
        ]
        for ok, msg in refusals:
            if not ok:
                raise ValueError(f"{path}: {msg}")
        try:
            cfg = GPTConfig(**{
                "vocab_size": hf["vocab_size"], "block_size": hf["max_position_embeddings"], "n_layer": hf["num_hidden_layers"],
                "n_head": hf["num_attention_heads"], "n_embd": hf["hidden_size"], "norm_eps": hf.get("layer_norm_eps", 1e-12),
                "gelu": "none" if act == "gelu" else "tanh", "causal": False, "norm_placement": "post", **overrides})
            check_limits(cfg)
            inter = hf["intermediate_size"]
        except KeyError as exc:
            raise ValueError(f"{path}: config.json has no {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: config.json: {exc}") from None
        if inter != 4 * cfg.n_embd:
            raise ValueError(f"{path}: intermediate_size {inter!r} must be 4 x hidden_size ({4 * cfg.n_embd}): fastlm's MLP is 4x")
        sd = {}
        for k, v in _read_hf_weights(path).items():
            k = k.removeprefix("bert.")
            if k.startswith(("pooler.", "cls.seq_relationship.", "classifier.")) or k == "embeddings.position_ids":
                continue
            sd[k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")] = v
        mlm = any(k.startswith("cls.predictions.") for k in sd)
        tie = bool(hf.get("tie_word_embeddings", True)) if mlm else True
        try:
            cfg = dataclasses.replace(cfg, mlm_head=mlm, tie_embeddings=tie)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: config.json: {exc}") from None
        ours = {}
        try:
            tt = sd.pop("embeddings.token_type_embeddings.weight")[0]
            ours["transformer.wpe.weight"] = sd.pop("embeddings.position_embeddings.weight") + tt
        except KeyError as exc:
            raise ValueError(f"{path}: weights do not match BERT: missing {exc.args[0]!r}") from None
        except (IndexError, RuntimeError) as exc:
            raise ValueError(f"{path}: weights do not match config.json: {exc}") from None
        if cfg.tie_embeddings:
            sd.pop("cls.predictions.decoder.weight", None)
        sd.pop("cls.predictions.decoder.bias", None)  # the same parameter as cls.predictions.bias
        names = {"embeddings.word_embeddings.": "transformer.wte.", "embeddings.LayerNorm.": "transformer.ln_e.",
                 "cls.predictions.transform.dense.": "transformer.head.c_fc.",
                 "cls.predictions.transform.LayerNorm.": "transformer.head.ln.",
                 "cls.predictions.decoder.": "lm_head.", "cls.predictions.bias": "lm_head.bias"}
        layer = {"attention.output.dense.": "attn.c_proj.", "attention.output.LayerNorm.": "ln_1.",
                 "intermediate.dense.": "mlp.c_fc.", "output.dense.": "mlp.c_proj.", "output.LayerNorm.": "ln_2."}
        unexpected = []
        for k, v in sd.items():
            new = next((n + k[len(o):] for o, n in names.items() if k.startswith(o)), None)
            if new is None and k.startswith("encoder.layer."):
                i, _, rest = k.removeprefix("encoder.layer.").partition(".")
                if rest.startswith("attention.self."):
                    new = f"transformer.h.{i}.attn.c_attn.{rest.removeprefix('attention.self.')}"  # query/key/value: joined below
                else:
                    new = next((f"transformer.h.{i}.{n}{rest[len(o):]}" for o, n in layer.items() if rest.startswith(o)), None)
            if new is None:
                unexpected.append(k)
            else:
                ours[new] = v
        for key in [k for k in ours if ".attn.c_attn.query." in k]:
            parts = [ours.pop(key.replace("query", n), None) for n in ("query", "key", "value")]
            if any(p is None for p in parts):
                raise ValueError(f"{path}: weights do not match BERT: {key} without its key and value")
            ours[key.replace("query.", "")] = torch.cat(parts)
        unexpected += [k for k in ours if ".attn.c_attn.key." in k or ".attn.c_attn.value." in k]
        return _load_mapped(cls(cfg), {k: v for k, v in ours.items() if k not in unexpected}, unexpected, path, "BERT")


def _load_mapped(model: GPT, ours: dict, unexpected: list, path: Path, kind: str) -> GPT:
    """``model`` with the state dict ``ours`` (a Hugging Face checkpoint's weights renamed to fastlm's)
    loaded; ValueError naming the missing and unexpected weights (``unexpected``: those the mapping
    already could not place), or the shapes that do not match config.json."""
    try:
        missing, extra = model.load_state_dict(ours, strict=False)
    except RuntimeError as exc:
        raise ValueError(f"{path}: weights do not match config.json: {str(exc)[:300]}") from None
    missing = [m for m in missing if not (model.config.tie_embeddings and m == "lm_head.weight")]
    unexpected = [*unexpected, *extra]
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match {kind}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def _regular(path: Path) -> bool:
    """An existing regular file (not a FIFO, device or directory, which would block or fail)."""
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except OSError:
        return False


def _read_hf_weights(path: Path) -> dict:
    """The state dict of a HF directory; shard names in model.safetensors.index.json must be files
    inside ``path``."""
    from safetensors.torch import load_file

    if _regular(path / "model.safetensors"):
        return load_file(str(path / "model.safetensors"))
    index = path / "model.safetensors.index.json"
    if _regular(index):
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{index}: not a safetensors index with a weight_map ({type(exc).__name__}: {exc})") from None
        root = path.resolve()
        sd = {}
        for shard in shards:
            f = (path / shard).resolve() if isinstance(shard, str) else None
            if f is None or f.parent != root or not _regular(f):
                raise ValueError(f"{index}: shard {shard!r} is not a file in {path}")
            sd.update(load_file(str(f)))
        return sd
    if _regular(path / "pytorch_model.bin"):
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin")
