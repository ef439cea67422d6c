"""Tokenizers (Hugging Face `tokenizers`): byte-level BPE trained on a corpus, or loaded from files.

Byte-level means every byte has a token, so any text round-trips and nothing is ever unknown.
``Tokenizer.load`` reads a ``tokenizer.json`` (any model: GPT-2's BPE, BERT's WordPiece, ...),
GPT-2-style ``vocab.json`` + ``merges.txt``, or BERT-style ``vocab.txt`` (WordPiece, lowercased per
``tokenizer_config.json``'s ``do_lower_case``, default true). ``encode`` never adds special tokens
(a tokenizer.json post-processor's [CLS]/[SEP] included), so every tokenizer gives the text's ids
alone and a task frames them itself (``cls_id``, ``sep_id``, ``eos_id``).
``train_or_load_cached`` trains on files once and caches the result under a fingerprint of the
files and the vocabulary size.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

EOS = "<|endoftext|>"
CLS, SEP = "[CLS]", "[SEP]"
BERT_SPECIALS = ("[PAD]", "[UNK]", CLS, SEP, "[MASK]")


def cache_dir() -> Path:
    """$FASTLM_CACHE_DIR, else $XDG_CACHE_HOME/fastlm, else ~/.cache/fastlm."""
    env = os.environ.get("FASTLM_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastlm"


class Tokenizer:
    """A thin wrapper over ``tokenizers.Tokenizer`` with an end-of-text token: ``eos_token``, else
    [SEP] (a BERT vocabulary); ``cls_id`` / ``sep_id`` are [CLS] / [SEP]'s ids, None where absent."""

    def __init__(self, tk, eos_token: str = EOS):
        self.tk = tk
        self.cls_id, self.sep_id = tk.token_to_id(CLS), tk.token_to_id(SEP)
        eos = tk.token_to_id(eos_token)
        self.eos_id = self.sep_id if eos is None else eos

    @property
    def vocab_size(self) -> int:
        """1 + the largest token id (the size of the embedding table the ids need)."""
        return 1 + max(self.tk.get_vocab(with_added_tokens=True).values(), default=-1)

    def encode(self, text: str) -> list[int]:
        """The ids of ``text`` without special tokens (no [CLS]/[SEP] from a post-processor)."""
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tk.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=False)

    def save(self, directory) -> Path:
        path = Path(directory) / "tokenizer.json"
        self.tk.save(str(path))
        return path

    def fingerprint(self) -> str:
        return hashlib.sha256(self.tk.to_str().encode()).hexdigest()[:16]

    @classmethod
    def load(cls, path) -> Tokenizer:
        """From a tokenizer.json file, or a directory holding tokenizer.json, vocab.json + merges.txt, or
        a BERT vocab.txt."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        p = Path(path)
        if p.is_dir() and (p / "tokenizer.json").is_file():
            p = p / "tokenizer.json"
        if p.is_file():
            try:
                return cls(HFTokenizer.from_file(str(p)))
            except Exception as exc:
                raise ValueError(f"tokenizer file {p} could not be read: {exc}") from None
        vocab, merges = p / "vocab.json", p / "merges.txt"
        if p.is_dir() and vocab.is_file() and merges.is_file():
            tk = HFTokenizer(models.BPE.from_file(str(vocab), str(merges)))
            tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tk.decoder = decoders.ByteLevel()
            return cls(tk)
        if p.is_dir() and (p / "vocab.txt").is_file():
            return cls(_wordpiece(p))
        raise FileNotFoundError(f"no tokenizer at {path}: expected tokenizer.json, vocab.json and merges.txt, or vocab.txt")

    @classmethod
    def train(cls, texts, vocab_size: int) -> Tokenizer:
        """Byte-level BPE on an iterable of strings; vocab_size counts the 256 bytes and EOS."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        if vocab_size < 257:
            raise ValueError(f"vocab_size must be at least 257 (256 bytes + {EOS}), got {vocab_size}")
        tk = HFTokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tk.train_from_iterator(texts, trainer)
        return cls(tk)


def _wordpiece(directory: Path):
    """BERT's WordPiece tokenizer of ``directory/vocab.txt``, configured as Hugging Face's
    BertTokenizerFast is by tokenizer_config.json (do_lower_case default true, strip_accents default
    = do_lower_case, tokenize_chinese_chars default true, unk_token default [UNK])."""
    from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    conf_path = directory / "tokenizer_config.json"
    try:
        conf = json.loads(conf_path.read_text()) if conf_path.is_file() else {}
    except (OSError, ValueError) as exc:
        raise ValueError(f"{conf_path}: unreadable or not JSON ({exc})") from None
    if not isinstance(conf, dict):
        raise ValueError(f"{conf_path}: expected a JSON object, got {type(conf).__name__}")
    lower = conf.get("do_lower_case", True)
    unk = conf.get("unk_token", "[UNK]")
    unk = unk.get("content") if isinstance(unk, dict) else unk
    if not isinstance(lower, bool) or not isinstance(unk, str):
        raise ValueError(f"{conf_path}: do_lower_case must be true or false and unk_token a string, got {lower!r}, {unk!r}")
    try:
        tk = HFTokenizer(models.WordPiece.from_file(str(directory / "vocab.txt"), unk_token=unk))
    except Exception as exc:
        raise ValueError(f"{directory / 'vocab.txt'}: not a WordPiece vocabulary ({exc})") from None
    tk.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=conf.get("tokenize_chinese_chars", True),
                                               strip_accents=conf.get("strip_accents"), lowercase=lower)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.decoder = decoders.WordPiece(prefix="##")
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in BERT_SPECIALS if tk.token_to_id(t) is not None])
    return tk


def files_fingerprint(files) -> str:
    h = hashlib.sha256()
    for f in files:
        st = Path(f).stat()
        h.update(f"{Path(f).resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def train_or_load_cached(files, vocab_size: int, read_text) -> Tokenizer:
    """The BPE tokenizer of ``files`` at ``vocab_size``, trained once and cached in cache_dir()."""
    key = f"bpe-{files_fingerprint(files)}-{vocab_size}.json"
    path = cache_dir() / "tokenizers" / key
    if path.is_file():
        try:
            return Tokenizer.load(path)
        except ValueError:
            pass  # a damaged cache entry is rebuilt
    tok = Tokenizer.train((read_text(f) for f in files), vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    tok.tk.save(tmp)
    os.replace(tmp, path)
    return tok


class StreamDecoder:
    """Turns a growing list of token ids into text pieces, holding back a split UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids=()):
        self.tok, self.ids = tokenizer, list(prompt_ids)
        self.printed = len(tokenizer.decode(self.ids)) if self.ids else 0

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece, self.printed = text[self.printed :], len(text)
        return piece

