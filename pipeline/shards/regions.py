"""Region shards (``Layout.regions(split, k)``): the boxes of every image of one chunk
with their pooled features, labels and scores, written as a stream and read back by row."""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import h5py
import numpy as np

from pipeline.shards.atomic import ShardError, atomic_path, no_space_is_one_line, provenance
from pipeline.shards.h5 import LazyH5, discard, set_attrs

FEATURE_DIM = 2048

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
        self._n_boxes, self._written = 0, 0
        self._ids, self._hw, self._offsets = [], [], [0]
        fields = dict(REGION_FIELDS, features=(np.float16, (feature_dim,)))
        self._dsets = {}
        try:
            with no_space_is_one_line(self.path):
                self._f = h5py.File(self._tmp, "w")
                for name, (dtype, tail) in fields.items():
                    self._dsets[name] = self._f.create_dataset(
                        name, shape=(0,) + tail, maxshape=(None,) + tail, dtype=dtype,
                        chunks=(boxes_per_chunk,) + tail, compression=compression,
                        shuffle=compression is not None)
                set_attrs(self._f, provenance(attrs))
        except BaseException:
            self.abort()
            raise
        self._pending = {name: [] for name in self._dsets}

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
        with no_space_is_one_line(self.path):
            for name, ds in self._dsets.items():
                ds.resize(stop, axis=0)
                if stop > start:
                    ds[start:stop] = np.concatenate(self._pending[name])
                self._pending[name] = []
        self._written = stop

    def close(self) -> Path:
        try:
            self._flush()
            f = self._f
            with no_space_is_one_line(self.path):
                f.create_dataset("image_ids", data=np.asarray(self._ids, dtype=np.int64).reshape(-1))
                f.create_dataset("image_hw", data=np.asarray(self._hw, dtype=np.int32).reshape(-1, 2))
                f.create_dataset("offsets", data=np.asarray(self._offsets, dtype=np.int64))
                f.attrs["num_images"] = len(self._ids)
                f.attrs["num_boxes"] = self._n_boxes
                f.flush()  # a failed write surfaces here, while the datasets are still held
                self._dsets = {}
                f.close()
        except BaseException:
            self.abort()
            raise
        self._ctx.__exit__(None, None, None)
        return self.path

    def abort(self) -> None:
        """Drop the temporary file. Called while an error propagates (a full disk, a killed
        run), this also releases the HDF5 objects that error holds (see ``discard``)."""
        discard(getattr(self, "_f", None), self._tmp, sys.exc_info()[1])
        self._dsets, self._pending = {}, {}
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


class RegionShard(LazyH5):
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
