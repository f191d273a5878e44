"""Checkpoints: written atomically, and checked against the run before anything is loaded."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from pipeline.shards import atomic_path


class CheckpointError(RuntimeError):
    """A checkpoint or run dir does not belong to the run that tries to use it."""


def save(path, state: dict) -> Path:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return Path(path)


def load(path) -> dict:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated, not a torch file, ...
        raise CheckpointError(f"{path}: cannot read checkpoint (truncated or corrupt?): {e}") from e


def check(ckpt: dict, path, *, model: str, vocab_fingerprint: str, shard_hashes: dict) -> None:
    """Refuse a checkpoint of another model, vocabulary or shard configs."""
    meta = ckpt.get("meta", {})
    if meta.get("model") != model:
        raise CheckpointError(f"{path}: checkpoint of model '{meta.get('model')}', not '{model}'")
    if meta.get("vocab_fingerprint") != vocab_fingerprint:
        raise CheckpointError(f"{path}: checkpoint was trained with another vocabulary "
                              f"({meta.get('vocab_fingerprint')} != {vocab_fingerprint})")
    theirs = meta.get("shard_hashes", {})
    diff = {k: (theirs.get(k), v) for k, v in shard_hashes.items() if k in theirs and theirs[k] != v}
    if diff:
        raise CheckpointError(f"{path}: checkpoint was trained on shards of other configs: "
                              + ", ".join(f"{k} {a} != {b}" for k, (a, b) in diff.items()))


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
