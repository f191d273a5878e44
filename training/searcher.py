"""Searching a trained run: ``Retriever`` loads a run's split once and answers any number of
queries (a text, a caption or an image of the split, an image file), from any thread.

    r = Retriever("runs/vsepp", cfg=SearchConfig(split="test"))
    r.search_text("a red car next to a brown dog", k=10)     # the top-k images, and the parse
    r.search_image(1234, k=10)                               # the top-k captions, its own marked
    r.search_image(open("photo.jpg", "rb"), k=10, weights="random", name="photo.jpg")

Two-tower runs search a FAISS index over the split's embeddings (``training/index.py``),
exported once by ``training/export.py`` to ``<run>/index-<split>/`` and reused while current.
Cross-attention runs score the gallery block by block (``score_rows``, which also scores a given
subset of rows: with a shortlist, a two-tower run's top K are re-scored and ordered as
``itmkit evaluate --shortlist`` orders a query's candidates, ``training/shortlist.py``).
Queries are prepared by ``training/queries.py``. ``itmkit retrieve`` and ``itmkit serve`` are
commands over ``Retriever``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow.compute as pc
import torch
from torch.utils.data import Subset
from tqdm import tqdm

from pipeline import shards
from pipeline.shards import Layout
from training import models
from training.config import RunConfig
from training.data import CaptionDataset, ImageDataset, ShardData, collate_images, collate_text, make_loader
from training.export import export_run, read_index
from training.index import IndexConfig, index_dir, open_index
from training.queries import (Query, RetrieveError, caption_query, file_query, image_query, query_batch,
                              query_parser, text_query)
from training.run import LoadedRun, load_run
from training.shortlist import order_candidates, top_k as best_columns

GRAPH_MODELS = ("kidrr", "resg")   # models that read a caption's scene graph, not only its words


@dataclass(frozen=True)
class Side:
    dataset: type
    collate: Callable
    encode_gallery: str                  # the model's encoder of gallery items
    encode_query: str                    # ... and of queries
    scores: Callable                     # (model, gallery enc, query enc) -> [Q, n]
    ids: Callable[[ShardData], np.ndarray]
    export: str                          # the export's array of these embeddings (read_index)
    export_ids: str
    block: int                           # items per block, in units of the image batch size


SIDES = {
    "images": Side(ImageDataset, collate_images, "encode_image", "encode_text",
                   lambda m, g, q: m.similarity(g, q).t(), lambda d: d.image_ids, "images", "image_ids", 1),
    "captions": Side(CaptionDataset, collate_text, "encode_text", "encode_image",
                     lambda m, g, q: m.similarity(q, g), lambda d: d.text.caption_ids, "captions",
                     "caption_ids", 5),
}


@torch.no_grad()
def score_rows(model, query, side: str, data: ShardData, rows=None, *, batch_size: int = 128,
               workers: int = 0, device="cpu", progress: bool = True) -> np.ndarray:
    """[Q, n] scores of a batch of Q queries (a ``TextBatch`` against ``side="images"``, an
    ``ImageBatch`` against ``"captions"``) on the gallery rows ``rows`` of ``data`` (all when
    None), in that order. Gallery items are read, encoded and scored one block at a time (as
    ``compute_sims`` does), so memory is bounded by the block size whatever the gallery size."""
    s = SIDES[side]
    dataset = s.dataset(data) if rows is None else Subset(s.dataset(data), [int(r) for r in rows])
    loader = make_loader(dataset, s.collate, batch_size * s.block, workers=workers)
    q = getattr(model, s.encode_query)(query.to(device))
    out = [s.scores(model, getattr(model, s.encode_gallery)(batch.to(device)), q).float().cpu()
           for batch in tqdm(loader, desc=f"score {side}", unit="block", leave=False,
                             disable=not progress or len(loader) < 2)]
    return torch.cat(out, 1).numpy() if out else np.zeros((len(query), 0), np.float32)


@dataclass
class Ranking:
    rows: np.ndarray         # gallery rows, best first
    scores: np.ndarray
    rescored: int = -1       # shortlist: how many of the top rows the second run re-scored


def top_k(scores: np.ndarray, k: int) -> Ranking:
    """Best first; ties keep gallery order."""
    order = best_columns(scores[None], k)[0]
    return Ranking(order, scores[order])


class BlockSearch:
    """A run scores every gallery row (or given rows) against the query: cross-attention runs."""

    def __init__(self, run: LoadedRun, side: str, *, batch_size: int = 128, workers: int = 0,
                 progress: bool = True):
        self.run, self.side = run, side
        self.kw = dict(batch_size=batch_size, workers=workers, progress=progress,
                       device=next(run.model.parameters()).device)
        self.method = {"method": "blocks", "block": batch_size * SIDES[side].block}

    def scores(self, query: Query, rows=None) -> np.ndarray:
        return score_rows(self.run.model, query_batch(self.run, query), self.side, self.run.data,
                          rows, **self.kw)[0]

    def search(self, query: Query, k: int) -> Ranking:
        return top_k(self.scores(query), k)



class IndexSearch:
    """A two-tower run: the split's exported embeddings of ``side`` in a FAISS index."""

    def __init__(self, run: LoadedRun, side: str, cfg: IndexConfig, out_dir=None, *,
                 batch_size: int = 128, workers: int = 0, progress: bool = True):
        s = SIDES[side]
        self.run, self.side, self.cfg = run, side, cfg
        out_dir = Path(out_dir) if out_dir else index_dir(run)
        _, self.export_note = export_run(run, out_dir, batch_size=batch_size, workers=workers,
                                         progress=progress)
        export = read_index(out_dir)
        if not np.array_equal(export[s.export_ids], s.ids(run.data)):
            raise RetrieveError(f"{out_dir}: the exported {side} are not the split's "
                                f"({len(export[s.export_ids])} vs {len(s.ids(run.data))}); "
                                "remove the folder to export again")
        meta = export["meta"]
        source = {k: meta[k] for k in ("created", "checkpoint_sha256", "split", "max_images")}
        cache = out_dir / f"faiss-{side}-{cfg.kind}.index"
        self.index, how = open_index(export[s.export], cfg, cache, source)
        self.method = {"method": f"faiss-{cfg.kind}", "index": how, "export": str(out_dir),
                       **{f: getattr(cfg, f) for f in ("nlist", "nprobe") if cfg.kind == "ivf"},
                       **{f: getattr(cfg, f) for f in ("hnsw_m", "ef_construction", "ef_search")
                          if cfg.kind == "hnsw"}}
        if cfg.kind == "ivf":
            self.method["nlist"] = int(self.index.nlist)

    @torch.no_grad()
    def embed(self, query: Query) -> np.ndarray:
        model, device = self.run.model, next(self.run.model.parameters()).device
        enc = getattr(model, SIDES[self.side].encode_query)(query_batch(self.run, query).to(device))
        return enc.float().cpu().numpy()

    def search(self, query: Query, k: int) -> Ranking:
        x, n = self.embed(query), self.index.ntotal
        k = min(k, n)
        # ask for more until the k-th score is not repeated past the end of what came back, so
        # that equal scores at the cut are decided by gallery order, not by FAISS's heap
        want = min(k + 1, n)
        while True:
            scores, rows = self.index.search(x, want)
            scores, rows = scores[0][rows[0] >= 0], rows[0][rows[0] >= 0]   # IVF/HNSW may find fewer
            if want == n or len(scores) < want or k == 0 or scores[-1] < scores[k - 1]:
                break
            want = min(2 * want, n)
        order = np.lexsort((rows, -scores))[:k]                         # equal scores: gallery order
        return Ranking(rows[order], scores[order])


class ShortlistSearch:
    """A two-tower run shortlists the top ``topk``, the cross-attention run re-scores them and
    they are ordered as an evaluation's shortlist is (``training.shortlist.order_candidates``;
    ``fuse``: by the fused scores, which are shown); below them, the rest in the two-tower run's
    order and scores."""

    def __init__(self, rescore: BlockSearch, shortlist: IndexSearch, topk: int, fuse: float | None = None):
        a, b = rescore.run, shortlist.run
        s = SIDES[rescore.side]
        if a.config.dataset != b.config.dataset or not np.array_equal(s.ids(a.data), s.ids(b.data)):
            raise RetrieveError(f"--shortlist {b.dir}: its gallery ({b.config.dataset}, "
                                f"{len(s.ids(b.data))} {rescore.side}) is not the run's "
                                f"({a.config.dataset}, {len(s.ids(a.data))})")
        self.rescore, self.shortlist, self.topk, self.fuse = rescore, shortlist, topk, fuse
        self.method = {"method": "shortlist", "shortlist_run": str(b.dir), "topk": topk, "fuse": fuse,
                       "shortlist": shortlist.method, "rescore": rescore.method}

    def search(self, query: Query, k: int) -> Ranking:
        first = self.shortlist.search(query, max(k, self.topk))
        cand = first.rows[:self.topk]
        order, scores = order_candidates(self.rescore.scores(query, cand)[None],
                                         first.scores[None, :len(cand)], self.fuse)
        rows = np.concatenate([cand[order[0]], first.rows[self.topk:]])[:k]
        return Ranking(rows, np.concatenate([scores[0], first.scores[self.topk:]])[:k],
                       rescored=min(len(cand), k))


# ---------------------------------------------------------------------------------------------
# a run's split, loaded once

@dataclass
class SearchConfig:
    """How a run is searched: its split and weights, the FAISS index of two-tower runs, the
    shortlist of cross-attention runs (a two-tower run whose top ``topk`` they re-score)."""
    split: str = "test"
    max_images: int | None = None     # search only the first N images of the split and their captions
    checkpoint: str = "best"
    device: str = "cpu"
    index: IndexConfig = field(default_factory=IndexConfig)
    index_dir: str | None = None      # default: RUN/index-SPLIT
    shortlist: str | None = None
    topk: int = 100
    fuse: float | None = None
    batch_size: int = 128             # images per scoring or export block, captions: 5x
    workers: int = 0
    progress: bool = True


def check_shortlist(run_dir, shortlist) -> None:
    """A shortlist serves a cross-attention run and comes from a two-tower run."""
    if shortlist is None:
        return
    config = RunConfig.load(run_dir)
    if models.get(config.model).two_tower:
        raise RetrieveError(f"--shortlist: {run_dir} is a two-tower run ({config.model}), which "
                            "searches its own index; --shortlist serves cross-attention runs")
    other = RunConfig.load(shortlist)
    if not models.get(other.model).two_tower:
        raise RetrieveError(f"--shortlist {shortlist}: {other.model} is a cross-attention model; "
                            "the shortlist comes from a two-tower run (vsepp, cimn)")


class Retriever:
    """One run's split in memory, searched by queries from any thread (one at a time: the model,
    the parser and the indexes are shared). The searcher of a gallery and the query parser are
    made on first use; ``warm()`` makes them all at once."""

    def __init__(self, run_dir, root=None, cfg: SearchConfig | None = None):
        self.cfg = cfg = cfg or SearchConfig()
        check_shortlist(run_dir, cfg.shortlist)
        self.root = root
        self.run = load_run(run_dir, root, which=cfg.checkpoint, device=cfg.device, split=cfg.split,
                            max_images=cfg.max_images)
        self.layout = Layout(self.run.root, self.run.config.dataset)
        self._searchers: dict = {}
        self._shortlist_run: LoadedRun | None = None
        self._parser: tuple[Callable[[str], dict], list[str]] | None = None
        self._texts: dict | None = None
        self._paths: dict | None = None
        self._lock = threading.RLock()

    @property
    def data(self) -> ShardData:
        return self.run.data

    @property
    def model_name(self) -> str:
        return self.run.config.model

    @property
    def reads_graph(self) -> bool:
        return self.model_name in GRAPH_MODELS

    def gallery_size(self, side: str) -> int:
        return len(SIDES[side].ids(self.data))

    # -- the parts made once

    def searcher(self, side: str) -> "BlockSearch | IndexSearch | ShortlistSearch":
        with self._lock:
            if side not in self._searchers:
                self._searchers[side] = self._make_searcher(side)
            return self._searchers[side]

    def _make_searcher(self, side: str):
        cfg, run = self.cfg, self.run
        kw = dict(batch_size=cfg.batch_size, workers=cfg.workers, progress=cfg.progress)
        if run.model.two_tower:
            return IndexSearch(run, side, cfg.index, cfg.index_dir, **kw)
        blocks = BlockSearch(run, side, **kw)
        if cfg.shortlist is None:
            return blocks
        if self._shortlist_run is None:
            self._shortlist_run = load_run(cfg.shortlist, self.root, which="best", device=cfg.device,
                                           split=cfg.split, max_images=cfg.max_images)
        return ShortlistSearch(blocks, IndexSearch(self._shortlist_run, side, cfg.index, None, **kw),
                               cfg.topk, cfg.fuse)

    def parser(self) -> tuple[Callable[[str], dict], list[str]]:
        """text -> graph row (only its tokens for a model that reads no graph), and notes on how
        the parser differs from the graph shards' one."""
        with self._lock:
            if self._parser is None:
                self._parser = query_parser(self.layout, graph=self.reads_graph)
            return self._parser

    def warm(self) -> "Retriever":
        """Everything a query needs made now: both galleries' searchers, the parser, the tables."""
        for side in SIDES:
            self.searcher(side)
        self.parser()
        self.texts, self.paths   # noqa: B018
        return self

    def _split_column(self, path, kind: str, key: str, value: str) -> dict:
        """``key`` -> ``value`` of the rows of the split in a table."""
        t = shards.read_table(path, kind, [key, "split", value])
        t = t.filter(pc.equal(t["split"], self.data.cfg.split))
        return dict(zip(t[key].to_pylist(), t[value].to_pylist()))

    @property
    def texts(self) -> dict:
        """caption id -> text, of the split."""
        with self._lock:
            if self._texts is None:
                self._texts = self._split_column(self.layout.captions, "captions", "caption_id", "text")
            return self._texts

    @property
    def paths(self) -> dict:
        """image id -> image file as the images table holds it, of the split."""
        with self._lock:
            if self._paths is None:
                self._paths = self._split_column(self.layout.images, "images", "image_id", "path")
            return self._paths

    def image_file(self, image_id: int) -> Path | None:
        """The image's file; a relative path is taken from the working directory, else from the
        dataset folder (as the report finds it)."""
        path = self.paths.get(int(image_id))
        if path is None:
            return None
        return next((p for p in (Path(path), self.layout.dir / path) if p.is_file()), None)

    # -- queries

    def text_query(self, text: str) -> Query:
        parse, notes = self.parser()
        with self._lock:
            query = text_query(self.run, text, parse)
        query.notes[:0] = notes
        return query

    def caption_query(self, caption_id: int) -> Query:
        with self._lock:
            return caption_query(self.run, caption_id)

    def image_query(self, image, weights: str | None = None, seed: int | None = None,
                    name: str | None = None) -> Query:
        """``image``: an image id of the split, or an image file (a path or a file object) that is
        extracted with ``weights`` as the split's images were."""
        with self._lock:
            if isinstance(image, (int, np.integer)):
                return image_query(self.run, int(image))
            if weights is None:
                raise RetrieveError("an image file needs the extractor weights the dataset was "
                                    "extracted with (a file, or 'random')")
            return file_query(self.run, image, weights, seed, self.cfg.device, name)

    def search(self, query: Query, k: int) -> "Ranking":
        search = self.searcher(query.gallery)
        with self._lock:
            return search.search(query, k)

    def answer(self, query: Query, ranking: "Ranking", k: int) -> dict:
        """What ``itmkit retrieve --json`` prints (without its timings)."""
        run, side = self.run, query.gallery
        method = self.searcher(side).method
        rebuilt = [m["index"] for m in (method, method.get("shortlist") or {})
                   if str(m.get("index", "")).startswith("rebuilt")]   # a damaged FAISS cache, said once
        return {"run": str(run.dir), "model": run.config.model, "checkpoint": run.which,
                "dataset": run.config.dataset, "split": self.data.cfg.split, "query": query.describe(),
                "gallery": side, "gallery_size": self.gallery_size(side), "k": k,
                "truth": sorted(query.truth), "search": method,
                "results": self.result_rows(side, ranking, query.truth),
                "notes": query.notes + rebuilt}

    def result_rows(self, side: str, ranking: "Ranking", truth: set) -> list[dict]:
        data = self.data
        rows = [int(r) for r in ranking.rows]
        if side == "images":
            ids = [int(data.image_ids[r]) for r in rows]
            out = [{"image_id": i, "path": self.paths.get(i)} for i in ids]
        else:
            ids = [int(data.text.caption_ids[r]) for r in rows]
            out = [{"caption_id": c, "image_id": int(data.text.image_ids[r]), "text": self.texts.get(c)}
                   for c, r in zip(ids, rows)]
        key = "image_id" if side == "images" else "caption_id"
        for rank, (row, score) in enumerate(zip(out, ranking.scores), 1):
            row.update(rank=rank, score=float(score), ground_truth=row[key] in truth)
            if ranking.rescored >= 0:
                row["rescored"] = rank <= ranking.rescored
        return out

    def parse(self, query: Query) -> dict | None:
        """A text query's parse as the run reads it: its tokens (up to the run's caption length),
        the words it does not know, and the scene graph (used by graph models only)."""
        if query.graph is None:
            return None
        g = query.graph
        return {"tokens": list(g["tokens"]), "max_tokens": self.run.config.max_len - 2,
                "unknown": list(query.unknown), "reads_graph": self.reads_graph,
                **{k: [dict(x) for x in g.get(k) or []] for k in ("objects", "attributes", "relations")}}

    def search_text(self, text: str, k: int) -> dict:
        query = self.text_query(text)
        return {**self.answer(query, self.search(query, k), k), "parse": self.parse(query)}

    def search_caption(self, caption_id: int, k: int) -> dict:
        query = self.caption_query(caption_id)
        return {**self.answer(query, self.search(query, k), k), "parse": self.parse(query)}

    def search_image(self, image, k: int, weights: str | None = None, seed: int | None = None,
                     name: str | None = None) -> dict:
        query = self.image_query(image, weights, seed, name)
        return self.answer(query, self.search(query, k), k)
