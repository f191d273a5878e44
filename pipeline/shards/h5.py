"""HDF5 plumbing shared by region and grid shards: attributes, opening with a clear error (and
only a file that holds all its data itself), a handle opened lazily in each process, and the
chunk decoder that reads one image's rows straight from a memory map of the file."""

from __future__ import annotations

import contextlib
import gc
import json
import mmap
import os
import traceback
import zlib
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from pipeline.shards.atomic import ShardError


def set_attrs(obj, attrs: dict) -> None:
    for k, v in attrs.items():
        obj.attrs[k] = v if isinstance(v, (int, float, str, np.ndarray)) else json.dumps(v)


def get_attrs(obj) -> dict:
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


def discard(f: h5py.File | None, tmp: Path, error: BaseException | None) -> None:
    """Close and delete a half-written HDF5 file after ``error`` (e.g. a full disk).

    HDF5 then still holds data it could not write, tries again on every close and, when an
    h5py object outlives its file after a failed write, crashes the interpreter at exit. So
    the file's descriptor is pointed at /dev/null first (every later write succeeds and goes
    nowhere), the h5py objects that the error's frames hold are released, and the file is
    closed and deleted."""
    if f is not None:
        with contextlib.suppress(Exception):
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, f.id.get_vfd_handle())
            os.close(null)
    for _ in range(8):  # the error, its cause or context, ...
        if error is None:
            break
        traceback.clear_frames(error.__traceback__)
        error = error.__cause__ or error.__context__
    gc.collect()
    if f is not None:
        with contextlib.suppress(Exception):
            f.close()
    Path(tmp).unlink(missing_ok=True)


def open_h5(path: Path) -> h5py.File:
    """Open a shard for reading, once it is known to hold all its bytes itself (see
    ``self_contained``): every reader of HDF5 shards opens them here."""
    if not path.exists():
        raise ShardError(f"{path}: file not found")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ShardError(f"{path}: cannot open as HDF5 (truncated or half-written?): {e}") from e
    try:
        self_contained(f, path)
    except BaseException:
        f.close()
        raise
    return f


LINK_TYPES = {h5py.h5l.TYPE_SOFT: "a soft link", h5py.h5l.TYPE_EXTERNAL: "an external link"}


def self_contained(f: h5py.File, path: Path) -> None:
    """Refuse a file whose objects lead outside it: links other than hard links (an external
    link opens another file; itmkit writes no soft links), and datasets stored in external raw
    files or mapped from other files (virtual). shards.json hashes the shard's own bytes, so
    these would let a verified shard read bytes nobody hashed. Only link and layout metadata
    are looked at: no dataset is read and no other file is opened."""
    groups, seen = [("", f.id)], {f.id}   # low-level ids: a third of the cost of h5py's objects
    while groups:
        prefix, gid = groups.pop()
        for name in gid:
            where = prefix + name.decode(errors="replace")
            try:
                kind = gid.links.get_info(name).type
            except (KeyError, RuntimeError, ValueError) as e:
                raise ShardError(f"{path}: cannot read the link '{where}' (corrupt?): {e}") from e
            if kind != h5py.h5l.TYPE_HARD:
                raise ShardError(f"{path}: '{where}' is {LINK_TYPES.get(kind, 'a user-defined link')}, "
                                 "not an object stored in the shard itself; refused")
            obj = h5py.h5o.open(gid, name)
            if isinstance(obj, h5py.h5g.GroupID):
                if obj not in seen:  # hard links can make a group its own descendant
                    seen.add(obj)
                    groups.append((where + "/", obj))
            elif isinstance(obj, h5py.h5d.DatasetID):
                dcpl = obj.get_create_plist()
                if dcpl.get_layout() == h5py.h5d.VIRTUAL:
                    raise ShardError(f"{path}: dataset '{where}' is virtual (its data lies in other "
                                     "files); refused")
                if dcpl.get_external_count():
                    raise ShardError(f"{path}: dataset '{where}' stores its data in external "
                                     f"file {dcpl.get_external(0)[0].decode(errors='replace')!r}; refused")


class LazyH5:
    """Opens its HDF5 file on first use in each process, so it can be handed to DataLoader
    workers (an h5py handle must not cross a fork)."""

    def __init__(self, path):
        self.path = Path(path)
        self._f, self._pid, self._dsets, self._layouts, self._mmap = None, None, {}, {}, None

    @property
    def file(self) -> h5py.File:
        if self._f is None or self._pid != os.getpid():
            self._f, self._pid = open_h5(self.path), os.getpid()
            self._dsets, self._layouts, self._mmap = {}, {}, None
        return self._f

    @property
    def attrs(self) -> dict:
        return get_attrs(self.file)

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

    def _chunk_layout(self, name: str) -> "ChunkLayout | None":
        ds = self.dataset(name)
        if name not in self._layouts:
            self._layouts[name] = ChunkLayout.of(ds, self.path)
            if self._layouts[name] is not None and self._mmap is None:
                with open(self.path, "rb") as f:
                    self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._layouts[name]


@dataclass
class ChunkLayout:
    """Where each chunk of a dataset lies in the file (first row -> byte offset, size)."""

    rows: int
    shape: tuple
    dtype: np.dtype
    compression: str | None
    shuffle: bool
    table: dict

    @classmethod
    def of(cls, ds: h5py.Dataset, path: Path) -> "ChunkLayout | None":
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
