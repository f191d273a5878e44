"""A trained run, loaded in one place: config.json -> vocabulary -> shards -> model -> checkpoint.

    run = load_run("runs/demo-vsepp", split="test")     # best.pt, on the CPU
    sims = compute_sims(run.model, ...run.data...)

Every command that opens a run folder (evaluate, export, and train.py's --resume through the
pieces ``load_vocab``, ``open_split``, ``create_model`` and ``load_checkpoint``) goes through
here, so each check is made the same way everywhere: the vocabulary is the one the run was
trained with, the shards are of the configs it recorded, the checkpoint belongs to the run and
holds plain data only.

A run folder has one writer: ``writer_claim`` (train holds it while it runs); readers take no
claim (every checkpoint is renamed into place whole) and can ask ``training_now`` whether the run
is still being trained.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from pipeline import shards
from pipeline.config import add_root_argument, resolve_root, step
from pipeline.shards import Layout, ShardError, Vocabulary
from pipeline.shards.atomic import claim_holder, lock_path
from training import checkpoint, models
from training.checkpoint import CheckpointError
from training.config import RunConfig
from training.data import DataConfig, ShardData


@dataclass
class LoadedRun:
    dir: Path
    root: Path                 # the data root the run's dataset was read from
    config: RunConfig
    vocab: Vocabulary
    model: torch.nn.Module     # weights of ``which``.pt, in eval mode, on the device
    checkpoint: dict           # the rest of the checkpoint (epoch, best_rsum, training state)
    which: str                 # "best" or "last"
    data: ShardData | None     # the split asked for, checked against the run's shards

    @property
    def checkpoint_path(self) -> Path:
        return self.dir / f"{self.which}.pt"

    @property
    def shard_hashes(self) -> dict:
        return self.config.shard_hashes

    @property
    def scored(self) -> dict:
        """The identity of the loaded weights, as eval.json and saved similarities record it: the
        file, its sha256 and the epoch it ends (counted as metrics.csv counts them, from 1)."""
        return {"file": f"{self.which}.pt", "sha256": self.checkpoint["sha256"],
                "epoch": self.checkpoint["epoch"] + 1}


@contextlib.contextmanager
def writer_claim(run_dir) -> Iterator[None]:
    """The one right to write ``run_dir``: a claim (``shards.claim``, an flock the kernel drops
    when its holder dies) on the folder. Another holder is an error naming it (host, pid)."""
    path = Path(run_dir).resolve()
    with shards.claim(path, wait=False) as held:
        if not held:
            raise CheckpointError(f"{run_dir}: another process is training this run ({claim_holder(path)}); "
                                  "wait for it to end, or choose another --out")
        yield


def training_now(run_dir) -> str | None:
    """Who trains ``run_dir`` now ("host H, pid P"), or None when no one does."""
    path = Path(run_dir).resolve()
    if not lock_path(path).exists():   # never trained here: nothing to create
        return None
    try:
        with shards.claim(path, wait=False) as held:
            return None if held else claim_holder(path)
    except OSError:   # a folder this user may not write: a run received from someone else
        return None


def add_run_arguments(p) -> None:
    """The options of every command that loads a run: --checkpoint, --root, --device."""
    p.add_argument("--checkpoint", default="best", choices=("best", "last"), help="weights to load")
    add_root_argument(p, help="data root (default: the one the run was trained on, else $ITMKIT_DATA, "
                              "else 'root' in config/config.yaml, else data/)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")


def data_root(run: RunConfig, cli_root: str | None = None) -> Path:
    """``--root`` if given; else the root the run was trained on, when it still holds the
    dataset; else the usual default (``$ITMKIT_DATA``, config/config.yaml, data/)."""
    if cli_root:
        return Path(cli_root)
    recorded = Path(run.root)
    if (recorded / run.dataset).is_dir():
        return recorded
    fallback = resolve_root(None)
    if (fallback / run.dataset).is_dir():
        return fallback
    raise ShardError(f"dataset '{run.dataset}' is neither under the run's data root {recorded} nor "
                     f"under {fallback}; pass --root")


def load_vocab(root, run: RunConfig) -> Vocabulary:
    """The dataset's vocabulary; refused when the run was trained with another one."""
    layout = Layout(Path(root), run.dataset)
    if not layout.vocab.exists():
        raise ShardError(f"{layout.vocab} not found: run {step('parse', root, run.dataset)} and "
                         f"{step('vocab', root, run.dataset)} (ingest and import-precomp write captions only)")
    vocab = Vocabulary.load(layout.vocab)
    if run.vocab_fingerprint and vocab.fingerprint != run.vocab_fingerprint:
        raise CheckpointError(f"the run was trained with another vocabulary than {layout.vocab} "
                              f"({run.vocab_fingerprint} != {vocab.fingerprint})")
    return vocab


def open_split(root, run: RunConfig, vocab: Vocabulary, split: str,
               max_images: int | None = None) -> ShardData:
    """One split of the run's dataset, read from shards of the configs ``run.shard_hashes``
    records; a new run (nothing recorded yet) records the configs it finds. The only place that
    resolves shard hashes for a run."""
    data = ShardData(root, run.dataset, vocab, DataConfig(
        split=split, max_len=run.max_len, grid=models.get(run.model).needs_grid, max_images=max_images),
        run.shard_hashes or None)
    run.shard_hashes = data.hashes
    return data


def create_model(run: RunConfig, vocab: Vocabulary, vectors=None) -> torch.nn.Module:
    """The run's model; ``vectors`` (a word-vectors file) only where no checkpoint follows."""
    return models.build(run.model, run.model_cfg(), vocab, vectors=vectors)


def load_checkpoint(model: torch.nn.Module, path, run: RunConfig, vocab: Vocabulary) -> dict:
    """Load ``path`` into ``model`` after checking that it belongs to ``run``; returns the
    checkpoint (for the training state)."""
    ckpt = checkpoint.load(path)
    checkpoint.check(ckpt, path, model=run.model, vocab_fingerprint=vocab.fingerprint,
                     shard_hashes=run.shard_hashes)
    model.load_state_dict(ckpt.pop("model"))
    return ckpt


def load_run(run_dir, root=None, which: str = "best", device="cpu", split: str | None = None,
             max_images: int | None = None) -> LoadedRun:
    """Load the run in ``run_dir`` with the weights of ``which``.pt (best or last). ``root``
    overrides the data root the run recorded; ``split`` also opens that split (first
    ``max_images`` images), checked against the run's shard configs before the model is built."""
    run_dir = Path(run_dir)
    run = RunConfig.load(run_dir)
    root = data_root(run, root)
    vocab = load_vocab(root, run)
    data = open_split(root, run, vocab, split, max_images) if split else None
    model = create_model(run, vocab)
    ckpt = load_checkpoint(model, run_dir / f"{which}.pt", run, vocab)
    model.to(device).eval()
    return LoadedRun(run_dir, root, run, vocab, model, ckpt, which, data)
