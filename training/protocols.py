"""The COCO protocols of the newer literature, on the annotation files that the ``eccv-caption``
package (PyPI, MIT) ships:

- **ECCV Caption** (``eccv``): mAP@R, R-Precision and R@1 on machine- and human-verified positives
  (1,261 image queries, 1,332 caption queries, up to 48 positives each);
- **CxC** (``cxc``, Crisscrossed Captions): R@1/5/10 on COCO's positives plus human-rated extra ones
  (every image and 24,972 of the captions are queries).

Both are defined on COCO's own ids for the 5K test split of Karpathy's split: image ids and caption
*annotation* ids. Every query ranks the whole pool of the other modality (5,000 images or 25,000
captions); a positive outside that pool counts in R and is never retrieved, as in the package.

Only rankings are read: image->text uses the order of the scores within each row of the
similarity matrix, text->image the order within each column; scores of different rows (or
columns) are never compared. A matrix in which some entries only encode a shortlist's order is
therefore fine, and a shortlisted evaluation, which ranks each direction on its own
(``training/shortlist.py``), passes its text->image matrix as ``t2i_sims``. Ties count against
the model, as in ``training/evaluation.py``: a positive ranks below every non-positive with the
same score. ``training/evaluation.py`` registers both by name next to SCAN's protocols
(``evaluate.py --protocol eccv|cxc``).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PACKAGE = "eccv-caption"
ANNOTATION_PREFIX = {"eccv": "eccv", "cxc": "cxc", "coco": "original"}   # name -> file prefix
CHUNK_ELEMENTS = 1 << 24   # score comparisons held in memory at once (bytes, as booleans)


class ProtocolError(ValueError):
    """The annotations are missing, or the run's ids are not the ones they are defined on."""


@dataclass(frozen=True)
class Annotations:
    """Positives of one benchmark over its pool of COCO ids."""

    name: str
    image_ids: np.ndarray           # the pool a caption query ranks (COCO image ids)
    caption_ids: np.ndarray         # the pool an image query ranks (COCO caption annotation ids)
    i2t: dict[int, list[int]]       # query image id -> its positive caption ids
    t2i: dict[int, list[int]]       # query caption id -> its positive image ids
    source: str = ""                # where they come from, e.g. "eccv-caption 0.1.0"


def annotation_dir() -> Path:
    """The package's data folder, found without importing the package."""
    spec = importlib.util.find_spec("eccv_caption")
    if spec is None or spec.origin is None:
        raise ProtocolError(f"the eccv and cxc protocols read the annotation files of the {PACKAGE} "
                            f"package, which is not installed: pip install {PACKAGE}")
    return Path(spec.origin).parent / "data"


def _read_positives(path: Path) -> dict[int, list[int]]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ProtocolError(f"{path}: cannot read the {PACKAGE} annotation file ({e})") from e
    return {int(k): [int(v) for v in vs] for k, vs in raw.items() if vs}


def load_annotations(name: str, data_dir: Path | None = None) -> Annotations:
    """``eccv``, ``cxc`` (or ``coco``, COCO's own five captions per image) from the package's files."""
    if name not in ANNOTATION_PREFIX:
        raise ProtocolError(f"unknown annotations '{name}'; known: {', '.join(ANNOTATION_PREFIX)}")
    d = Path(data_dir) if data_dir is not None else annotation_dir()
    prefix = ANNOTATION_PREFIX[name]
    ids_file = d / "coco_test_ids.npy"
    try:
        caption_ids = np.load(ids_file).astype(np.int64)
    except (OSError, ValueError) as e:
        raise ProtocolError(f"{ids_file}: cannot read the {PACKAGE} caption ids ({e})") from e
    images = _read_positives(d / "original_image_to_caption.json")
    try:
        source = f"{PACKAGE} {importlib.metadata.version(PACKAGE)}"
    except importlib.metadata.PackageNotFoundError:
        source = str(d)
    return Annotations(name, np.array(sorted(images), np.int64), caption_ids,
                       _read_positives(d / f"{prefix}_image_to_caption.json"),
                       _read_positives(d / f"{prefix}_caption_to_image.json"), source)


def _examples(ids: np.ndarray) -> str:
    return f" (e.g. {', '.join(str(int(x)) for x in ids[:3])})" if len(ids) else ""


def _positions(ann: Annotations, kind: str, got, want: np.ndarray) -> dict[int, int]:
    """id -> row/column of the run's matrix; refuses ids that are not exactly the pool."""
    got = np.asarray(got, np.int64)
    uniq = np.unique(got)
    missing, extra = np.setdiff1d(want, uniq), np.setdiff1d(uniq, want)
    if len(uniq) != len(got) or len(missing) or len(extra):
        what = ("images with COCO's image ids" if kind == "image" else
                "captions with COCO's caption annotation ids (for COCO, dataset_coco.json's sentid)")
        raise ProtocolError(
            f"--protocol {ann.name} is defined on the {len(want):,} {what} of the COCO 5K test split "
            f"({ann.source}); the run has {len(got):,} {kind}s: {len(extra):,} not among them"
            f"{_examples(extra)}, {len(missing):,} of them missing"
            f"{_examples(missing)}"
            f"{f', {len(got) - len(uniq):,} repeated' if len(uniq) != len(got) else ''}; evaluate "
            f"--split test of a COCO dataset ingested from Karpathy's dataset_coco.json "
            f"(manifests/coco.yaml), without --max-images")
    return {int(x): i for i, x in enumerate(got)}


def positive_ranks(scores: np.ndarray, rows: np.ndarray, positives: list[np.ndarray],
                   first: int | None = None) -> np.ndarray:
    """1-based ranks of each query's positives, best first.

    ``scores`` [N, n]: row ``rows[q]`` holds query q's scores for the n pool items; only their order
    within the row is used (pass ``sims`` for image->text, ``sims.T`` for text->image).
    ``positives[q]``: pool positions of query q's positives. ``first``: rank only the best
    ``first`` positives of each query (R@K needs 1). Returns [Q, P] int64, ascending in each row,
    padded with n + 1 where a query has fewer positives. A positive ranks below every
    non-positive with the same score; positives tied with each other take consecutive ranks.
    """
    n = scores.shape[1]
    counts = np.array([len(p) for p in positives], np.int64)
    width = int(counts.max(initial=0)) if first is None else min(first, int(counts.max(initial=0)))
    out = np.full((len(positives), max(width, 1)), n + 1, np.int64)
    if width == 0:
        return out
    chunk = max(1, CHUNK_ELEMENTS // (width * n))
    order = np.argsort(counts, kind="stable")   # similar lengths together: less padding
    for s in range(0, len(order), chunk):
        idx = np.sort(order[s:s + chunk])      # ascending rows read the matrix in order
        w = int(counts[idx].max())
        if w == 0:
            continue
        k = min(w, width)
        pos = np.zeros((len(idx), w), np.int64)
        valid = np.zeros((len(idx), w), bool)
        for r, q in enumerate(idx):
            pos[r, :counts[q]], valid[r, :counts[q]] = positives[q], True
        block = scores[rows[idx]]                                     # [c, n]
        ps = np.take_along_axis(block, pos, 1)
        o = np.lexsort((-ps, ~valid), axis=1)                         # valid first, best first
        ps, valid = np.take_along_axis(ps, o, 1), np.take_along_axis(valid, o, 1)
        top = ps[:, :k, None]
        at_least = (block[:, None, :] >= top).sum(-1)                 # items scoring >= each positive
        pos_at_least = ((ps[:, None, :] >= top) & valid[:, None, :]).sum(-1)
        ranks = np.arange(1, k + 1) + at_least - pos_at_least        # after every negative at >= its score
        out[idx, :k] = np.where(valid[:, :k], ranks, n + 1)
    return out


def map_at_r(ranks: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Per query: (1/R) * sum over the positives ranked within R of (their number so far / rank)."""
    k = np.arange(1, ranks.shape[1] + 1)
    hit = ranks <= r[:, None]
    return np.where(hit, k / ranks, 0.0).sum(1) / r


def r_precision(ranks: np.ndarray, r: np.ndarray) -> np.ndarray:
    return (ranks <= r[:, None]).sum(1) / r


def _directions(ann: Annotations, sims: np.ndarray, image_ids, caption_ids, t2i_sims=None):
    """Per direction: its name, the matrix with one row per query item (``sims``, and
    ``t2i_sims.T`` or ``sims.T``), the queries' rows, the pool positions of their positives (those
    in the pool), their R (all positives) and the pool size. Refuses ids that are not exactly the
    annotations' pools."""
    img = _positions(ann, "image", image_ids, ann.image_ids)
    cap = _positions(ann, "caption", caption_ids, ann.caption_ids)
    t2i_sims = sims if t2i_sims is None else np.asarray(t2i_sims)
    if t2i_sims.shape != sims.shape:
        raise ValueError(f"text->image matrix is {t2i_sims.shape}, the image->text one {sims.shape}")
    for d, scores, query_pos, pool_pos, positives in (("i2t", sims, img, cap, ann.i2t),
                                                      ("t2i", t2i_sims.T, cap, img, ann.t2i)):
        rows = np.array([query_pos[q] for q in positives], np.int64)
        found = [np.array([pool_pos[p] for p in set(ps) if p in pool_pos], np.int64)
                 for ps in positives.values()]
        r = np.array([len(set(ps)) for ps in positives.values()], np.int64)
        yield d, scores, rows, found, r, len(pool_pos)


def eccv(sims: np.ndarray, image_ids, caption_ids, annotations: Annotations | None = None,
         t2i_sims: np.ndarray | None = None) -> dict:
    """ECCV Caption: mAP@R, R-Precision and R@1 (percent) both ways, and their random-score values.

    ``sims`` [n_images, n_captions]: row i scores image ``image_ids[i]``, column j caption
    ``caption_ids[j]``; any order, but exactly the annotations' pools (else ``ProtocolError``).
    ``t2i_sims``: the matrix whose columns rank the images for text->image (default ``sims``).
    R is a query's number of positives; mAP@R = (1/R) sum_{r<=R} P@r * [item r is positive].
    """
    ann = annotations if annotations is not None else load_annotations("eccv")
    out, chance, queries = {}, {}, {}
    for d, scores, rows, found, r, n in _directions(ann, sims, image_ids, caption_ids, t2i_sims):
        ranks = positive_ranks(scores, rows, found)
        p = np.array([len(f) for f in found])
        out[f"{d}_map_at_r"] = 100.0 * float(map_at_r(ranks, r).mean())
        out[f"{d}_rprecision"] = 100.0 * float(r_precision(ranks, r).mean())
        out[f"{d}_r1"] = 100.0 * float(np.mean(ranks[:, 0] <= 1))
        chance.update({f"{d}_map_at_r": 100.0 * float(chance_map_at_r(n, p, r).mean()),
                       f"{d}_rprecision": 100.0 * float(np.mean(p / n)),
                       f"{d}_r1": 100.0 * float(chance_recall(n, p, 1).mean())})
        queries[d] = len(rows)
    return {**out, "queries": queries, "chance": chance, "annotations": ann.source}


def cxc(sims: np.ndarray, image_ids, caption_ids, annotations: Annotations | None = None,
        ks=(1, 5, 10), t2i_sims: np.ndarray | None = None) -> dict:
    """CxC: R@1/5/10 (percent) both ways on CxC's positives, rSum, and their random-score values.
    Same arguments as ``eccv``."""
    ann = annotations if annotations is not None else load_annotations("cxc")
    out, chance, queries = {}, {}, {}
    for d, scores, rows, found, _, n in _directions(ann, sims, image_ids, caption_ids, t2i_sims):
        best = positive_ranks(scores, rows, found, first=1)[:, 0]
        p = np.array([len(f) for f in found])
        for k in ks:
            out[f"{d}_r{k}"] = 100.0 * float(np.mean(best <= k))
            chance[f"{d}_r{k}"] = 100.0 * float(chance_recall(n, p, k).mean())
        queries[d] = len(rows)
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in ks)
    chance["rsum"] = sum(chance[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in ks)
    return {**out, "queries": queries, "chance": chance, "annotations": ann.source}


def ranked_lists(sims: np.ndarray, image_ids, caption_ids, k: int | None = None):
    """The eccv-caption package's input: {image id: caption ids, best first} and {caption id:
    image ids, best first}, the best ``k`` of each (all when None), for cross-checks against its
    ``Metrics``. Tied scores come in an arbitrary order here (the protocols above rank them
    pessimistically), so compare on scores without ties."""
    image_ids, caption_ids = np.asarray(image_ids), np.asarray(caption_ids)
    neg = -np.asarray(sims)

    def best(axis: int, ids: np.ndarray) -> list[list[int]]:   # along the axis, then one list per query
        if k is None or k >= neg.shape[axis]:
            order = np.argsort(neg, axis=axis)
        else:
            top = np.argpartition(neg, k, axis=axis).take(range(k), axis=axis)
            order = np.take_along_axis(top, np.argsort(np.take_along_axis(neg, top, axis), axis), axis)
        return ids[order if axis == 1 else order.T].tolist()
    return (dict(zip(image_ids.tolist(), best(1, caption_ids))),
            dict(zip(caption_ids.tolist(), best(0, image_ids))))


# ---------------------------------------------------------------------------------------------
# expected values under random rankings (a uniformly random order of the n pool items)

def chance_recall(n: int, p: np.ndarray, k: int) -> np.ndarray:
    """P(at least one of a query's p in-pool positives is in the top k) = 1 - C(n-p, k) / C(n, k)."""
    p = np.asarray(p, np.float64)
    miss = np.ones_like(p)
    for i in range(min(k, n)):
        miss *= np.clip(n - p - i, 0, None) / (n - i)
    return 1.0 - miss


def chance_map_at_r(n: int, p: np.ndarray, r: np.ndarray) -> np.ndarray:
    """E[mAP@R] of one query with p positives in a pool of n and R >= p positives in all (R <= n).

    Position t is positive with probability p/n; given that, each of the t-1 positions above it is
    positive with probability (p-1)/(n-1). So E[rel(t) * P@t] = (p/n) (1 + (t-1)(p-1)/(n-1)) / t and
    E[mAP@R] = p / (n R) * (H_R + (p-1)/(n-1) * (R - H_R)), H_R the R-th harmonic number.
    R-Precision's expectation is simply p/n (each positive lies in the top R with probability R/n).
    """
    p, r = np.asarray(p, np.float64), np.asarray(r, np.int64)
    harmonic = np.cumsum(1.0 / np.arange(1, max(int(r.max(initial=1)), 1) + 1))[r - 1]
    rest = (p - 1) / (n - 1) if n > 1 else np.zeros_like(p)
    return p / (n * r) * (harmonic + rest * (r - harmonic))
