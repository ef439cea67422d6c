"""The training corpus: finding files, tokenizing them (cached), and a resumable batch sampler.

With no data path, the corpus is the Python standard library's own ``.py`` files on this machine
(``sysconfig.get_paths()["stdlib"]``, without site-packages, the regression tests and data tables), so
a fresh machine has a corpus without downloading or shipping one.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
import tempfile
from pathlib import Path

import numpy as np
import torch

from fastlm.tokenizer import Tokenizer, cache_dir, files_fingerprint

# site-packages is not the standard library; the regression tests, codec tables (encodings) and
# pydoc's help-text dump are large and repetitive, not the code a small model should learn from.
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "encodings", "pydoc_data"}


def default_corpus() -> list[Path]:
    """The standard library's .py files found at run time."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise ValueError(f"empty corpus: the standard library directory {root} does not exist; pass --data PATH")
    files = sorted(p for p in root.rglob("*.py") if p.is_file() and not _SKIP_DIRS.intersection(p.relative_to(root).parts[:-1]))
    if not files:
        raise ValueError(f"empty corpus: no .py files under {root}; pass --data PATH")
    return files


def _is_text(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return b"\0" not in f.read(4096)
    except OSError:
        return False


def find_files(paths) -> list[Path]:
    """The text files named by ``paths`` (files, or directories searched recursively; hidden and
    binary files skipped). Raises FileNotFoundError for a missing path, ValueError if none is left."""
    if not paths:
        return default_corpus()
    files: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"data path {str(p)!r} does not exist")
        if p.is_file():
            files.append(p)
        else:
            for f in sorted(p.rglob("*")):
                rel = f.relative_to(p).parts
                if f.is_file() and not any(part.startswith(".") or part == "__pycache__" for part in rel) and _is_text(f):
                    files.append(f)
    if not files or all(f.stat().st_size == 0 for f in files):
        raise ValueError(f"empty corpus: no non-empty text files in {', '.join(map(str, paths))}")
    return files


def read_text(path) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def tokenize(files, tokenizer: Tokenizer) -> torch.Tensor:
    """All files as one int32 token stream, documents separated by EOS; cached in cache_dir()."""
    key = hashlib.sha256(f"{files_fingerprint(files)}{tokenizer.fingerprint()}".encode()).hexdigest()[:20]
    path = cache_dir() / "tokens" / f"{key}.pt"
    if path.is_file():
        try:
            return torch.load(path, weights_only=True)
        except Exception:
            pass  # a damaged cache entry is rebuilt
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    parts = []
    for i in range(0, len(files), 256):  # encode_batch runs on every core
        for doc in tokenizer.encode_batch([read_text(f) for f in files[i : i + 256]]):
            if doc:
                parts.append(np.asarray(doc + eos, dtype=np.int32))
    if not parts:
        raise ValueError("empty corpus: the data files hold no text")
    tokens = torch.from_numpy(np.concatenate(parts))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    torch.save(tokens, tmp)
    os.replace(tmp, path)
    return tokens


def split(tokens: torch.Tensor, seq_len: int, val_fraction: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out): the last val_fraction of the stream (at least one window) is held out."""
    n = tokens.numel()
    n_val = max(int(n * val_fraction), seq_len + 1)
    if n - n_val < seq_len + 1:
        raise ValueError(
            f"corpus too small: {n} tokens; a train and a held-out split at seq_len {seq_len} need at least "
            f"{2 * (seq_len + 1)}. Add data or lower --seq-len"
        )
    return tokens[: n - n_val], tokens[n - n_val :]


class Batches:
    """Training windows in a fixed order: epoch e shifts all windows by a random offset < T and
    permutes them, both from (seed, e). ``position`` counts the windows served so far, so
    (seed, position) is the whole data state of a run: a resumed run asks for the same windows."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, seed: int = 0):
        self.tokens, self.T, self.seed = tokens, seq_len, seed
        n = tokens.numel()
        self.n_windows = n // seq_len - 1 if n // seq_len - 1 >= 1 else (n - 1) // seq_len
        self.max_shift = seq_len if n // seq_len - 1 >= 1 else 1
        self._epoch, self._perm, self._shift = -1, None, 0

    def _epoch_order(self, epoch: int):
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._shift = int(torch.randint(self.max_shift, (1,), generator=g))
            self._perm = torch.randperm(self.n_windows, generator=g)
            self._epoch = epoch
        return self._perm, self._shift

    def get(self, position: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows position .. position + n - 1 as (x, y), each (n, T) int64, y = x shifted by one."""
        starts = []
        for p in range(position, position + n):
            perm, shift = self._epoch_order(p // self.n_windows)
            starts.append(shift + int(perm[p % self.n_windows]) * self.T)
        idx = torch.tensor(starts)[:, None] + torch.arange(self.T + 1)
        w = self.tokens[idx].long()
        return w[:, :-1], w[:, 1:]


def eval_batches(tokens: torch.Tensor, seq_len: int, batch_size: int, n_batches: int):
    """The held-out windows, in order from the start (wrapping), as n_batches (x, y) pairs."""
    n_windows = (tokens.numel() - 1) // seq_len
    for b in range(n_batches):
        starts = torch.tensor([((b * batch_size + i) % n_windows) * seq_len for i in range(batch_size)])
        w = tokens[starts[:, None] + torch.arange(seq_len + 1)].long()
        yield w[:, :-1], w[:, 1:]


def read_jsonl(path, fields: dict) -> list[dict]:
    """The records of a JSON-lines file, each an object holding ``fields`` (name -> a type or a
    tuple of types; other keys are ignored). Blank lines are skipped. ValueError naming the file and
    line for bad JSON, a line that is not an object, a missing field or one of the wrong type, and
    for a file with no records."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    if not path.is_file():
        raise ValueError(f"data file {path} is not a file (expected JSON lines with {', '.join(fields)})")
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{path} line {n}: not valid JSON ({exc})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path} line {n}: expected a JSON object with {', '.join(map(repr, fields))}, "
                                 f"got a {type(row).__name__}")
            for name, types in fields.items():
                if name not in row:
                    raise ValueError(f"{path} line {n}: missing field {name!r} (each line needs {', '.join(map(repr, fields))})")
                v = row[name]
                ok = isinstance(v, types) and not (isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)))
                if not ok:
                    want = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
                    raise ValueError(f"{path} line {n}: field {name!r} must be a {want}, got {type(v).__name__} {str(v)[:40]!r}")
            row["_line"] = n
            records.append(row)
    if not records:
        raise ValueError(f"empty data set: {path} holds no records (expected JSON lines with {', '.join(map(repr, fields))})")
    return records


def split_examples(n: int, val_fraction: float, seed: int, what: str = "examples") -> tuple[list[int], list[int]]:
    """(train, held-out) indices of n examples: a permutation from ``seed``, its last
    max(1, val_fraction * n) held out; ValueError if either part would be empty."""
    if n < 2:
        raise ValueError(f"too few {what}: {n}; a train and a held-out split need at least 2")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = min(max(1, int(n * val_fraction)), n - 1)
    return sorted(perm[: n - n_val]), sorted(perm[n - n_val :])


class ExampleOrder:
    """The training order of n examples: epoch e is a permutation from (seed, e). ``position``
    counts the examples served so far, so (seed, position) is the whole data state of a run."""

    def __init__(self, n: int, seed: int = 0):
        if n < 1:
            raise ValueError("ExampleOrder: no examples")
        self.n, self.seed = n, seed
        self._epoch, self._perm = -1, None

    def indices(self, position: int, count: int) -> list[int]:
        out = []
        for p in range(position, position + count):
            epoch = p // self.n
            if epoch != self._epoch:
                self._perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)).tolist()
                self._epoch = epoch
            out.append(self._perm[p % self.n])
        return out


def pack(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(idx (1, T) int64, cu_seqlens (B + 1,) int32, max_seqlen): the sequences one after another,
    the packed form of fastlm.models.GPT.forward / hidden_states."""
    lens = [len(s) for s in seqs]
    if not seqs or min(lens) < 1:
        raise ValueError("pack: every sequence needs at least one token")
    idx = torch.tensor([t for s in seqs for t in s], dtype=torch.long)[None]
    cu = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    return idx, cu, max(lens)
