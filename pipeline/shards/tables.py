"""Parquet tables: captions, images, given boxes, hard negatives and scene graphs, each with a
fixed schema that writers are cast to and readers are checked against."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.shards.atomic import ShardError, atomic_path, provenance

CAPTIONS_SCHEMA = pa.schema([
    ("caption_id", pa.int64()), ("image_id", pa.int64()),
    ("split", pa.string()), ("text", pa.string()),
])

IMAGES_SCHEMA = pa.schema([
    ("image_id", pa.int64()), ("path", pa.string()), ("split", pa.string()),
    ("width", pa.int32()), ("height", pa.int32()),
])

# Boxes given to the extractor (``--boxes given``): flat x1,y1,x2,y2 per box, in pixels.
BOXES_SCHEMA = pa.schema([
    ("image_id", pa.int64()), ("boxes", pa.list_(pa.float32())), ("labels", pa.list_(pa.string())),
])

# Pairs of images that differ in one stated way, the ``kind`` (demo dataset: attribute binding,
# relation direction; context scenes also backdrop, specificity): the hard-negative evaluation
# asks whether a model tells the two apart.
HARD_NEGATIVES_SCHEMA = pa.schema([
    ("image_id", pa.int64()), ("partner_id", pa.int64()), ("kind", pa.string()),
])

GRAPHS_SCHEMA = pa.schema([
    ("caption_id", pa.int64()),
    ("tokens", pa.list_(pa.string())),
    ("lemmas", pa.list_(pa.string())),
    ("objects", pa.list_(pa.struct([("head", pa.string()), ("span", pa.string()),
                                    ("token_index", pa.int32())]))),
    ("attributes", pa.list_(pa.struct([("object", pa.int32()), ("attribute", pa.string())]))),
    ("relations", pa.list_(pa.struct([("subject", pa.int32()), ("predicate", pa.string()),
                                      ("object", pa.int32())]))),
])

SCHEMAS = {"captions": CAPTIONS_SCHEMA, "images": IMAGES_SCHEMA, "boxes": BOXES_SCHEMA,
           "hard_negatives": HARD_NEGATIVES_SCHEMA, "graphs": GRAPHS_SCHEMA}


def write_table(path, table: pa.Table | dict | list, kind: str, metadata: dict | None = None) -> Path:
    """Write a Parquet table of a known kind; columns are cast to (and checked against) its schema."""
    schema = SCHEMAS[kind]
    if isinstance(table, dict):
        table = pa.table(table)
    elif isinstance(table, list):
        table = pa.Table.from_pylist(table, schema=schema)
    missing = [n for n in schema.names if n not in table.column_names]
    if missing:
        raise ValueError(f"{path}: {kind} table lacks column(s) {missing}")
    table = table.select(schema.names).cast(schema)
    meta = {"itmkit": json.dumps(provenance(metadata))}
    table = table.replace_schema_metadata(meta)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=65536)
    return Path(path)


def read_table(path, kind: str | None = None, columns: list[str] | None = None) -> pa.Table:
    path = Path(path)
    if not path.exists():
        raise ShardError(f"{path}: file not found")
    try:
        table = pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError) as e:
        raise ShardError(f"{path}: cannot read as Parquet (truncated or corrupt?): {e}") from e
    if kind is not None:
        want = SCHEMAS[kind] if columns is None else pa.schema([SCHEMAS[kind].field(c) for c in columns])
        got = table.schema.remove_metadata()
        if not got.equals(want):
            raise ShardError(f"{path}: not a {kind} table; schema is\n{got}\nexpected\n{want}")
    return table


def table_metadata(path) -> dict:
    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta.get(b"itmkit", b"{}"))


# what a graphs row refers to by index: (list, its index fields)
_GRAPH_ENTRIES = (("objects", ("token_index",)), ("attributes", ("object",)), ("relations", ("subject", "object")))


def graph_row_problem(row: dict) -> str | None:
    """Why a graphs-table row cannot be read (a null where the parser always writes a value), or
    None. The schema lets Parquet store nulls anywhere, so a table written by another tool may
    hold them."""
    if row["tokens"] is None or None in row["tokens"]:
        return "'tokens' is null or holds a null"
    for name, keys in _GRAPH_ENTRIES:
        items = row[name]
        if items is None:
            return f"'{name}' is null (an empty list is written for none)"
        if any(item is None or any(item[k] is None for k in keys) for item in items):
            return f"'{name}' holds a null entry or index"
    return None
