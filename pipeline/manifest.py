"""Dataset manifests (manifests/*.yaml): loading, command-line overrides, schema validation.

A manifest says where a dataset's images and annotation files live (paths relative to its
``source_root``), how its source splits map onto train/val/test, and which counts to expect.
Overrides (``--source-root``, ``--images-dir``, ``--annotations``, ``--set key=value``) are
applied before validation, so a wrong override is reported like a wrong manifest: by field name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import jsonschema
import yaml

from pipeline.config import UsageError, parse_settings, setting_value
from pipeline.images import MAX_PIXELS

# The shipped manifests: the checkout's top-level manifests/, which a wheel carries as
# pipeline/manifests/ (pyproject.toml maps it there).
MANIFEST_DIR = Path(__file__).resolve().parent / "manifests"     # installed from a wheel
if not MANIFEST_DIR.is_dir():
    MANIFEST_DIR = Path(__file__).resolve().parents[1] / "manifests"   # a checkout
SCHEMA_FILE = MANIFEST_DIR / "schema.yaml"
SPLITS = ("train", "val", "test")

DEFAULTS = {"min_captions": 5, "max_tokens": 200, "path_template": "{filename}",
            "split_fractions": {"train": 0.8, "val": 0.1, "test": 0.1}, "expected": None,
            "protocols": [], "columns": {}, "allowed_image_dirs": [], "content_duplicates": "report",
            "max_pixels": MAX_PIXELS}


# The evaluation protocols of a family's test split (training/evaluation.py), for a manifest that
# names none; a dataset of no family is scored on its whole test split.
FAMILY_PROTOCOLS = {"coco": ("coco-1k", "coco-5k"), "f30k": ("f30k-1k",)}
WHOLE_SPLIT = "whole"


class ManifestError(ValueError):
    """A manifest is missing, not YAML, or does not follow manifests/schema.yaml."""


@dataclass
class Manifest:
    name: str
    format: str
    file: Path                      # where the manifest was read from
    data: dict = field(repr=False)  # the validated manifest, overrides applied, defaults filled

    def __getitem__(self, key):
        return self.data[key]

    def get(self, key, default=None):
        return self.data.get(key, default)

    @property
    def source_root(self) -> Path:
        return Path(os.path.expanduser(self.data.get("source_root", ".")))

    def path(self, rel: str) -> Path:
        """A manifest path: absolute as given, else under ``source_root``."""
        p = Path(os.path.expanduser(rel))
        return p if p.is_absolute() else self.source_root / p

    @property
    def images_dir(self) -> Path:
        return self.path(self.data["images"])

    def image_dirs(self) -> list[Path]:
        """The folders image paths may resolve into: ``images``, then ``allowed_image_dirs``."""
        return [self.images_dir] + [self.path(d) for d in self.data.get("allowed_image_dirs", [])]

    def annotation_files(self) -> list[dict]:
        """[{file: Path, split, images: Path}] for every annotation file."""
        ann = self.data["annotations"]
        if isinstance(ann, str):
            return [{"file": self.path(ann), "split": None, "images": self.images_dir}]
        return [{"file": self.path(a["file"]), "split": a["split"],
                 "images": self.images_dir / a.get("images", "")} for a in ann]

    def resolved(self) -> dict:
        """The manifest with its paths made absolute (what the config hash is taken of)."""
        out = dict(self.data)
        out["source_root"] = str(self.source_root.resolve())
        if "images" in out:
            out["images"] = str(self.images_dir.resolve())
        if out.get("allowed_image_dirs"):
            out["allowed_image_dirs"] = [str(d.resolve()) for d in self.image_dirs()[1:]]
        if "annotations" in out:
            out["annotations"] = [{"file": str(a["file"].resolve()), "split": a["split"],
                                   "images": str(a["images"].resolve())} for a in self.annotation_files()]
        return out


def find(name_or_path: str | os.PathLike) -> Path:
    """Any path, or ``manifests/coco.yaml`` / ``coco`` looked up in the shipped manifests
    (so that they are found from any working directory, in a checkout or installed)."""
    p = Path(name_or_path)
    if p.is_file():  # not a folder: `--manifest coco` where the working directory has a coco/ folder
        return p
    candidates = [MANIFEST_DIR.parent / p] if not p.is_absolute() else []
    if p.parent == Path("."):
        candidates += [MANIFEST_DIR / p, MANIFEST_DIR / f"{p}.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ManifestError(f"{p}: manifest not found (give a path, or one of: "
                        f"{', '.join(sorted(m.stem for m in MANIFEST_DIR.glob('*.yaml') if m.stem != 'schema'))})")


def parse_set(items: list[str] | None) -> dict:
    """``["expected=null", "demo.images=50"]`` -> {"expected": None, "demo.images": 50}: the
    ``--set`` grammar of every command (pipeline/config.py); a key must start with a field of the
    schema."""
    try:
        settings = parse_settings(items)
    except UsageError as e:
        raise ManifestError(str(e)) from None
    fields = sorted(_schema()["properties"])
    for key in settings:
        if key.split(".")[0] not in fields:
            raise UsageError(f"--set {key}: a manifest has no field '{key.split('.')[0]}'; "
                             f"its fields: {', '.join(fields)}")
    return {key: setting_value(key, text) for key, text in settings.items()}


def apply_overrides(data: dict, overrides: dict) -> dict:
    """Set dotted keys (``expected.splits.test``), creating mappings on the way."""
    data = yaml.safe_load(yaml.safe_dump(data))  # deep copy
    for key, value in overrides.items():
        node, parts = data, key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    return data


def _schema() -> dict:
    if not SCHEMA_FILE.exists():
        raise ManifestError(f"{SCHEMA_FILE}: manifest schema not found (incomplete checkout or installation?)")
    return yaml.safe_load(SCHEMA_FILE.read_text())


def validate(data, source: str) -> None:
    validator = jsonschema.Draft202012Validator(_schema())
    errors = sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))
    if errors:
        lines = []
        for e in errors:
            where = ".".join(str(p) for p in e.absolute_path) or "(top level)"
            lines.append(f"  field '{where}': {e.message}")
        raise ManifestError(f"{source}: invalid manifest\n" + "\n".join(lines))


def load(name_or_path, *, source_root: str | None = None, images_dir: str | None = None,
         annotations: str | None = None, name: str | None = None,
         sets: list[str] | None = None) -> Manifest:
    """Read, override, validate. Command-line paths are taken relative to the working
    directory (they do not go under ``source_root``)."""
    path = find(name_or_path)
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: a manifest is a YAML mapping, got {type(data).__name__}")
    overrides = parse_set(sets)
    cli = {"source_root": source_root, "name": name,
           "images": None if images_dir is None else str(Path(images_dir).resolve()),
           "annotations": None if annotations is None else str(Path(annotations).resolve())}
    overrides.update({k: v for k, v in cli.items() if v is not None})
    data = apply_overrides(data, overrides)
    validate(data, str(path))
    for key, value in DEFAULTS.items():
        data.setdefault(key, value)
    if data["format"] == "folder" and abs(sum(data["split_fractions"].values()) - 1) > 1e-6:
        raise ManifestError(f"{path}: field 'split_fractions': the fractions sum to "
                            f"{sum(data['split_fractions'].values())}, not 1")
    return Manifest(data["name"], data["format"], path, data)


# ---------------------------------------------------------------------------------------------
# what a dataset is: its family and protocols, recorded at ingest in images.parquet

@dataclass(frozen=True)
class DatasetDefaults:
    family: str | None             # coco, f30k or None: the per-family model defaults
    protocols: tuple[str, ...]     # what `itmkit evaluate` and `itmkit report` score by default
    recorded: bool = True          # False: a dataset written before the record, judged by its name


def dataset_record(family: str | None, protocols) -> dict:
    """The ``dataset`` entry of images.parquet's metadata, written at ingest (and by demo and
    import-precomp)."""
    return {"family": family, "protocols": list(protocols)}


def manifest_record(m: Manifest) -> dict:
    return dataset_record(m.get("family"), m.get("protocols", []))


def family_from_name(name: str) -> str | None:
    """The family of a dataset that recorded none (written by an earlier version, or imported
    from precomp features, which come without a manifest): by its name."""
    low = name.lower()
    return "coco" if "coco" in low else "f30k" if ("f30k" in low or "flickr" in low) else None


def dataset_defaults(root, name: str) -> DatasetDefaults:
    """Every per-dataset default, from the record in ``root/name/images.parquet``: the family,
    and the protocols (the recorded ones, else the family's, else the whole test split). A
    dataset without a record (written before it was kept) is judged by its name, as before. A
    missing dataset is a ShardError naming the datasets that are under ``root``."""
    from pipeline import shards

    layout = shards.Layout(Path(root), name)
    if not layout.dir.is_dir():
        there = sorted(p.name for p in Path(root).iterdir() if (p / "shards.json").exists()) \
            if Path(root).is_dir() else []
        raise shards.ShardError(f"no dataset '{name}' under {root} ("
                                + (f"its datasets: {', '.join(there)}" if there else "none there")
                                + "); pass --root, or create it with `itmkit ingest` or `itmkit demo`")
    record = shards.table_metadata(layout.images).get("dataset") if layout.images.exists() else None
    if record is None:
        family = family_from_name(name)
        return DatasetDefaults(family, FAMILY_PROTOCOLS.get(family, FAMILY_PROTOCOLS["f30k"]), recorded=False)
    family = record.get("family")
    protocols = tuple(record.get("protocols") or FAMILY_PROTOCOLS.get(family, (WHOLE_SPLIT,)))
    return DatasetDefaults(family, protocols)
