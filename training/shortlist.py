"""Shortlist and re-rank: a fast two-tower run ranks every candidate of every query, a slower run
re-scores only each query's best K; the candidates past K keep the fast run's order below them.

A whole split, both directions (evaluate.py --shortlist, train.py's val_shortlist):

    shortlist = Shortlist.from_sims(fast_sims, k)     # the two-tower run's [n_images, n_captions]
    done = rerank_split(model, image_loader, text_loader, shortlist)   # the slow run, those pairs only
    recall_metrics(done.i2t, t2i_sims=done.t2i)       # one ranking matrix per direction

One query against a gallery (``training/retrieve.py``'s ShortlistSearch): the shortlisting run's
top K of the query, re-scored and ordered by ``order_candidates``, as a split's queries are.

A query whose ground truth is not among its K candidates is ranked as the shortlisting run ranked
it, so the shortlist's recall@K bounds what re-ranking can reach. ``fuse=ALPHA`` ranks the K by
ALPHA * z(slow) + (1 - ALPHA) * z(fast), each run's scores standardised over the query's K
candidates (mean 0, standard deviation 1), so one query ranks the same in evaluation and retrieval.

Only the needed pairs are scored: grouped by the side with fewer distinct items (an image and its
candidate captions, or a caption and its images), each group one ``similarity`` call on the
group's encodings. Items of different batches are gathered into one encoding padded with zeros
(False for masks) on every dimension but the first, as the collate functions pad a batch; the
models are tested to score the same whatever the padding.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from training.data import eval_loaders
from training.evaluation import (batch_offsets, broadcast_from_first, compute_sims, encode, gather_to_first,
                                 map_tensors, to_device)
from training.run import load_run

ROW_CHUNK_ELEMENTS = 1 << 24   # scores sorted at once by top_k


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """[Q, min(k, n)] column indices of each row's best ``k`` scores, best first; equal scores in
    column order (deterministic, so every process of a distributed run picks the same)."""
    scores = np.asarray(scores)
    k = min(k, scores.shape[1])
    out = np.empty((scores.shape[0], k), np.int64)
    step = max(1, ROW_CHUNK_ELEMENTS // max(1, scores.shape[1]))
    for s in range(0, scores.shape[0], step):
        out[s:s + step] = np.argsort(-scores[s:s + step], axis=1, kind="stable")[:, :k]
    return out


def standardise(x: np.ndarray) -> np.ndarray:
    """Each row to mean 0 and standard deviation 1 (a constant row to 0)."""
    x = np.asarray(x, np.float64)
    sd = x.std(1, keepdims=True)
    return np.divide(x - x.mean(1, keepdims=True), sd, out=np.zeros_like(x), where=sd > 0)


def fused(slow: np.ndarray, fast: np.ndarray, alpha: float | None) -> np.ndarray:
    """[Q, k] scores the K candidates are ranked by: the slow run's, or with ``alpha`` the mix
    alpha * z(slow) + (1 - alpha) * z(fast) of both runs' scores standardised per query."""
    if alpha is None:
        return slow
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"fuse weight {alpha} is not in [0, 1]")
    return alpha * standardise(slow) + (1.0 - alpha) * standardise(fast)


def order_candidates(slow: np.ndarray, fast: np.ndarray, alpha: float | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Each query's K candidates (rows of [Q, k] ``slow`` and ``fast`` scores, in the shortlist's
    order) re-ranked: the positions among the K, best first (equal scores keep the shortlist's
    order), and the scores they are ranked by (``fused``) in that order."""
    score = fused(slow, fast, alpha)
    order = np.argsort(-score, axis=1, kind="stable")
    return order, np.take_along_axis(score, order, 1)


def _dense_ranks(v: np.ndarray) -> np.ndarray:
    """Per row: 0 for the lowest value, +1 for each larger distinct value (equal values, equal rank)."""
    order = np.argsort(v, axis=1, kind="stable")
    sv = np.take_along_axis(v, order, 1)
    step = np.concatenate([np.zeros((len(v), 1), np.int64), (np.diff(sv, axis=1) > 0).astype(np.int64)], 1)
    out = np.empty_like(step)
    np.put_along_axis(out, order, step.cumsum(1), 1)
    return out


# ---------------------------------------------------------------------------------------------
# scoring only some pairs

def _cat_padded(parts: list):
    """Encodings of the same structure joined along the first dimension; the other dimensions
    padded with zeros (False) to the largest."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        if len(parts) == 1:
            return first
        tail = [max(p.shape[d] for p in parts) for d in range(1, first.dim())]
        out = first.new_zeros((sum(p.shape[0] for p in parts), *tail))
        at = 0
        for p in parts:
            out[(slice(at, at + p.shape[0]), *(slice(0, n) for n in p.shape[1:]))] = p
            at += p.shape[0]
        return out
    if isinstance(first, (tuple, list)):
        return type(first)(_cat_padded([p[i] for p in parts]) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: _cat_padded([p[k] for p in parts]) for k in first}
    if dataclasses.is_dataclass(first):   # a model's named encoding (training.models.layers.Encoding)
        return dataclasses.replace(first, **{f.name: _cat_padded([getattr(p, f.name) for p in parts])
                                             for f in dataclasses.fields(first)})
    return first


def take(encodings: list, offsets: np.ndarray, index) -> object:
    """Items ``index`` (positions in the whole split, any order) of per-batch ``encodings`` whose
    batches start at ``offsets``, as one encoding in the order of ``index``."""
    index = np.asarray(index, np.int64)
    order = np.argsort(index, kind="stable")
    sorted_index = index[order]
    batch = np.searchsorted(offsets, sorted_index, side="right") - 1
    parts = []
    for b in np.unique(batch):
        rows = torch.from_numpy(sorted_index[batch == b] - offsets[b])
        parts.append(map_tensors(lambda t: t[rows], encodings[b]))
    enc = _cat_padded(parts)
    if np.any(order != np.arange(len(order))):
        back = torch.from_numpy(np.argsort(order))
        enc = map_tensors(lambda t: t[back], enc)
    return enc


@torch.no_grad()
def score_pairs(model, image_enc: list, text_enc: list, pairs: np.ndarray, device="cpu",
                rank: int = 0, world: int = 1, progress: bool = False, chunk: int = 1024) -> np.ndarray | None:
    """Scores [P] float32 of ``pairs`` [P, 2] = (image position, caption position) with
    ``model.similarity``. ``image_enc`` / ``text_enc``: per-batch encodings of the split (CPU),
    as ``evaluation.encode`` gives them. Pairs are grouped by the side with fewer distinct items,
    one ``similarity`` call per group (at most ``chunk`` items a call). With ``world`` > 1, each
    process scores every ``world``-th group and process 0 gets all scores (None elsewhere)."""
    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    by_image = len(np.unique(pairs[:, 0])) <= len(np.unique(pairs[:, 1]))
    key, other = (0, 1) if by_image else (1, 0)
    encs = (image_enc, text_enc) if by_image else (text_enc, image_enc)
    offs = (batch_offsets(encs[0]), batch_offsets(encs[1]))
    order = np.argsort(pairs[:, key], kind="stable")
    keys = pairs[order, key]
    cuts = np.flatnonzero(np.diff(keys)) + 1
    groups = list(zip(np.concatenate([[0], cuts]), np.concatenate([cuts, [len(keys)]])))[rank::world]
    was_training = model.training
    model.eval()
    scored = []
    for s, e in tqdm(groups, desc="re-rank", leave=False, disable=not progress):
        q = to_device(take(encs[0], offs[0], [keys[s]]), device)
        for c in range(s, e, chunk):
            pos = order[c:min(c + chunk, e)]
            items = to_device(take(encs[1], offs[1], pairs[pos, other]), device)
            sims = model.similarity(q, items) if by_image else model.similarity(items, q)
            scored.append((pos, sims.float().reshape(-1).cpu().numpy()))
    model.train(was_training)
    scored = gather_to_first(scored, rank, world)
    if scored is None:
        return None
    out = np.full(len(pairs), np.nan, np.float32)
    for pos, v in scored:
        out[pos] = v
    return out


# ---------------------------------------------------------------------------------------------
# a whole split, both directions

@dataclass
class Shortlist:
    """The candidates of every query of a split, from the shortlisting run's scores ``sims``
    [n_images, n_captions]: ``i2t`` [n_images, k] each image's best captions, ``t2i``
    [n_captions, k] each caption's best images (best first), ``pairs`` [P, 2] the (image, caption)
    pairs of both, each once, sorted: what the re-ranking run scores."""

    sims: np.ndarray
    k: int
    i2t: np.ndarray
    t2i: np.ndarray
    pairs: np.ndarray

    @classmethod
    def from_sims(cls, sims: np.ndarray, k: int) -> "Shortlist":
        if k < 1:
            raise ValueError(f"a shortlist needs k >= 1, got {k}")
        sims = np.asarray(sims, np.float32)
        i2t, t2i = top_k(sims, k), top_k(sims.T, k)
        n, m = sims.shape
        keys = np.concatenate([(np.arange(n)[:, None] * m + i2t).ravel(),
                               (t2i * m + np.arange(m)[:, None]).ravel()])
        keys = np.unique(keys)
        return cls(sims, k, i2t, t2i, np.stack([keys // m, keys % m], 1))

    def recall(self, captions_per_image: int = 5) -> dict:
        """Percent of image queries with one of their own captions among their candidates, and of
        caption queries with their own image: what re-ranking can reach at most (R@K bound)."""
        per = captions_per_image
        n, m = self.sims.shape
        if m != per * n:
            return {}
        return {"i2t": 100.0 * float((self.i2t // per == np.arange(n)[:, None]).any(1).mean()),
                "t2i": 100.0 * float((self.t2i == (np.arange(m) // per)[:, None]).any(1).mean())}

    def lookup(self, pair_scores: np.ndarray, images: np.ndarray, captions: np.ndarray) -> np.ndarray:
        """The scores in ``pair_scores`` (aligned with ``pairs``) of (images, captions), any shape."""
        m = self.sims.shape[1]
        return np.asarray(pair_scores)[np.searchsorted(self.pairs[:, 0] * m + self.pairs[:, 1],
                                                       images * m + captions)]

    def candidate_scores(self, pair_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The re-ranking scores ``pair_scores`` (aligned with ``pairs``) per query, in candidate
        order: [n_images, k] of each image's captions, [n_captions, k] of each caption's images."""
        n, m = self.sims.shape
        return (self.lookup(pair_scores, np.broadcast_to(np.arange(n)[:, None], self.i2t.shape), self.i2t),
                self.lookup(pair_scores, self.t2i, np.broadcast_to(np.arange(m)[:, None], self.t2i.shape)))

    def rankings(self, pair_scores: np.ndarray, fuse: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(i2t, t2i) [n_images, n_captions] float32 for the protocols: row i of ``i2t`` ranks image
        i's captions, its K candidates above all others in the order of the re-ranking scores
        (``fuse``: of the fused ones; ties kept), the rest in the shortlisting run's order; column j
        of ``t2i`` does the same for caption j's images. Only the order within a row (i2t) or a
        column (t2i) means anything: the K get ``top`` + their rank among the K, ``top`` an
        integer above every shortlisting score."""
        n, m = self.sims.shape
        top = np.floor(float(self.sims.max())) + 1.0
        if not np.isfinite(top) or abs(top) + self.k >= 2 ** 24:   # float32 holds such integers exactly
            raise ValueError(f"shortlisting scores up to {self.sims.max()} cannot be ranked below "
                             "re-ranked ones in float32")
        i2t, t2i = self.sims.copy(), self.sims.copy()
        slow_i2t, slow_t2i = self.candidate_scores(pair_scores)
        rows, cols = np.arange(n)[:, None], np.arange(m)[:, None]
        i2t[rows, self.i2t] = top + _dense_ranks(fused(slow_i2t, self.sims[rows, self.i2t], fuse))
        t2i[self.t2i, cols] = top + _dense_ranks(fused(slow_t2i, self.sims[self.t2i, cols], fuse))
        return i2t, t2i


@dataclass
class Reranked:
    i2t: np.ndarray       # rows rank each image's captions (Shortlist.rankings)
    t2i: np.ndarray       # columns rank each caption's images
    scores: np.ndarray    # [P] the re-ranking run's scores of Shortlist.pairs (rankings(scores, fuse=...))
    seconds: float        # encoding the split and scoring the pairs

    @property
    def pairs(self) -> int:
        return len(self.scores)


def rerank_split(model, image_loader, text_loader, shortlist: Shortlist | None, device="cpu",
                 fuse: float | None = None, rank: int = 0, world: int = 1,
                 progress: bool = True) -> Reranked | None:
    """Re-score ``shortlist``'s pairs with ``model`` over a split read by the two loaders (the
    same images and captions, in the same order, as the shortlisting run's). With ``world`` > 1,
    ``shortlist`` is needed on process 0 only; every process encodes the split and scores its share
    of the pairs, and process 0 gets the result (None elsewhere)."""
    t = time.perf_counter()
    pairs = broadcast_from_first(shortlist.pairs if rank == 0 else None, rank, world)
    was_training = model.training
    model.eval()
    img = encode(model.encode_image, image_loader, device, "encode images" if progress else None)
    txt = encode(model.encode_text, text_loader, device, "encode captions" if progress else None)
    model.train(was_training)
    scores = score_pairs(model, img, txt, pairs, device, rank, world, progress)
    if scores is None:
        return None
    return Reranked(*shortlist.rankings(scores, fuse), scores, time.perf_counter() - t)


def split_shortlist(run_dir, data, k: int, device="cpu", batch_size: int = 128, workers: int = 0,
                    progress: bool = True) -> tuple[Shortlist, float]:
    """The shortlist of the split ``data`` (``training.data.ShardData`` of the re-ranking run) by the
    two-tower run in ``run_dir``, read from the same data root, split and images; and the seconds
    its scoring took. Refused: a cross-attention run (it would score every pair itself), a run of
    another dataset, or one whose split holds other images or captions."""
    what = f"shortlist run {run_dir}"
    fast = load_run(run_dir, data.layout.root, device=device, split=data.cfg.split,
                    max_images=data.cfg.max_images)
    if not fast.model.two_tower:
        raise ValueError(f"{what}: model '{fast.config.model}' is a cross-attention model; the shortlist "
                         "must come from a two-tower run (vsepp, cimn), which scores every pair with one "
                         "matrix product")
    if fast.config.dataset != data.layout.name:
        raise ValueError(f"{what}: a run of dataset '{fast.config.dataset}', not '{data.layout.name}'")
    for kind, a, b in (("images", data.image_ids, fast.data.image_ids),
                       ("captions", data.text.caption_ids, fast.data.text.caption_ids)):
        if not np.array_equal(np.asarray(a), np.asarray(b)):
            raise ValueError(f"{what}: its '{data.cfg.split}' split has other {kind} than the run it "
                             f"shortlists for ({len(b)} vs {len(a)}); both must be read from the same shards")
    t = time.perf_counter()
    images, texts = eval_loaders(fast.data, batch_size, workers)
    shortlist = Shortlist.from_sims(compute_sims(fast.model, images, texts, device, progress), k)
    return shortlist, time.perf_counter() - t
