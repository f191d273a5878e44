"""``describe``: the schema, counts and attributes of any itmkit file, for ``inspect``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.labels import LabelNames
from pipeline.shards.atomic import ShardError, read_json
from pipeline.shards.h5 import get_attrs, open_h5
from pipeline.shards.index import checked
from pipeline.shards.tables import read_table, table_metadata

GRAPH_ROWS = 5  # graphs inspect prints of a graphs table


def label_lines(obj_labels: np.ndarray, attr_labels: np.ndarray, attrs: dict, top: int = 10) -> list[str]:
    """The most frequent object and attribute labels of a region shard, by name."""
    if len(obj_labels) == 0 or (obj_labels < 0).all():
        return ["  labels       none (features imported without labels)"] if len(obj_labels) else []
    names = LabelNames.for_extractor(attrs.get("extractor"))
    lines = []
    for what, labels, name in (("objects", obj_labels, names.object),
                               ("attributes", attr_labels, names.attribute)):
        ids, counts = np.unique(labels[labels >= 0], return_counts=True)
        order = np.argsort(-counts, kind="stable")[:top]
        lines.append(f"  top {what:10s} " + ", ".join(f"{name(ids[i])} {counts[i]}" for i in order))
    if str(attrs.get("weights", "")).startswith("RANDOM"):
        lines.append("  (labels of an extractor with RANDOM weights: they name nothing in the images)")
    return lines


def describe(path) -> str:
    """Human-readable schema, counts and attributes of any itmkit file."""
    path = Path(path)
    lines = [f"{path}  ({path.stat().st_size if path.exists() else 0:,} bytes)"]
    if path.suffix in (".h5", ".hdf5"):
        f = open_h5(path)
        with f:
            for name, ds in f.items():
                chunks = f" chunks={ds.chunks}" if ds.chunks else ""
                comp = f" {ds.compression}" if ds.compression else ""
                lines.append(f"  {name:12s} {str(ds.dtype):8s} {ds.shape}{chunks}{comp}")
            if "offsets" in f:
                counts = np.diff(f["offsets"][:])
                if len(counts):
                    lines.append(f"  boxes/image  min {counts.min()} mean {counts.mean():.1f} max {counts.max()}")
            attrs = get_attrs(f)
            if "obj_labels" in f and "attr_labels" in f:
                lines += label_lines(f["obj_labels"][:], f["attr_labels"][:], attrs)
            for k, v in attrs.items():
                lines.append(f"  @{k} = {json.dumps(v) if not isinstance(v, str) else v}")
    elif path.suffix == ".parquet":
        table = read_table(path)
        lines.append(f"  rows {table.num_rows:,}")
        lines += [f"  {f.name:12s} {f.type}" for f in table.schema.remove_metadata()]
        if "split" in table.column_names:
            import pyarrow.compute as pc
            for s in pc.value_counts(table["split"]).to_pylist():
                lines.append(f"  split {s['values']}: {s['counts']:,}")
        for k, v in table_metadata(path).items():
            lines.append(f"  @{k} = {json.dumps(v)}")
        if {"tokens", "objects", "attributes", "relations"} <= set(table.column_names):
            from pipeline.sgparse import graph_lines

            lines.append(f"  first {min(GRAPH_ROWS, table.num_rows)} graph(s):")
            lines += ["    " + g for row in table.slice(0, GRAPH_ROWS).to_pylist() for g in graph_lines(row)]
    elif path.suffix == ".json":
        data = read_json(path)
        if "words" in data:
            lines.append(f"  vocabulary: {len(data['words']):,} words (min_count {data['min_count']}), "
                         f"{len(data['predicates']):,} predicates, {len(data['attributes']):,} attributes")
        elif "kinds" in data:
            for kind, lst in checked(data, path.parent, path)["kinds"].items():
                rows = sum(e["rows"] for e in lst)
                lines.append(f"  {kind:9s} {len(lst)} file(s), {rows:,} rows, "
                             f"configs {sorted({e['config_hash'] for e in lst})}")
        else:
            lines.append("  " + json.dumps(data)[:2000])
    else:
        raise ShardError(f"{path}: unknown file type (expected .h5, .parquet or .json)")
    return "\n".join(lines)
