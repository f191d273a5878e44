"""The run: what train.py was asked to do, saved as ``<run>/config.json`` so that a run is
reproducible, resumable and evaluable from its folder alone."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import shards
from training import models
from training.checkpoint import CheckpointError


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
    # validation shortlisted by a two-tower run (training/shortlist.py): the model re-scores only
    # each query's val_topk best candidates; "" = every pair scored. Run settings, not model
    # hyper-parameters: they choose how best.pt is picked, not what the model computes.
    val_shortlist: str = ""
    val_topk: int = 20
    model_config: dict = field(default_factory=dict)   # the resolved ModelConfig
    shard_hashes: dict = field(default_factory=dict)   # kind -> config hash trained on
    vocab_fingerprint: str = ""

    def model_cfg(self) -> models.ModelConfig:
        return models.make_config(models.get(self.model).config_class, self.model_config)

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


# RunConfig fields that train.py's --set accepts next to the model config's
RUN_SETTINGS = ("val_shortlist", "val_topk")


def dataset_key(name: str) -> str:
    """Per-dataset defaults are keyed ``coco`` / ``f30k``; other names get the plain defaults."""
    low = name.lower()
    return "coco" if "coco" in low else "f30k" if ("f30k" in low or "flickr" in low) else name


def _defaults(config_class) -> dict:
    """The default of every field that has one."""
    return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(config_class)
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}


def parse_overrides(items: list[str], config_class, also: tuple[str, ...] = ()) -> dict:
    """``--set lr=1e-4 --set lr_decay_epochs=10,20`` -> typed dict (types from the dataclass's
    defaults). ``also``: keys accepted elsewhere, named in the error for an unknown key."""
    defaults = _defaults(config_class)
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in defaults:
            names = ", ".join([*defaults, *also])
            raise ValueError(f"--set {item}: expected KEY=VALUE with KEY one of: {names}")
        current = defaults[key]
        try:
            if isinstance(current, bool):
                out[key] = value.lower() in ("1", "true", "yes", "on")
            elif isinstance(current, tuple):
                out[key] = tuple(type(current[0])(v) if current else int(v) for v in value.split(",") if v)
            elif current is None:
                out[key] = value
            else:
                out[key] = type(current)(value)
        except ValueError:
            raise ValueError(f"--set {item}: '{value}' is not a valid {key} (like {current!r})") from None
    return out


def parse_run_settings(items: list[str], config_class) -> tuple[dict, dict]:
    """train.py's ``--set`` items split into the run settings (``RUN_SETTINGS``, typed) and the
    model config's overrides (typed by ``config_class``)."""
    ours = [s for s in items if s.partition("=")[0] in RUN_SETTINGS]
    return (parse_overrides(ours, RunConfig),
            parse_overrides([s for s in items if s not in ours], config_class, RUN_SETTINGS))


def parse_shared_overrides(items: list[str], config_class) -> dict:
    """``parse_overrides`` of the items whose key ``config_class`` has; the others are skipped,
    so one ``--set`` list can serve several models (the benchmarks' use)."""
    known = {f.name for f in dataclasses.fields(config_class)}
    return parse_overrides([s for s in items if s.partition("=")[0] in known], config_class)
