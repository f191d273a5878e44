"""The evaluation protocol of SCAN / VSE++: recalls, ranks, the 1K / 5K / 5-fold protocols,
similarity matrices computed in bounded-memory blocks, and the hard-negative pair test; the
registry of protocols by name, which also holds ECCV Caption and CxC (``training/protocols.py``).

Ranks are 1-based and ties count against the model: an item ranks below every other item with
the same score, so a scorer that returns a constant has the worst rank, not the best.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from training import protocols as coco_protocols

METRIC_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "i2t_medr", "i2t_meanr",
               "t2i_r1", "t2i_r5", "t2i_r10", "t2i_medr", "t2i_meanr", "rsum")


def i2t_ranks(sims: np.ndarray, per: int = 5, chunk: int = 256) -> np.ndarray:
    """For each image: 1 + number of wrong captions scoring at least its best caption."""
    n = sims.shape[0]
    ranks = np.empty(n, dtype=np.int64)
    for s in range(0, n, chunk):
        rows = sims[s:s + chunk]
        idx = np.arange(s, s + len(rows))
        own = rows.reshape(len(rows), -1, per)[np.arange(len(rows)), idx]   # [c, per]
        best = own.max(1, keepdims=True)
        ranks[s:s + len(rows)] = 1 + (rows >= best).sum(1) - (own >= best).sum(1)
    return ranks


def t2i_ranks(sims: np.ndarray, per: int = 5, chunk: int = 1024) -> np.ndarray:
    """For each caption: 1 + number of other images scoring at least its own image."""
    m = sims.shape[1]
    ranks = np.empty(m, dtype=np.int64)
    for s in range(0, m, chunk):
        cols = sims[:, s:s + chunk]
        j = np.arange(s, s + cols.shape[1])
        own = sims[j // per, j]
        ranks[s:s + cols.shape[1]] = (cols >= own[None, :]).sum(0)
    return ranks


def recall_metrics(sims: np.ndarray, captions_per_image: int = 5, t2i_sims: np.ndarray | None = None) -> dict:
    """Metrics of a [N images, 5N captions] similarity matrix where caption j belongs to image
    j // 5: R@1/5/10 (percent), median and mean rank both ways, rSum. Image->text reads the rows
    of ``sims``, text->image the columns of ``t2i_sims`` (default ``sims``): a shortlisted
    evaluation ranks each direction in its own matrix (``training/shortlist.py``)."""
    sims = np.asarray(sims)
    t2i_sims = sims if t2i_sims is None else _same_shape(sims, t2i_sims)
    n, m = sims.shape
    if m != captions_per_image * n:
        raise ValueError(f"similarity matrix is {n}x{m}; expected {captions_per_image} captions per "
                         f"image, i.e. {n}x{captions_per_image * n}")
    out = {}
    for name, ranks in (("i2t", i2t_ranks(sims, captions_per_image)),
                        ("t2i", t2i_ranks(t2i_sims, captions_per_image))):
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100.0 * float(np.mean(ranks <= k))
        out[f"{name}_medr"] = float(np.floor(np.median(ranks - 1)) + 1)  # SCAN's medr
        out[f"{name}_meanr"] = float(ranks.mean())
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    return {k: out[k] for k in METRIC_KEYS}


def _same_shape(sims: np.ndarray, t2i_sims) -> np.ndarray:
    t2i_sims = np.asarray(t2i_sims)
    if t2i_sims.shape != sims.shape:
        raise ValueError(f"text->image matrix is {'x'.join(map(str, t2i_sims.shape))}, the image->text "
                         f"one {'x'.join(map(str, sims.shape))}")
    return t2i_sims


def chance_metrics(n_images: int, captions_per_image: int = 5) -> dict:
    """Expected R@1/5/10 and rSum of a scorer that ranks at random (no ties): image->text R@K
    is the chance that one of the image's captions is among K drawn from all of them,
    text->image R@K is K / n_images. About 3.2 rSum for 1,000 images, 15.9 for 200."""
    m, per = n_images * captions_per_image, captions_per_image
    out = {}
    for k in (1, 5, 10):
        miss = 1.0   # P(none of the image's captions in the top k) = C(m - per, k) / C(m, k)
        for i in range(min(k, m)):
            miss *= max(m - per - i, 0) / (m - i)
        out[f"i2t_r{k}"] = 100.0 * (1.0 - miss)
        out[f"t2i_r{k}"] = 100.0 * min(k, n_images) / n_images
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    return out


def small_split_warning(split: str, n_images: int, captions_per_image: int = 5) -> str | None:
    """A line saying why recalls on ``n_images`` mean little, when random scores already reach
    a sixth of the 600 rSum points (fewer than about 30 images), else None."""
    chance = chance_metrics(n_images, captions_per_image)["rsum"]
    if chance <= 100:
        return None
    return (f"split '{split}' has only {n_images} image(s): random scores already reach rSum "
            f"{chance:.1f} of 600, so its recalls mean little")


# ---------------------------------------------------------------------------------------------
# protocols by name: each one scores a split's [n_images, n_captions] similarity matrix

@dataclass(frozen=True)
class Protocol:
    """``metrics(sims, *, image_ids, caption_ids, fold_size, captions_per_image, t2i_sims)`` ->
    metrics (each protocol uses the arguments it needs; ``t2i_sims``, when not None, is the matrix
    whose columns rank the images for text->image); ``extra(sims, metrics, fold_size)`` -> the entries
    stored next to them in eval.json; ``line(result)`` -> the one-line summary printed."""

    metrics: Callable[..., dict]
    extra: Callable[..., dict]
    line: Callable[[dict], str]


PROTOCOLS: dict[str, Protocol] = {}


def register(name: str, extra: Callable[..., dict], line: Callable[[dict], str]):
    def wrap(fn):
        PROTOCOLS[name] = Protocol(fn, extra, line)
        return fn
    return wrap


def _scan_extra(sims, metrics: dict, fold_size: int) -> dict:
    return {"images": int(sims.shape[0]), "chance_rsum": chance_metrics(sims.shape[0])["rsum"]}


def _fold_extra(sims, metrics: dict, fold_size: int) -> dict:
    n = min(sims.shape[0], fold_size)
    return {"images": int(sims.shape[0]), "chance_rsum": chance_metrics(n)["rsum"]}


def _scan_line(m: dict) -> str:
    return (f"i2t R@1 {m['i2t_r1']:.1f} R@5 {m['i2t_r5']:.1f} R@10 {m['i2t_r10']:.1f} "
            f"medr {m['i2t_medr']:.0f} | t2i R@1 {m['t2i_r1']:.1f} R@5 {m['t2i_r5']:.1f} "
            f"R@10 {m['t2i_r10']:.1f} medr {m['t2i_medr']:.0f} | rSum {m['rsum']:.1f} "
            f"(random scores: {m['chance_rsum']:.1f})")


def _images(sims, metrics: dict, fold_size: int) -> dict:
    return {"images": int(sims.shape[0])}


def _eccv_line(m: dict) -> str:
    def part(d):
        return (f"mAP@R {m[f'{d}_map_at_r']:.1f} R-P {m[f'{d}_rprecision']:.1f} "
                f"R@1 {m[f'{d}_r1']:.1f}")
    c = m["chance"]
    return (f"ECCV i2t {part('i2t')} | t2i {part('t2i')} ({m['queries']['i2t']} / "
            f"{m['queries']['t2i']} queries; random scores: mAP@R {c['i2t_map_at_r']:.2f} / "
            f"{c['t2i_map_at_r']:.2f})")


def _cxc_line(m: dict) -> str:
    def part(d):
        return " ".join(f"R@{k} {m[f'{d}_r{k}']:.1f}" for k in (1, 5, 10))
    return (f"CxC i2t {part('i2t')} | t2i {part('t2i')} | rSum {m['rsum']:.1f} "
            f"(random scores: {m['chance']['rsum']:.1f})")


@register("whole", _scan_extra, _scan_line)        # a dataset of no family (pipeline/manifest.py)
@register("coco-5k", _scan_extra, _scan_line)
@register("f30k-1k", _scan_extra, _scan_line)      # the innermost registers first
def whole_split(sims, *, captions_per_image: int = 5, t2i_sims=None, **_) -> dict:
    return recall_metrics(sims, captions_per_image, t2i_sims)


@register("coco-1k", _fold_extra, _scan_line)
def five_folds(sims, *, fold_size: int = 1000, captions_per_image: int = 5, t2i_sims=None, **_) -> dict:
    """The mean over 5 consecutive folds of ``fold_size`` images (fewer folds when the split is smaller)."""
    folds = min(5, sims.shape[0] // fold_size)
    if folds == 0:
        raise ValueError(f"coco-1k needs at least {fold_size} images, the split has {sims.shape[0]}")
    per = captions_per_image

    def fold(m, f):
        return None if m is None else m[f * fold_size:(f + 1) * fold_size,
                                        f * fold_size * per:(f + 1) * fold_size * per]
    results = [recall_metrics(fold(sims, f), per, fold(t2i_sims, f)) for f in range(folds)]
    out = {k: float(np.mean([r[k] for r in results])) for k in METRIC_KEYS}
    out["folds"] = folds
    return out


@register("eccv", _images, _eccv_line)
def eccv(sims, *, image_ids=None, caption_ids=None, t2i_sims=None, **_) -> dict:
    return coco_protocols.eccv(sims, _need(image_ids, "eccv"), _need(caption_ids, "eccv"), t2i_sims=t2i_sims)


@register("cxc", _images, _cxc_line)
def cxc(sims, *, image_ids=None, caption_ids=None, t2i_sims=None, **_) -> dict:
    return coco_protocols.cxc(sims, _need(image_ids, "cxc"), _need(caption_ids, "cxc"), t2i_sims=t2i_sims)


def _need(ids, protocol: str):
    if ids is None:
        raise ValueError(f"protocol {protocol} needs the image and caption ids of the matrix")
    return ids


def evaluate_protocol(sims: np.ndarray, protocol: str, fold_size: int = 1000,
                      captions_per_image: int = 5, image_ids=None, caption_ids=None,
                      t2i_sims: np.ndarray | None = None) -> dict:
    """``f30k-1k``, ``coco-5k`` and ``whole`` score the whole matrix; ``coco-1k`` is the mean over 5
    consecutive folds of ``fold_size`` images (fewer folds when the split is smaller); ``eccv``
    and ``cxc`` need the COCO ids of the matrix's rows and columns (``training/protocols.py``).
    ``t2i_sims``: the matrix whose columns rank the images for text->image, when it is not
    ``sims`` (a shortlisted evaluation); image->text always reads the rows of ``sims``."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol '{protocol}'; known: {', '.join(PROTOCOLS)}")
    return PROTOCOLS[protocol].metrics(sims, fold_size=fold_size, captions_per_image=captions_per_image,
                                       image_ids=image_ids, caption_ids=caption_ids, t2i_sims=t2i_sims)


def protocol_result(sims: np.ndarray, protocol: str, fold_size: int = 1000,
                    image_ids=None, caption_ids=None, t2i_sims: np.ndarray | None = None) -> tuple[dict, str]:
    """The eval.json entry of one protocol (metrics and what they are measured against) and
    the line to print."""
    m = evaluate_protocol(sims, protocol, fold_size, image_ids=image_ids, caption_ids=caption_ids,
                          t2i_sims=t2i_sims)
    result = {**m, **PROTOCOLS[protocol].extra(sims, m, fold_size)}
    return result, PROTOCOLS[protocol].line(result)


# ---------------------------------------------------------------------------------------------
# similarity of a model over a split

def map_tensors(fn, x):
    """``fn`` applied to every tensor of an encoding: a tensor, a model's named encoding
    (a dataclass of tensors, ``training.models.layers.Encoding``) or a tuple/list/dict of them."""
    if isinstance(x, torch.Tensor):
        return fn(x)
    if dataclasses.is_dataclass(x):
        return dataclasses.replace(x, **{f.name: map_tensors(fn, getattr(x, f.name))
                                         for f in dataclasses.fields(x)})
    if isinstance(x, (tuple, list)):
        return type(x)(map_tensors(fn, v) for v in x)
    if isinstance(x, dict):
        return {k: map_tensors(fn, v) for k, v in x.items()}
    return x


def to_device(x, device):
    return map_tensors(lambda t: t.to(device), x)


def batch_len(enc) -> int:
    """Items in an encoding: the first dimension of its first tensor."""
    if isinstance(enc, torch.Tensor):
        return enc.shape[0]
    if dataclasses.is_dataclass(enc):
        enc = [getattr(enc, f.name) for f in dataclasses.fields(enc)]
    for v in enc.values() if isinstance(enc, dict) else enc:
        if isinstance(v, (torch.Tensor, tuple, list, dict)):
            return batch_len(v)
    raise ValueError("an encoding holds no tensor")


@torch.no_grad()
def encode(fn, loader, device, progress: str | None = None) -> list:
    """Per-batch encodings, kept on the CPU."""
    return [to_device(fn(batch.to(device)), "cpu") for batch in tqdm(loader, desc=progress, leave=False,
                                                                 disable=progress is None)]


def gather_to_first(part: list, rank: int = 0, world: int = 1) -> list | None:
    """The lists ``part`` of all processes joined on process 0 (None on the others); the plain
    list when there is one process. CPU objects only, so the gloo backend serves any device."""
    if world == 1:
        return part
    parts = [None] * world if rank == 0 else None
    dist.gather_object(part, parts, dst=0)
    return [x for p in parts for x in p] if rank == 0 else None


def broadcast_from_first(obj, rank: int = 0, world: int = 1):
    """Process 0's ``obj`` on every process."""
    if world == 1:
        return obj
    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def batch_offsets(encodings: list) -> np.ndarray:
    """Position in the split of each batch's first item, and the number of items last."""
    return np.concatenate([[0], np.cumsum([batch_len(e) for e in encodings])]).astype(np.int64)


@torch.no_grad()
def compute_sims(model, image_loader, text_loader, device="cpu", progress: bool = True,
                 rank: int = 0, world: int = 1) -> np.ndarray | None:
    """[n_images, n_captions] float32. Two-tower models: one matrix product; cross-attention
    models: ``similarity`` on every (image batch, caption batch) block.

    With ``world`` > 1 processes (torchrun, ``torch.distributed`` initialised), every process
    encodes the whole split (linear cost), scores every ``world``-th block (the quadratic part)
    and process 0 gets the whole matrix; the others get None. The blocks and their scores are
    the same as with one process."""
    was_training = model.training
    model.eval()
    img = encode(model.encode_image, image_loader, device, "encode images" if progress else None)
    txt = encode(model.encode_text, text_loader, device, "encode captions" if progress else None)
    if model.two_tower:
        img, txt = [torch.cat(img)], [torch.cat(txt)]
    blocks = [(a, b) for a in range(len(img)) for b in range(len(txt))][rank::world]
    scored = []
    for a, b in tqdm(blocks, desc="similarity", leave=False, disable=not progress or len(blocks) == 1):
        block = model.similarity(to_device(img[a], device), to_device(txt[b], device))
        scored.append((a, b, block.float().cpu().numpy()))
    model.train(was_training)
    scored = gather_to_first(scored, rank, world)
    if scored is None:
        return None
    rows, cols = batch_offsets(img), batch_offsets(txt)
    sims = np.empty((rows[-1], cols[-1]), np.float32)
    for a, b, block in scored:
        sims[rows[a]:rows[a + 1], cols[b]:cols[b + 1]] = block
    return sims


# ---------------------------------------------------------------------------------------------
# hard negatives: pairs of images that differ only in attribute binding or relation direction

def _wins(right, wrong) -> float:
    """The share of comparisons the right item wins, a tie counting one half."""
    return float(np.mean((right > wrong) + 0.5 * (right == wrong)))


def hard_negative_accuracy(sims: np.ndarray, image_ids: np.ndarray, pairs: list[dict],
                           captions_per_image: int = 5, t2i_sims: np.ndarray | None = None) -> dict:
    """Per kind: ``i2t_acc`` = % of (image, own caption, partner caption) triples where the
    image scores its own caption higher; ``t2i_acc`` = % of captions that score their image
    higher than the partner image. Both images of a pair are tested. A tie counts one half: a
    model that cannot tell the two apart (e.g. two images whose features are equal) is at
    chance, 50 %, as one that guesses is. Image->text compares within rows of ``sims``,
    text->image within columns of ``t2i_sims`` (default ``sims``)."""
    t2i_sims = sims if t2i_sims is None else _same_shape(sims, t2i_sims)
    pos = {int(i): k for k, i in enumerate(image_ids)}
    per = captions_per_image
    acc: dict[str, dict] = {}
    skipped = 0
    for p in pairs:
        a, b = pos.get(int(p["image_id"])), pos.get(int(p["partner_id"]))
        if a is None or b is None:
            skipped += 1
            continue
        r = acc.setdefault(p["kind"], {"pairs": 0, "i2t": [], "t2i": []})
        r["pairs"] += 1
        for x, y in ((a, b), (b, a)):
            own, other = sims[x, x * per:(x + 1) * per], sims[x, y * per:(y + 1) * per]
            r["i2t"].append(_wins(own[:, None], other[None, :]))
            r["t2i"].append(_wins(t2i_sims[x, x * per:(x + 1) * per], t2i_sims[y, x * per:(x + 1) * per]))
    out = {kind: {"pairs": r["pairs"], "i2t_acc": 100.0 * float(np.mean(r["i2t"])),
                  "t2i_acc": 100.0 * float(np.mean(r["t2i"]))} for kind, r in sorted(acc.items())}
    if skipped:
        out["skipped_pairs"] = skipped
    return out
