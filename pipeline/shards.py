"""The one module that reads and writes every itmkit file format.

Formats (see DESIGN.md): region and grid HDF5 shards, caption / graph / image / box Parquet
tables, the vocabulary JSON, and the per-dataset ``shards.json`` index. Every writer is atomic:
it writes ``<name>.tmp``, fsyncs and renames, so a killed writer never leaves a half file under
the final name. Every reader turns a truncated or malformed file into a ``ShardError`` that
names the file.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import mmap
import os
import platform
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import __version__

FEATURE_DIM = 2048
INDEX_NAME = "shards.json"
KINDS = ("images", "captions", "boxes", "hard_negatives", "regions", "grid", "graphs", "vocab")


class ShardError(RuntimeError):
    """A shard (or shards.json) is missing, truncated, malformed or inconsistent."""


# ---------------------------------------------------------------------------------------------
# atomic writes, hashing, provenance

@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path; on success fsync it and rename it onto ``path``.

    On any exception the temporary file is removed and ``path`` (if it existed) is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike):
    path = Path(path)
    if not path.exists():
        raise ShardError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{path}: not valid JSON (truncated or corrupt): {e}") from e


def sha256_file(path: str | os.PathLike, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def config_hash(cfg) -> str:
    """Stable short hash of a JSON-able config (key order does not matter)."""
    blob = json.dumps(cfg, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def software_versions() -> dict:
    import importlib.metadata as md

    out = {"itmkit": __version__, "python": platform.python_version()}
    for pkg in ("numpy", "h5py", "pyarrow", "torch", "torchvision", "spacy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _provenance(attrs: dict | None) -> dict:
    attrs = dict(attrs or {})
    attrs.setdefault("created", now_iso())
    attrs.setdefault("software", software_versions())
    return attrs


def _set_attrs(obj, attrs: dict) -> None:
    for k, v in attrs.items():
        obj.attrs[k] = v if isinstance(v, (int, float, str, np.ndarray)) else json.dumps(v)


def _get_attrs(obj) -> dict:
    out = {}
    for k, v in obj.attrs.items():
        if isinstance(v, bytes):
            v = v.decode()
        if isinstance(v, str) and v[:1] in "{[":
            with contextlib.suppress(json.JSONDecodeError):
                v = json.loads(v)
        elif isinstance(v, np.generic):
            v = v.item()
        out[k] = v
    return out


def _open_h5(path: Path) -> h5py.File:
    if not path.exists():
        raise ShardError(f"{path}: file not found")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise ShardError(f"{path}: cannot open as HDF5 (truncated or half-written?): {e}") from e


# ---------------------------------------------------------------------------------------------
# region shards

REGION_FIELDS = {  # name -> (dtype, trailing shape)
    "features": (np.float16, (FEATURE_DIM,)),
    "boxes": (np.float32, (4,)),
    "obj_labels": (np.int32, ()),
    "obj_scores": (np.float32, ()),
    "attr_labels": (np.int32, ()),
    "attr_scores": (np.float32, ()),
}


@dataclass
class Regions:
    """The regions of one image. ``features`` is [n, D] float16, ``boxes`` [n, 4] pixels."""

    image_id: int
    image_hw: tuple[int, int]
    features: np.ndarray
    boxes: np.ndarray | None = None
    obj_labels: np.ndarray | None = None
    obj_scores: np.ndarray | None = None
    attr_labels: np.ndarray | None = None
    attr_scores: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.features)

    def column(self, name: str) -> np.ndarray:
        dtype, tail = REGION_FIELDS[name]
        if name == "features":  # any width; the writer checks it against its feature_dim
            tail = np.shape(self.features)[1:]
        value = getattr(self, name)
        if value is None:  # labels unknown (e.g. imported precomp features)
            fill = -1 if np.issubdtype(dtype, np.integer) else np.nan
            return np.full((len(self),) + tail, fill, dtype=dtype)
        value = np.asarray(value, dtype=dtype)
        if value.shape != (len(self),) + tail:
            raise ValueError(f"image {self.image_id}: {name} has shape {value.shape}, "
                             f"expected {(len(self),) + tail}")
        return value


class RegionShardWriter:
    """Stream images into one region shard; the file appears under its name only on close().

    ``boxes_per_chunk`` sets the HDF5 chunk height of the per-box datasets. With fixed-K shards
    it is K, so reading one image touches exactly one chunk; with variable box counts pass the
    maximum box count (an image then touches at most two chunks).
    """

    FLUSH_BOXES = 4096  # about 16 MB of float16 features buffered between writes

    def __init__(self, path, *, boxes_per_chunk: int = 36, feature_dim: int = FEATURE_DIM,
                 compression: str | None = None, attrs: dict | None = None):
        self.path = Path(path)
        self._ctx = atomic_path(self.path)
        self._tmp = self._ctx.__enter__()
        self._f = h5py.File(self._tmp, "w")
        self._n_boxes, self._written = 0, 0
        self._ids, self._hw, self._offsets = [], [], [0]
        fields = dict(REGION_FIELDS, features=(np.float16, (feature_dim,)))
        self._dsets = {}
        for name, (dtype, tail) in fields.items():
            self._dsets[name] = self._f.create_dataset(
                name, shape=(0,) + tail, maxshape=(None,) + tail, dtype=dtype,
                chunks=(boxes_per_chunk,) + tail, compression=compression,
                shuffle=compression is not None)
        self._pending = {name: [] for name in self._dsets}
        _set_attrs(self._f, _provenance(attrs))

    def append(self, r: Regions) -> None:
        n = len(r)
        if r.features.ndim != 2 or r.features.shape[1] != self._dsets["features"].shape[1]:
            raise ValueError(f"image {r.image_id}: features shape {r.features.shape}, "
                             f"expected [n, {self._dsets['features'].shape[1]}]")
        for name in self._dsets:
            self._pending[name].append(r.column(name))
        self._n_boxes += n
        self._ids.append(int(r.image_id))
        self._hw.append(tuple(int(v) for v in r.image_hw))
        self._offsets.append(self._n_boxes)
        if self._n_boxes - self._written >= self.FLUSH_BOXES:
            self._flush()

    def _flush(self) -> None:
        """Write the buffered images with one resize and one write per dataset: per-image
        writes cost more in HDF5 bookkeeping than in bytes."""
        start, stop = self._written, self._n_boxes
        for name, ds in self._dsets.items():
            ds.resize(stop, axis=0)
            if stop > start:
                ds[start:stop] = np.concatenate(self._pending[name])
            self._pending[name] = []
        self._written = stop

    def close(self) -> Path:
        self._flush()
        f = self._f
        f.create_dataset("image_ids", data=np.asarray(self._ids, dtype=np.int64).reshape(-1))
        f.create_dataset("image_hw", data=np.asarray(self._hw, dtype=np.int32).reshape(-1, 2))
        f.create_dataset("offsets", data=np.asarray(self._offsets, dtype=np.int64))
        f.attrs["num_images"] = len(self._ids)
        f.attrs["num_boxes"] = self._n_boxes
        f.close()
        self._ctx.__exit__(None, None, None)
        return self.path

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._f.close()
        with contextlib.suppress(Exception):
            self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False


def write_regions(path, images: Iterable[Regions], **kwargs) -> Path:
    with RegionShardWriter(path, **kwargs) as w:
        for r in images:
            w.append(r)
    return Path(path)


class _LazyH5:
    """Opens its HDF5 file on first use in each process, so it can be handed to DataLoader
    workers (an h5py handle must not cross a fork)."""

    def __init__(self, path):
        self.path = Path(path)
        self._f, self._pid, self._dsets, self._layouts, self._mmap = None, None, {}, {}, None

    @property
    def file(self) -> h5py.File:
        if self._f is None or self._pid != os.getpid():
            self._f, self._pid = _open_h5(self.path), os.getpid()
            self._dsets, self._layouts, self._mmap = {}, {}, None
        return self._f

    def dataset(self, name: str) -> h5py.Dataset:
        f = self.file
        if name not in self._dsets:
            try:
                self._dsets[name] = f[name]
            except KeyError as e:
                raise ShardError(f"{self.path}: no dataset '{name}' (not an itmkit shard?)") from e
        return self._dsets[name]

    def close(self) -> None:
        if self._f is not None and self._pid == os.getpid():
            self._f.close()
            if self._mmap is not None:
                self._mmap.close()
        self._f, self._dsets, self._layouts, self._mmap = None, {}, {}, None

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])

    def read(self, name: str, sel=slice(None)):
        try:
            return self.dataset(name)[sel]
        except ShardError:
            raise
        except (OSError, KeyError, ValueError) as e:
            raise ShardError(f"{self.path}: cannot read '{name}' (truncated or corrupt?): {e}") from e

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) along axis 0. When they lie in one chunk stored raw or with
        deflate(+shuffle), the chunk's bytes are taken from a memory map of the file and
        decoded here, which skips HDF5's per-call overhead (the common case: one image of a
        fixed-K shard costs about what a memory-mapped .npy read costs)."""
        layout = self._chunk_layout(name)
        if layout is not None and start in layout.table and 0 < stop - start <= layout.rows:
            offset, size = layout.table[start]
            raw = memoryview(self._mmap)[offset:offset + size]
            try:
                if layout.compression == "gzip":
                    raw = zlib.decompress(raw)
                buf = np.frombuffer(raw, dtype=np.uint8)
                if layout.shuffle:  # HDF5's shuffle filter stores byte k of every element together
                    buf = buf.reshape(layout.dtype.itemsize, -1).T
                out = buf.copy().view(layout.dtype).reshape(layout.shape)
            except (ValueError, zlib.error) as e:
                raise ShardError(f"{self.path}: cannot decode '{name}' rows {start}:{stop} "
                                 f"(truncated or corrupt?): {e}") from e
            return out[: stop - start]
        return self.read(name, slice(start, stop))

    def _chunk_layout(self, name: str) -> "_ChunkLayout | None":
        ds = self.dataset(name)
        if name not in self._layouts:
            self._layouts[name] = _ChunkLayout.of(ds, self.path)
            if self._layouts[name] is not None and self._mmap is None:
                with open(self.path, "rb") as f:
                    self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._layouts[name]


@dataclass
class _ChunkLayout:
    """Where each chunk of a dataset lies in the file (first row -> byte offset, size)."""

    rows: int
    shape: tuple
    dtype: np.dtype
    compression: str | None
    shuffle: bool
    table: dict

    @classmethod
    def of(cls, ds: h5py.Dataset, path: Path) -> "_ChunkLayout | None":
        if ds.chunks is None or ds.compression not in (None, "gzip") or ds.shape[0] == 0:
            return None
        table, file_size = {}, path.stat().st_size

        def add(info):
            if info.filter_mask == 0 and info.byte_offset + info.size <= file_size:
                table[info.chunk_offset[0]] = (info.byte_offset, info.size)

        try:
            ds.id.chunk_iter(add)
        except (AttributeError, OSError, ValueError):  # HDF5 < 1.12.3, or damaged index
            return None
        return cls(ds.chunks[0], ds.chunks, ds.dtype, ds.compression, bool(ds.shuffle), table)


class RegionShard(_LazyH5):
    """Random access to one region shard. Small index arrays are read once per process."""

    def __init__(self, path):
        super().__init__(path)
        self._index = None

    @property
    def index(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._index is None:
            ids, hw, off = self.read("image_ids"), self.read("image_hw"), self.read("offsets")
            n_boxes = self.file["features"].shape[0]
            if len(off) != len(ids) + 1 or off[0] != 0 or off[-1] != n_boxes or np.any(np.diff(off) < 0):
                raise ShardError(f"{self.path}: offsets inconsistent with {len(ids)} images "
                                 f"and {n_boxes} boxes")
            self._index = (ids, hw, off)
        return self._index

    @property
    def image_ids(self) -> np.ndarray:
        return self.index[0]

    @property
    def attrs(self) -> dict:
        return _get_attrs(self.file)

    def __len__(self) -> int:
        return len(self.image_ids)

    def box_counts(self) -> np.ndarray:
        return np.diff(self.index[2])

    def get(self, row: int, fields: Sequence[str] = tuple(REGION_FIELDS)) -> Regions:
        ids, hw, off = self.index
        sel = slice(int(off[row]), int(off[row + 1]))
        cols = {name: self.read_rows(name, sel.start, sel.stop) if sel.stop > sel.start
                else self.read(name, sel) for name in fields}
        return Regions(int(ids[row]), (int(hw[row, 0]), int(hw[row, 1])), **cols)

    def __iter__(self) -> Iterator[Regions]:
        for i in range(len(self)):
            yield self.get(i)


# ---------------------------------------------------------------------------------------------
# grid shards

def write_grid(path, image_ids: np.ndarray, features: np.ndarray, grid_hw: tuple[int, int],
               attrs: dict | None = None, compression: str | None = None) -> Path:
    """``features`` is [N, H*W, C]; stored float16, one chunk per image."""
    features = np.asarray(features, dtype=np.float16)
    gh, gw = grid_hw
    if features.ndim != 3 or features.shape[1] != gh * gw or len(features) != len(image_ids):
        raise ValueError(f"grid features of shape {features.shape} do not match "
                         f"{len(image_ids)} images on a {gh}x{gw} grid")
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("image_ids", data=np.asarray(image_ids, dtype=np.int64))
        chunks = (1,) + features.shape[1:] if len(features) else None
        f.create_dataset("features", data=features, chunks=chunks, compression=compression,
                         shuffle=compression is not None)
        _set_attrs(f, _provenance(attrs))
        f.attrs["grid_h"], f.attrs["grid_w"] = gh, gw
        f.attrs["num_images"] = len(image_ids)
    return Path(path)


class GridShard(_LazyH5):
    @property
    def image_ids(self) -> np.ndarray:
        return self.read("image_ids")

    @property
    def attrs(self) -> dict:
        return _get_attrs(self.file)

    @property
    def grid_hw(self) -> tuple[int, int]:
        a = self.file.attrs
        return int(a["grid_h"]), int(a["grid_w"])

    def __len__(self) -> int:
        return len(self.image_ids)

    def get(self, row: int) -> np.ndarray:
        return self.read_rows("features", row, row + 1)[0]


# ---------------------------------------------------------------------------------------------
# Parquet tables

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

# Pairs of images that differ only in attribute binding or relation direction (demo dataset):
# the hard-negative evaluation asks whether a model tells the two apart.
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
    meta = {"itmkit": json.dumps(_provenance(metadata))}
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


# ---------------------------------------------------------------------------------------------
# vocabulary

VOCAB_SPECIALS = ("<pad>", "<start>", "<end>", "<unk>")


def write_vocab(path, vocab: dict) -> Path:
    """``vocab`` must hold ``words`` (list of [word, count], specials first with ``<pad>`` at 0),
    ``min_count``, ``predicates`` and ``attributes`` (same [name, count] form)."""
    words = [w for w, _ in vocab["words"]]
    if tuple(words[:len(VOCAB_SPECIALS)]) != VOCAB_SPECIALS:
        raise ValueError(f"vocabulary must start with {VOCAB_SPECIALS}, got {words[:4]}")
    if len(set(words)) != len(words):
        raise ValueError("vocabulary has duplicate words")
    for key in ("min_count", "predicates", "attributes"):
        if key not in vocab:
            raise ValueError(f"vocabulary lacks '{key}'")
    write_json(path, dict(vocab, itmkit=_provenance(vocab.get("itmkit"))))
    return Path(path)


def read_vocab(path) -> dict:
    vocab = read_json(path)
    words = [w for w, _ in vocab.get("words", [])]
    if tuple(words[:len(VOCAB_SPECIALS)]) != VOCAB_SPECIALS:
        raise ShardError(f"{path}: not an itmkit vocabulary (specials missing)")
    return vocab


def write_vectors(path, vectors: np.ndarray) -> Path:
    """Word vectors of a vocabulary: float32 [len(vocab), dim], rows in vocabulary id order."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"{path}: word vectors must be 2-D, got shape {vectors.shape}")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, vectors)
    return Path(path)


def read_vectors(path, vocab_size: int | None = None) -> np.ndarray:
    path = Path(path)
    if not path.exists():
        raise ShardError(f"{path}: file not found")
    try:
        vectors = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ShardError(f"{path}: cannot read as .npy (truncated or corrupt?): {e}") from e
    if vectors.ndim != 2 or (vocab_size is not None and len(vectors) != vocab_size):
        raise ShardError(f"{path}: word vectors of shape {vectors.shape} do not match a vocabulary "
                         f"of {vocab_size} words")
    return vectors


class Vocabulary:
    """Word <-> id maps of a vocab.json, with the encode/decode the trainer uses.

    Tokens are looked up lowercased; unknown ones map to ``<unk>``. ``predicates`` and
    ``attributes`` are separate id spaces (0 is reserved for unknown in both)."""

    PAD, START, END, UNK = range(4)

    def __init__(self, vocab: dict):
        self.data = vocab
        self.itos = [w for w, _ in vocab["words"]]
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.predicates = ["<unk>"] + [p for p, _ in vocab["predicates"]]
        self.attributes = ["<unk>"] + [a for a, _ in vocab["attributes"]]
        self._pred = {p: i for i, p in enumerate(self.predicates)}
        self._attr = {a: i for i, a in enumerate(self.attributes)}

    @classmethod
    def load(cls, path) -> "Vocabulary":
        return cls(read_vocab(path))

    def __len__(self) -> int:
        return len(self.itos)

    @property
    def fingerprint(self) -> str:
        """Identifies the word list: a checkpoint trained on another vocab must not load."""
        return config_hash(self.itos)

    def encode(self, tokens: Sequence[str], add_special: bool = True) -> list[int]:
        ids = [self.stoi.get(t.lower(), self.UNK) for t in tokens]
        return [self.START] + ids + [self.END] if add_special else ids

    def decode(self, ids: Iterable[int], strip_special: bool = True) -> list[str]:
        words = [self.itos[int(i)] for i in ids]
        return [w for w in words if w not in VOCAB_SPECIALS] if strip_special else words

    def predicate_id(self, predicate: str) -> int:
        return self._pred.get(predicate.lower(), 0)

    def attribute_id(self, attribute: str) -> int:
        return self._attr.get(attribute.lower(), 0)


# ---------------------------------------------------------------------------------------------
# shards.json: the per-dataset index of what was written, by which config, from which inputs

@dataclass
class Entry:
    kind: str
    path: str           # relative to the dataset folder
    sha256: str
    size: int
    rows: int
    config_hash: str
    inputs_hash: str = ""
    version: str = __version__
    created: str = field(default_factory=now_iso)
    extra: dict = field(default_factory=dict)


class ShardIndex:
    """``<dataset_dir>/shards.json``. Every update re-reads the file under an exclusive lock,
    so parallel jobs (Snakemake, dask workers) can register outputs into the same index."""

    def __init__(self, dataset_dir, name: str | None = None):
        self.dir = Path(dataset_dir)
        self.path = self.dir / INDEX_NAME
        self.name = name or self.dir.name

    # -- reading
    def load(self) -> dict:
        if not self.path.exists():
            return {"dataset": self.name, "itmkit_version": __version__, "kinds": {}}
        data = read_json(self.path)
        if not isinstance(data, dict) or "kinds" not in data:
            raise ShardError(f"{self.path}: not an itmkit shards.json")
        return data

    def entries(self, kind: str | None = None) -> list[Entry]:
        kinds = self.load()["kinds"]
        names = [kind] if kind else list(kinds)
        return [Entry(**e) for k in names for e in kinds.get(k, [])]

    def entry(self, kind: str, path) -> Entry | None:
        rel = self._rel(path)
        return next((e for e in self.entries(kind) if e.path == rel), None)

    def files(self, kind: str, config_hash: str | None = None) -> list[Path]:
        """Absolute paths of the registered files of one kind, sorted by name. With
        ``config_hash`` given, refuses to return a mix of files written under other configs."""
        entries = sorted(self.entries(kind), key=lambda e: e.path)
        if config_hash is not None:
            other = [e.path for e in entries if e.config_hash != config_hash]
            if other:
                raise ShardError(f"{self.path}: {kind} files {other} were written with another "
                                 f"config than {config_hash}; rerun that step")
        return [self.dir / e.path for e in entries]

    def is_valid(self, kind: str, path, config_hash: str, inputs_hash: str = "") -> bool:
        """The cache-reuse rule: an output is reused when it is registered with the same
        config and inputs and the file on disk still has the registered size."""
        e = self.entry(kind, path)
        p = self.dir / self._rel(path)
        return (e is not None and p.exists() and p.stat().st_size == e.size
                and e.config_hash == config_hash and e.inputs_hash == inputs_hash)

    def stale(self, kind: str, config_hash: str) -> list[Entry]:
        return [e for e in self.entries(kind) if e.config_hash != config_hash]

    # -- writing
    def register(self, kind: str, path, *, rows: int, config_hash: str, inputs_hash: str = "",
                 extra: dict | None = None) -> Entry:
        if kind not in KINDS:
            raise ValueError(f"unknown shard kind '{kind}'; known: {', '.join(KINDS)}")
        p = self.dir / self._rel(path)
        entry = Entry(kind=kind, path=self._rel(path), sha256=sha256_file(p), size=p.stat().st_size,
                      rows=int(rows), config_hash=config_hash, inputs_hash=inputs_hash,
                      extra=extra or {})
        with self._locked() as data:
            lst = [e for e in data["kinds"].get(kind, []) if e["path"] != entry.path]
            data["kinds"][kind] = sorted(lst + [entry.__dict__], key=lambda e: e["path"])
        return entry

    def unregister(self, kind: str, paths: Iterable | None = None) -> None:
        """Forget entries (all of ``kind`` when ``paths`` is None); files are left alone."""
        rels = None if paths is None else {self._rel(p) for p in paths}
        with self._locked() as data:
            lst = data["kinds"].get(kind, [])
            data["kinds"][kind] = [e for e in lst if rels is not None and e["path"] not in rels]

    def verify(self) -> list[str]:
        """Re-hash every registered file; return one message per problem (empty when all good)."""
        problems = []
        for e in self.entries():
            p = self.dir / e.path
            if not p.exists():
                problems.append(f"{p}: missing (registered as {e.kind})")
            elif p.stat().st_size != e.size:
                problems.append(f"{p}: size {p.stat().st_size} != registered {e.size} (truncated or altered)")
            elif sha256_file(p) != e.sha256:
                problems.append(f"{p}: sha256 differs from shards.json (altered)")
        return problems

    # -- helpers
    def _rel(self, path) -> str:
        """Path relative to the dataset folder. A relative ``path`` is taken from the dataset
        folder, unless it names a file from the working directory (``data/demo/x.h5``)."""
        p = Path(path)
        if not p.is_absolute():
            if not (self.dir / p).exists() and p.exists():
                p = p.absolute()
            else:
                return p.as_posix()
        try:
            return p.resolve().relative_to(self.dir.resolve()).as_posix()
        except ValueError:
            raise ValueError(f"{path} is not inside dataset folder {self.dir}") from None

    @contextlib.contextmanager
    def _locked(self):
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / (INDEX_NAME + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                data = self.load()
                yield data
                data["itmkit_version"] = __version__
                write_json(self.path, data)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------
# dataset layout (every path under the data root is made here)

@dataclass(frozen=True)
class Layout:
    root: Path
    name: str

    @property
    def dir(self) -> Path:
        return Path(self.root) / self.name

    @property
    def index(self) -> ShardIndex:
        return ShardIndex(self.dir, self.name)

    @property
    def images(self) -> Path:
        return self.dir / "images.parquet"

    @property
    def captions(self) -> Path:
        return self.dir / "text" / "captions.parquet"

    @property
    def boxes(self) -> Path:
        return self.dir / "boxes.parquet"

    @property
    def hard_negatives(self) -> Path:
        return self.dir / "hard_negatives.parquet"

    @property
    def vocab(self) -> Path:
        return self.dir / "text" / "vocab.json"

    @property
    def vocab_vectors(self) -> Path:
        return self.dir / "text" / "vocab.vectors.npy"

    def graphs(self, chunk: int) -> Path:
        return self.dir / "text" / "graphs" / f"graphs-{chunk:04d}.parquet"

    def regions(self, split: str, chunk: int) -> Path:
        return self.dir / "regions" / f"regions-{split}-{chunk:04d}.h5"

    def grid(self, split: str, chunk: int) -> Path:
        return self.dir / "grid" / f"grid-{split}-{chunk:04d}.h5"


# ---------------------------------------------------------------------------------------------
# inspect

def describe(path) -> str:
    """Human-readable schema, counts and attributes of any itmkit file."""
    path = Path(path)
    lines = [f"{path}  ({path.stat().st_size if path.exists() else 0:,} bytes)"]
    if path.suffix in (".h5", ".hdf5"):
        f = _open_h5(path)
        with f:
            for name, ds in f.items():
                chunks = f" chunks={ds.chunks}" if ds.chunks else ""
                comp = f" {ds.compression}" if ds.compression else ""
                lines.append(f"  {name:12s} {str(ds.dtype):8s} {ds.shape}{chunks}{comp}")
            if "offsets" in f:
                counts = np.diff(f["offsets"][:])
                if len(counts):
                    lines.append(f"  boxes/image  min {counts.min()} mean {counts.mean():.1f} max {counts.max()}")
            for k, v in _get_attrs(f).items():
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
    elif path.suffix == ".json":
        data = read_json(path)
        if "words" in data:
            lines.append(f"  vocabulary: {len(data['words']):,} words (min_count {data['min_count']}), "
                         f"{len(data['predicates']):,} predicates, {len(data['attributes']):,} attributes")
        elif "kinds" in data:
            for kind, lst in data["kinds"].items():
                rows = sum(e["rows"] for e in lst)
                lines.append(f"  {kind:9s} {len(lst)} file(s), {rows:,} rows, "
                             f"configs {sorted({e['config_hash'] for e in lst})}")
        else:
            lines.append("  " + json.dumps(data)[:2000])
    else:
        raise ShardError(f"{path}: unknown file type (expected .h5, .parquet or .json)")
    return "\n".join(lines)
