"""Where the data root is, and other settings every command shares."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import yaml

DEFAULT_ROOT = "data"
CONFIG_FILE = Path("config") / "config.yaml"


def resolve_root(cli_value: str | None = None, config_file: Path = CONFIG_FILE) -> Path:
    """``--root`` beats ``$ITMKIT_DATA``, which beats ``root:`` in config/config.yaml
    (looked up from the current directory), which beats ``data/``."""
    if cli_value:
        return Path(cli_value)
    if os.environ.get("ITMKIT_DATA"):
        return Path(os.environ["ITMKIT_DATA"])
    if config_file.exists():
        cfg = yaml.safe_load(config_file.read_text()) or {}
        if cfg.get("root"):
            return Path(cfg["root"])
    return Path(DEFAULT_ROOT)


def add_root_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", default=None,
                        help="data root (default: $ITMKIT_DATA, else 'root' in config/config.yaml, else data/)")


def config_problems(config: dict, schema_file) -> list[str]:
    """One line per way ``config`` breaks the JSON schema in ``schema_file``, each naming the
    key (the workflow prints the first and stops, instead of a dump of the schema)."""
    import jsonschema

    schema = yaml.safe_load(Path(schema_file).read_text())
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(config),
                    key=lambda e: list(map(str, e.absolute_path)))
    out = []
    for e in errors:
        key = ".".join(map(str, e.absolute_path))
        if e.validator == "additionalProperties":
            unknown = sorted(set(e.instance) - set(e.schema.get("properties", {})))
            msg = f"unknown key(s) {', '.join(unknown)} (the keys are listed in {Path(schema_file).name})"
        else:
            msg = e.message
        out.append(f"{key}: {msg}" if key else msg)
    return out
