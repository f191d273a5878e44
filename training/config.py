"""The run: what train.py was asked to do, saved as ``<run>/config.json`` so that a run is
reproducible, resumable and evaluable from its folder alone."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import shards
from pipeline.config import typed_settings
from training import models
from training.checkpoint import CheckpointError


@dataclass
class RunSettings:
    """The RunConfig fields train.py's ``--set`` accepts next to the model config's. Validation
    shortlisted by a two-tower run (training/shortlist.py): the model re-scores only each query's
    val_topk best candidates; "" = every pair scored. Run settings, not model hyper-parameters:
    they choose how best.pt is picked, not what the model computes. ``pair_batches``: the
    hard-negative kinds (comma-separated, or ``all``) whose training-split pairs share a batch
    (``training.data.PairedBatchSampler``); "" = random batches, the papers' recipe."""
    val_shortlist: str = ""
    val_topk: int = 20
    pair_batches: str = ""


RUN_SETTINGS = tuple(f.name for f in dataclasses.fields(RunSettings))


@dataclass
class RunConfig:
    model: str
    dataset: str
    root: str
    seed: int = 0
    workers: int = 2
    train_split: str = "train"
    val_split: str = ""              # "" = val, else dev, whichever the dataset has
    max_len: int = 64
    max_images: int | None = None    # first N train images (quick runs)
    eval_batch_size: int = 128
    val_shortlist: str = ""          # RunSettings
    val_topk: int = 20
    pair_batches: str = ""
    model_config: dict = field(default_factory=dict)   # the resolved ModelConfig
    shard_hashes: dict = field(default_factory=dict)   # kind -> config hash trained on
    vocab_fingerprint: str = ""

    def model_cfg(self) -> models.ModelConfig:
        return models.make_config(models.get(self.model).config_class, self.model_config, saved=True)

    def save(self, run_dir) -> None:
        shards.write_json(Path(run_dir) / "config.json", dataclasses.asdict(self))

    @classmethod
    def load(cls, run_dir) -> "RunConfig":
        path = Path(run_dir) / "config.json"
        if not path.exists():
            raise CheckpointError(f"{run_dir}: not a run dir (no config.json)")
        data = shards.read_json(path)
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise CheckpointError(f"{path}: unknown key(s) {sorted(unknown)}")
        return cls(**data)


def dataset_key(name: str) -> str | None:
    """The family (``coco``, ``f30k``) of a dataset told by its name alone, for scripts that have
    no data root; commands read the dataset's record (``pipeline.manifest.dataset_defaults``)."""
    from pipeline.manifest import family_from_name

    return family_from_name(name)


def parse_overrides(items: list[str], config_class) -> dict:
    """``--set lr=1e-4 --set lr_decay_epochs=10,20`` -> typed dict (types from the dataclass)."""
    return typed_settings(items, config_class, f"model config {config_class.__name__}")


def parse_run_settings(items: list[str], config_class) -> tuple[dict, dict]:
    """train.py's ``--set`` items split into the run settings (``RunSettings``, typed) and the
    model config's overrides (typed by ``config_class``)."""
    ours = [s for s in items if s.partition("=")[0].strip() in RUN_SETTINGS]
    return (typed_settings(ours, RunSettings, "the run settings"),
            typed_settings([s for s in items if s not in ours], config_class,
                           f"model config {config_class.__name__} (run settings: {', '.join(RUN_SETTINGS)})"))


def parse_shared_overrides(items: list[str], config_class) -> dict:
    """``parse_overrides`` of the items whose key ``config_class`` has; the others are skipped,
    so one ``--set`` list can serve several models (the benchmarks' use)."""
    known = {f.name for f in dataclasses.fields(config_class)}
    return parse_overrides([s for s in items if s.partition("=")[0].strip() in known], config_class)
