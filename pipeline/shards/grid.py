"""Grid shards (``Layout.grid(split, k)``): an H x W grid of backbone features per image,
one HDF5 chunk per image."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from pipeline.shards.atomic import atomic_path, provenance
from pipeline.shards.h5 import LazyH5, discard, set_attrs


def write_grid(path, image_ids: np.ndarray, features: np.ndarray, grid_hw: tuple[int, int],
               attrs: dict | None = None, compression: str | None = None) -> Path:
    """``features`` is [N, H*W, C]; stored float16, one chunk per image."""
    features = np.asarray(features, dtype=np.float16)
    gh, gw = grid_hw
    if features.ndim != 3 or features.shape[1] != gh * gw or len(features) != len(image_ids):
        raise ValueError(f"grid features of shape {features.shape} do not match "
                         f"{len(image_ids)} images on a {gh}x{gw} grid")
    with atomic_path(path) as tmp:
        f = h5py.File(tmp, "w")
        try:
            ids = f.create_dataset("image_ids", data=np.asarray(image_ids, dtype=np.int64))
            chunks = (1,) + features.shape[1:] if len(features) else None
            feats = f.create_dataset("features", data=features, chunks=chunks, compression=compression,
                                     shuffle=compression is not None)
            set_attrs(f, provenance(attrs))
            f.attrs["grid_h"], f.attrs["grid_w"] = gh, gw
            f.attrs["num_images"] = len(image_ids)
            f.flush()  # a failed write surfaces here, while the datasets are still held
            del ids, feats
            f.close()
        except BaseException as e:
            discard(f, tmp, e)
            raise
    return Path(path)


class GridShard(LazyH5):
    @property
    def image_ids(self) -> np.ndarray:
        return self.read("image_ids")

    @property
    def grid_hw(self) -> tuple[int, int]:
        a = self.file.attrs
        return int(a["grid_h"]), int(a["grid_w"])

    def __len__(self) -> int:
        return len(self.image_ids)

    def get(self, row: int) -> np.ndarray:
        return self.read_rows("features", row, row + 1)[0]
