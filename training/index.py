"""FAISS indexes over a two-tower run's exported embeddings: an exact inner-product index by
default, IVF or HNSW for large galleries (built once, cached next to the export with the settings
and the export's identity they were built from)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import faiss
import numpy as np

from pipeline import shards
from training.queries import RetrieveError
from training.run import LoadedRun


@dataclass
class IndexConfig:
    kind: str = "flat"            # flat (exact) | ivf | hnsw
    nlist: int = 0                # ivf: clusters; 0 = sqrt(N), at most N / 39
    nprobe: int = 8               # ivf: clusters searched per query
    hnsw_m: int = 32              # hnsw: links per node
    ef_construction: int = 80     # hnsw: candidates kept while building
    ef_search: int = 64           # hnsw: candidates kept while searching


@dataclass(frozen=True)
class IndexKind:
    build: Callable[[np.ndarray, IndexConfig], "faiss.Index"]
    tune: Callable[["faiss.Index", IndexConfig], None]     # search-time settings
    build_fields: tuple[str, ...]                          # IndexConfig fields the built index depends on
    cached: bool                                           # worth writing to disk


def ivf_lists(n: int, nlist: int = 0) -> int:
    if nlist > n:
        raise RetrieveError(f"--nlist {nlist} is more than the {n} vectors of the gallery")
    return nlist or max(1, min(round(n ** 0.5), n // 39))


def _flat(x: np.ndarray, cfg: IndexConfig):
    """Exact: every vector scored. The exported embeddings are float16, so they are kept as
    float16 (a scalar quantizer that loses nothing on them) and scored in float32: the scores of
    ``IndexFlatIP`` over the same vectors, with half the memory read per query (2x faster on
    100K vectors, docs/BENCHMARKS.md)."""
    index = faiss.IndexScalarQuantizer(x.shape[1], faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    index.add(x)
    return index


def _ivf(x: np.ndarray, cfg: IndexConfig):
    nlist = ivf_lists(len(x), cfg.nlist)
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(x.shape[1]), x.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
    if nlist == 1:    # a gallery under 39 vectors: one list, nothing to cluster (FAISS would warn)
        index.cp.min_points_per_centroid = 1
    index.train(x)
    index.add(x)
    return index


def _hnsw(x: np.ndarray, cfg: IndexConfig):
    index = faiss.IndexHNSWFlat(x.shape[1], cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = cfg.ef_construction
    index.add(x)
    return index


def _tune_ivf(index, cfg: IndexConfig) -> None:
    index.nprobe = min(cfg.nprobe, index.nlist)


def _tune_hnsw(index, cfg: IndexConfig) -> None:
    index.hnsw.efSearch = cfg.ef_search


INDEXES = {
    "flat": IndexKind(_flat, lambda index, cfg: None, (), cached=False),
    "ivf": IndexKind(_ivf, _tune_ivf, ("nlist",), cached=True),
    "hnsw": IndexKind(_hnsw, _tune_hnsw, ("hnsw_m", "ef_construction"), cached=True),
}


def build_index(vectors: np.ndarray, cfg: IndexConfig):
    """A FAISS index of ``cfg.kind`` over float32 ``vectors`` [N, D], tuned for searching."""
    kind = INDEXES[cfg.kind]
    index = kind.build(np.ascontiguousarray(vectors, np.float32), cfg)
    kind.tune(index, cfg)
    return index


def open_index(vectors: np.ndarray, cfg: IndexConfig, cache: Path | None, source: dict):
    """``build_index``, or the one cached at ``cache`` (+ ``.json``) when it was built with the
    same settings from the same ``source`` (the export's identity). Returns (index, how)."""
    kind = INDEXES[cfg.kind]
    key = {"kind": cfg.kind, **{f: getattr(cfg, f) for f in kind.build_fields}, "source": source}
    side_file = None if cache is None else cache.with_name(cache.name + ".json")
    unreadable = ""
    if kind.cached and cache is not None and cache.exists() and side_file.exists() \
            and shards.read_json(side_file) == key:
        try:
            index = faiss.read_index(str(cache))
        except RuntimeError:   # truncated or damaged; FAISS's own message names its C++ source
            unreadable = "could not be read: truncated or damaged"
        else:
            if index.ntotal == len(vectors):
                kind.tune(index, cfg)
                return index, f"cached {cache.name}"
            unreadable = f"holds {index.ntotal} vectors, not {len(vectors)}"
    index = build_index(vectors, cfg)
    if kind.cached and cache is not None:
        with shards.atomic_path(cache) as tmp:
            faiss.write_index(index, str(tmp))
        shards.write_json(side_file, key)
        if unreadable:
            return index, f"rebuilt and cached {cache.name} (the cached one {unreadable})"
        return index, f"built and cached {cache.name}"
    return index, "built"


def index_dir(run: LoadedRun) -> Path:
    cfg = run.data.cfg
    return run.dir / (f"index-{cfg.split}" + (f"-first{cfg.max_images}" if cfg.max_images else ""))
