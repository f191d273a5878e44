"""The vocabulary (``text/vocab.json``), its optional word vectors, and ``Vocabulary``: the
word <-> id maps the trainer encodes captions with."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from pipeline.shards.atomic import ShardError, atomic_path, config_hash, provenance, read_json, write_json

VOCAB_SPECIALS = ("<pad>", "<start>", "<end>", "<unk>")


def write_vocab(path, vocab: dict) -> Path:
    """``vocab`` must hold ``words`` (list of [word, count], specials first with ``<pad>`` at 0),
    ``min_count``, ``predicates`` and ``attributes`` (same [name, count] form)."""
    words = [w for w, _ in vocab["words"]]
    if tuple(words[:len(VOCAB_SPECIALS)]) != VOCAB_SPECIALS:
        raise ValueError(f"vocabulary must start with {VOCAB_SPECIALS}, got {words[:4]}")
    if len(set(words)) != len(words):
        raise ValueError("vocabulary has duplicate words")
    for key in ("min_count", "predicates", "attributes"):
        if key not in vocab:
            raise ValueError(f"vocabulary lacks '{key}'")
    write_json(path, dict(vocab, itmkit=provenance(vocab.get("itmkit"))))
    return Path(path)


def read_vocab(path) -> dict:
    vocab = read_json(path)
    words = [w for w, _ in vocab.get("words", [])]
    if tuple(words[:len(VOCAB_SPECIALS)]) != VOCAB_SPECIALS:
        raise ShardError(f"{path}: not an itmkit vocabulary (specials missing)")
    return vocab


def write_vectors(path, vectors: np.ndarray) -> Path:
    """Word vectors of a vocabulary: float32 [len(vocab), dim], rows in vocabulary id order."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"{path}: word vectors must be 2-D, got shape {vectors.shape}")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, vectors)
    return Path(path)


def read_vectors(path, vocab_size: int | None = None) -> np.ndarray:
    path = Path(path)
    if not path.exists():
        raise ShardError(f"{path}: file not found")
    try:
        vectors = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ShardError(f"{path}: cannot read as .npy (truncated or corrupt?): {e}") from e
    if vectors.ndim != 2 or (vocab_size is not None and len(vectors) != vocab_size):
        raise ShardError(f"{path}: word vectors of shape {vectors.shape} do not match a vocabulary "
                         f"of {vocab_size} words")
    return vectors


class Vocabulary:
    """Word <-> id maps of a vocab.json, with the encode/decode the trainer uses.

    Tokens are looked up lowercased; unknown ones map to ``<unk>``. ``predicates`` and
    ``attributes`` are separate id spaces (0 is reserved for unknown in both)."""

    PAD, START, END, UNK = range(4)

    def __init__(self, vocab: dict):
        self.data = vocab
        self.itos = [w for w, _ in vocab["words"]]
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.predicates = ["<unk>"] + [p for p, _ in vocab["predicates"]]
        self.attributes = ["<unk>"] + [a for a, _ in vocab["attributes"]]
        self._pred = {p: i for i, p in enumerate(self.predicates)}
        self._attr = {a: i for i, a in enumerate(self.attributes)}

    @classmethod
    def load(cls, path) -> "Vocabulary":
        return cls(read_vocab(path))

    def __len__(self) -> int:
        return len(self.itos)

    @property
    def fingerprint(self) -> str:
        """Identifies the word list: a checkpoint trained on another vocab must not load."""
        return config_hash(self.itos)

    def encode(self, tokens: Sequence[str], add_special: bool = True) -> list[int]:
        ids = [self.stoi.get(t.lower(), self.UNK) for t in tokens]
        return [self.START] + ids + [self.END] if add_special else ids

    def decode(self, ids: Iterable[int], strip_special: bool = True) -> list[str]:
        words = [self.itos[int(i)] for i in ids]
        return [w for w in words if w not in VOCAB_SPECIALS] if strip_special else words

    def predicate_id(self, predicate: str) -> int:
        return self._pred.get(predicate.lower(), 0)

    def attribute_id(self, attribute: str) -> int:
        return self._attr.get(attribute.lower(), 0)
