"""Checkpoints: plain data only, written atomically, checked against the run before use.

A checkpoint holds tensors, numbers, strings, lists and dicts and nothing else, so it is read with
``torch.load(weights_only=True)``: reading one can never run code, wherever the file came from.
A file that needs more than that (a pickled object, or the numpy RNG state that earlier versions
saved) is refused with one line saying what to do.

    itmkit upgrade runs/NAME [...]   # convert the checkpoints of an earlier version, still
                                     # without running code from them
                                     # (or: python training/checkpoint.py upgrade ...)
"""

from __future__ import annotations

import argparse
import hashlib
import io
import pickle
import random
import sys
from pathlib import Path

import numpy as np
import torch

from pipeline.config import add_quiet_argument
from pipeline.shards import atomic_path

FORMAT = 2    # 1 (no "format" key): earlier versions, numpy arrays in the RNG state
TRAINING_KEYS = ("optimizer", "scaler", "rng")   # in last.pt only: what resuming needs

# What a format-1 checkpoint holds besides plain data: numpy arrays and scalars (the RNG state).
# Allowing exactly these to ``upgrade`` keeps even that conversion free of code execution.
_NUMPY_GLOBALS = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, np._core.multiarray.scalar,
                  *{type(np.dtype(t)) for t in (np.uint32, np.int64, np.float64, np.bool_)},
                  (np._core.multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
                  (np._core.multiarray.scalar, "numpy.core.multiarray.scalar")]
_NUMPY_NAMES = {"numpy.ndarray", "numpy.dtype"} | {
    f"numpy.{m}.multiarray.{f}" for m in ("core", "_core") for f in ("_reconstruct", "scalar")}


class CheckpointError(RuntimeError):
    """A checkpoint or run dir does not belong to the run that tries to use it, or is unsafe."""


ERRORS = (CheckpointError,)   # what itmkit reports as one line (exit 1)


def _not_plain(obj, where: str = "state") -> str | None:
    """The first entry of ``obj`` that ``weights_only`` loading would refuse, or None."""
    if isinstance(obj, torch.Tensor) or type(obj) in (str, int, float, bool, type(None)):
        return None
    if isinstance(obj, (list, tuple)):
        return next((w for i, v in enumerate(obj) if (w := _not_plain(v, f"{where}[{i}]"))), None)
    if isinstance(obj, dict):
        return next((w for k, v in obj.items()
                     if (w := (f"{where} key {k!r}" if type(k) not in (str, int) else None)
                         or _not_plain(v, f"{where}[{k!r}]"))), None)
    return f"{where} ({type(obj).__module__}.{type(obj).__qualname__})"


def save(path, state: dict) -> Path:
    """Write ``state`` (plain data only, else TypeError) atomically with the format number."""
    bad = _not_plain(state)
    if bad:
        raise TypeError(f"{path}: {bad} is not plain data (tensors, numbers, strings, lists, dicts); "
                        "a checkpoint must load with torch.load(weights_only=True)")
    # through a Python file object: torch's own file writer reports a full disk as "unexpected
    # pos" with no errno, the file object raises OSError(ENOSPC), which atomic_path makes one line
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save({"format": FORMAT, **state}, f)
    return Path(path)


def load(path) -> dict:
    """Read a checkpoint with ``torch.load(weights_only=True)``; anything that needs more is
    refused with a CheckpointError before any of it is built. The file is read once, so the
    "sha256" added to what it holds is that of the very bytes loaded."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    raw = path.read_bytes()
    try:
        ckpt = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or objects beyond plain data
        raise CheckpointError(_refusal(path, e)) from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: not an itmkit checkpoint (holds a {type(ckpt).__name__}, not a dict)")
    return {**ckpt, "sha256": hashlib.sha256(raw).hexdigest()}


def _refusal(path: Path, error: Exception) -> str:
    """Why ``path`` did not load, told from a static scan of its pickle (nothing is run)."""
    with open(path, "rb") as f:
        head = f.read(2)
    if head[:2] != b"PK" and head[:1] != b"\x80":   # neither torch's zip format nor its legacy pickle
        return f"{path}: not a checkpoint ({'an empty file' if not head else 'not a file torch.save writes'})"
    try:
        unsafe = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:
        unsafe = []
    if unsafe and set(unsafe) <= _NUMPY_NAMES:
        return (f"{path}: checkpoint of an earlier itmkit version (numpy objects inside), refused; if it "
                f"comes from your own training, convert it with `itmkit upgrade {path}`")
    if unsafe:
        return (f"{path}: refused: it holds Python objects ({', '.join(unsafe[:5])}) and loading them "
                "could run code; itmkit never writes such a file: get the run again from a trusted "
                "source or retrain it")
    if isinstance(error, pickle.UnpicklingError):   # torch's text would suggest weights_only=False
        return (f"{path}: refused: not a checkpoint itmkit wrote (damaged, or a pickle in torch's legacy "
                "format, whose loading could run code)")
    first = (str(error).splitlines() or [""])[0].split(". ")[0] or type(error).__name__
    return f"{path}: cannot read checkpoint (truncated or corrupt?): {first[:200]}"


def check(ckpt: dict, path, *, model: str, vocab_fingerprint: str, shard_hashes: dict) -> None:
    """Refuse a checkpoint of another format, model, vocabulary or shard configs."""
    if ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {ckpt.get('format', 1)}, this version reads "
                              f"{FORMAT}; convert it with `itmkit upgrade {path}`")
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


def inference_part(state: dict) -> dict:
    """What best.pt keeps: weights, config, identity (no optimiser, scaler or RNG state)."""
    return {k: v for k, v in state.items() if k not in TRAINING_KEYS}


# ---------------------------------------------------------------------------------------------
# RNG state as plain data

def rng_state() -> dict:
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
            "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n, p = state["numpy"], state["python"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------
# earlier format

def upgrade(path) -> Path:
    """Rewrite a format-1 checkpoint in this format. It is read with ``weights_only=True`` too,
    numpy's array and scalar types allowed and nothing else, so no code from it runs."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(_NUMPY_GLOBALS):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(_refusal(path, e)) from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path}: not an itmkit checkpoint (no model weights)")
    if ckpt.get("format") == FORMAT:
        return path
    if isinstance(rng := ckpt.get("rng"), dict):
        _, keys, pos, has_gauss, gauss = rng["numpy"]
        version, internal, gauss_next = rng["python"]
        rng["numpy"] = {"keys": torch.from_numpy(np.asarray(keys).astype(np.int64)), "pos": int(pos),
                        "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)}
        rng["python"] = {"version": version, "internal": list(internal), "gauss_next": gauss_next}
    ckpt = {k: v if k == "model" else _plain_numbers(v) for k, v in ckpt.items()}
    return save(path, inference_part(ckpt) if path.name == "best.pt" else ckpt)


def _plain_numbers(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj)
    if isinstance(obj, dict):
        return type(obj)((k, _plain_numbers(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain_numbers(v) for v in obj)
    return obj


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", metavar="RUN_OR_PT", help="run folders (best.pt and last.pt) or .pt files")
    add_quiet_argument(p)


def command(args) -> int:
    for arg in map(Path, args.paths):
        paths = [p for p in (arg / "best.pt", arg / "last.pt") if p.exists()] if arg.is_dir() else [arg]
        if not paths or not arg.exists():
            raise CheckpointError(f"{arg}: not a run folder (no best.pt or last.pt in it)" if arg.is_dir()
                                  else f"{arg}: no such file or folder")
        for path in paths:
            print(f"checkpoint: {upgrade(path)}: format {FORMAT}")
    return 0


def main(argv=None) -> int:
    """``python training/checkpoint.py upgrade ...`` from Python; errors are raised."""
    parser = argparse.ArgumentParser(prog="training/checkpoint.py")
    add_arguments(parser.add_subparsers(dest="command", required=True).add_parser("upgrade"))
    return command(parser.parse_args(argv))


if __name__ == "__main__":   # python training/checkpoint.py upgrade ...: the same as itmkit upgrade ...
    try:
        sys.exit(main())
    except ERRORS as e:   # one line, exit 1, as itmkit reports them
        sys.exit(f"upgrade: error: {e}")
