"""Training data: the built-in recall task (generated on the fly) and character-level text.

Every batch is a pure function of ``(seed, stream, step)``: the generator for step ``s`` is
seeded from those three numbers, so a resumed run, another backend or another number of
processes sees exactly the same batches, and no data-loader state needs saving.

Each dataset yields ``(ids, targets)``: ids (B, L) int64; targets (B, L) int64, the token
that should be predicted after each position, or ``IGNORE`` (-100) where there is nothing to
predict. The loss and the accuracy count only positions whose target is not ``IGNORE``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

IGNORE = -100  # target of a position that is not scored (torch's cross_entropy ignore_index)

TRAIN, HELDOUT = 0, 1  # streams: training batches and the held-out set never share a generator


def generator(seed: int, stream: int, step: int) -> torch.Generator:
    """A CPU generator seeded from (seed, stream, step) by a fixed integer hash."""
    h = (seed * 0x9E3779B97F4A7C15 + stream * 0xBF58476D1CE4E5B9 + step * 0x94D049BB133111EB) % (1 << 64)
    h ^= h >> 31
    return torch.Generator().manual_seed(h % (1 << 63))


@dataclass
class RecallTask:
    """Associative recall, the task an induction head solves.

    A sequence is ``pairs`` key/value pairs ``k1 v1 k2 v2 ...``. Each sequence draws its own
    random table key -> value; keys are drawn with repetition, so most keys come back. At a
    key that occurred before, the next token is the value that followed its earlier
    occurrence: *predict the token that followed the previous occurrence of the current
    token*. Only those positions are scored; nothing else in the sequence is predictable
    (chance accuracy is 1 / values). The rule cannot be stored in the weights -- the table
    changes with every sequence -- so it has to be read from the context by attention.

    Tokens: keys are the lowercase letters ``a b c ...``, values the uppercase ``A B C ...``,
    so a sequence reads like ``"c F a K c"`` (next: ``F``).
    """

    keys: int = 16  # number of distinct key tokens
    values: int = 16  # number of distinct value tokens
    pairs: int = 24  # key/value pairs per sequence; sequence length = 2 * pairs

    def __post_init__(self):
        for name in ("keys", "values", "pairs"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.keys > 26 or self.values > 26:
            raise ValueError(f"keys and values are letters: at most 26 each, got keys={self.keys}, values={self.values}")

    name = "recall"

    @property
    def vocab(self) -> list:
        return [chr(ord("a") + i) for i in range(self.keys)] + [chr(ord("A") + i) for i in range(self.values)]

    @property
    def seq_len(self) -> int:
        return 2 * self.pairs

    @property
    def chance_loss(self) -> float:
        return math.log(self.values)

    def describe(self) -> str:
        return (f"recall task: {self.pairs} key/value pairs per sequence ({self.seq_len} tokens), {self.keys} keys, "
                f"{self.values} values; scored at keys seen before (chance accuracy {1 / self.values:.1%})")

    def sample(self, batch: int, gen: torch.Generator) -> tuple:
        """(ids, targets), each (batch, 2 * pairs)."""
        B, P = batch, self.pairs
        keys = torch.randint(0, self.keys, (B, P), generator=gen)  # (B, P)
        table = torch.randint(0, self.values, (B, self.keys), generator=gen)  # (B, keys) this sequence's key -> value
        vals = torch.gather(table, 1, keys)  # (B, P)
        ids = torch.stack((keys, self.keys + vals), dim=-1).reshape(B, 2 * P)  # (B, L) k1 v1 k2 v2 ...
        same = keys[:, :, None] == keys[:, None, :]  # (B, P, P) pair p has the key of pair q
        seen = (same & torch.ones(P, P, dtype=torch.bool).tril(-1)).any(-1)  # (B, P) key occurred at an earlier pair
        targets = torch.full((B, P, 2), IGNORE, dtype=torch.int64)  # (B, P, 2)
        targets[:, :, 0] = torch.where(seen, self.keys + vals, torch.full_like(vals, IGNORE))
        return ids, targets.reshape(B, 2 * P)

    def batch(self, batch: int, seed: int, step: int) -> tuple:
        return self.sample(batch, generator(seed, TRAIN, step))

    def heldout(self, n: int, seed: int) -> tuple:
        return self.sample(n, generator(seed, HELDOUT, 0))


class TextDataset:
    """Character-level language modelling on a text: every character is a token.

    The vocabulary is the sorted set of characters in the text. The last ``heldout_fraction``
    of the text is held out; training windows of ``seq_len`` characters start at random
    offsets in the rest. Targets are the next characters.
    """

    name = "text"

    def __init__(self, text: str, seq_len: int, *, source: str = "text", heldout_fraction: float = 0.1, vocab=None):
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
        self.source = source
        self.vocab = sorted(set(text)) if vocab is None else list(vocab)
        index = {c: i for i, c in enumerate(self.vocab)}
        unknown = sorted(set(text) - set(index))
        if unknown:
            raise ValueError(f"{source}: characters not in the checkpoint's vocabulary: {unknown[:20]}")
        n_held = int(len(text) * heldout_fraction)
        if len(text) - n_held < seq_len + 1 or n_held < seq_len + 1:
            need = int(math.ceil((seq_len + 1) / min(heldout_fraction, 1 - heldout_fraction)))
            raise ValueError(f"{source} has {len(text)} characters; with seq_len={seq_len} it needs at least {need} "
                             f"(training and held-out parts of at least seq_len + 1 each); use a longer text or a smaller --seq-len")
        ids = torch.tensor([index[c] for c in text], dtype=torch.int64)  # (N,)
        self.train_ids, self.heldout_ids = ids[: len(text) - n_held], ids[len(text) - n_held:]
        self.seq_len = seq_len
        self.chars = len(text)

    @classmethod
    def from_file(cls, path, seq_len: int, *, vocab=None) -> "TextDataset":
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"--text {path}: not UTF-8 text ({e})") from None
        except OSError as e:
            raise ValueError(f"cannot read --text {path}: {e.strerror or e}") from None
        if not text:
            raise ValueError(f"--text {path}: the file is empty")
        return cls(text, seq_len, source=str(path), vocab=vocab)

    @property
    def chance_loss(self) -> float:
        return math.log(len(self.vocab))

    def describe(self) -> str:
        return (f"characters of {self.source}: {self.chars} characters, {len(self.vocab)} distinct, "
                f"windows of {self.seq_len}; last {len(self.heldout_ids)} held out")

    def _windows(self, ids: torch.Tensor, starts: torch.Tensor) -> tuple:
        offs = starts[:, None] + torch.arange(self.seq_len + 1)[None, :]  # (B, L + 1)
        w = ids[offs]  # (B, L + 1)
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()

    def batch(self, batch: int, seed: int, step: int) -> tuple:
        gen = generator(seed, TRAIN, step)
        starts = torch.randint(0, len(self.train_ids) - self.seq_len, (batch,), generator=gen)  # (B,)
        return self._windows(self.train_ids, starts)

    def heldout(self, n: int, seed: int) -> tuple:
        # evenly spaced windows over the held-out part: the same set every evaluation
        last = len(self.heldout_ids) - self.seq_len - 1
        starts = torch.linspace(0, last, steps=min(n, last + 1)).round().to(torch.int64)  # (n,)
        return self._windows(self.heldout_ids, starts)
