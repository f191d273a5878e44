"""The store: the one package that reads and writes every itmkit file format.

Formats (docs/formats.md): region and grid HDF5 shards, caption / graph / image / box Parquet
tables, the vocabulary JSON, and the per-dataset ``shards.json`` index. One module per job:

- ``atomic``: atomic writes (a temporary name unique to the process, fsync, rename), claims on
  a file being written, hashing, provenance
- ``h5``: HDF5 handles opened lazily per process, only for a file that holds all its data
  itself (no external, virtual or linked datasets), and the chunk decoder (both shard kinds)
- ``regions``, ``grid``: the two HDF5 shard kinds
- ``tables``: the Parquet schemas
- ``vocabulary``: vocab.json, word vectors and the trainer's ``Vocabulary``
- ``layout``: where every file lives; the only code that builds or parses a shard's name
- ``index``: ``shards.json`` (every entry checked to stay inside the dataset folder) and the
  currency rule (which files are current), pruning
- ``describe``: what ``inspect`` prints

Every reader turns a truncated or malformed file into a ``ShardError`` that names the file.
"""

from pipeline.shards.atomic import (ShardError, atomic_path, claim, config_hash, now_iso, read_json,
                                    sha256_file, software_versions, write_json)
from pipeline.shards.describe import describe
from pipeline.shards.grid import GridShard, write_grid
from pipeline.shards.index import (INDEX_NAME, KINDS, Entry, Pruned, ShardIndex,
                                   resolve_config_hashes)
from pipeline.shards.layout import SHARD_FILES, SPLIT_KINDS, Layout, ShardName
from pipeline.shards.regions import FEATURE_DIM, REGION_FIELDS, Regions, RegionShard, RegionShardWriter, write_regions
from pipeline.shards.tables import (BOXES_SCHEMA, CAPTIONS_SCHEMA, GRAPHS_SCHEMA, HARD_NEGATIVES_SCHEMA,
                                    IMAGES_SCHEMA, SCHEMAS, read_table, table_metadata, write_table)
from pipeline.shards.vocabulary import (VOCAB_SPECIALS, Vocabulary, read_vectors, read_vocab,
                                        write_vectors, write_vocab)

__all__ = [
    "ShardError", "atomic_path", "claim", "config_hash", "now_iso", "read_json", "sha256_file",
    "software_versions", "write_json", "describe", "GridShard", "write_grid", "INDEX_NAME", "KINDS",
    "Entry", "Pruned", "ShardIndex", "resolve_config_hashes", "SHARD_FILES", "SPLIT_KINDS", "Layout",
    "ShardName", "FEATURE_DIM", "REGION_FIELDS", "Regions", "RegionShard", "RegionShardWriter",
    "write_regions", "BOXES_SCHEMA", "CAPTIONS_SCHEMA", "GRAPHS_SCHEMA", "HARD_NEGATIVES_SCHEMA",
    "IMAGES_SCHEMA", "SCHEMAS", "read_table", "table_metadata", "write_table", "VOCAB_SPECIALS",
    "Vocabulary", "read_vectors", "read_vocab", "write_vectors", "write_vocab",
]
