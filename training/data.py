"""Batches, and the datasets that read them lazily from a dataset's shards.

Batch format (the contract every model codes against; see docs/training.md "Model interface"):

* ``ImageBatch``: region features [B, R, D] float32 padded with zeros, ``region_mask`` [B, R]
  (True = a real region), ``boxes`` [B, R, 4] (x1, y1, x2, y2) divided by the image width/height
  and clipped to [0, 1], ``boxes_known`` [B] (False for imported precomp features, whose boxes
  are NaN on disk: their boxes are given as the whole image [0, 0, 1, 1]), ``image_hw`` [B, 2]
  (height, width in pixels), ``image_ids`` [B], and, when asked for, ``grid`` [B, G, C] with
  ``grid_hw`` = (H, W), G = H * W in row-major order, same images in the same order.
* ``TextBatch``: ``tokens`` [B, L] word ids ``<start> w1 .. wn <end>`` padded with ``<pad>`` = 0,
  ``lengths`` [B] (counting both specials), ``mask`` [B, L]; the caption's scene graph as index
  tensors padded with 0 and masked, each at least 1 wide so that no tensor has a zero dimension:
  objects ``obj_index`` [B, O] (position of the head in ``tokens``, i.e. the graph's token_index
  + 1 for ``<start>``), ``obj_word`` [B, O] (word id of the head); attributes ``attr_object``
  [B, A] (index into the objects), ``attr_id`` (``Vocabulary.attribute_id``), ``attr_word`` (word
  id); relations ``rel_subject``, ``rel_predicate`` (``Vocabulary.predicate_id``), ``rel_object``
  [B, E]; masks ``obj_mask``, ``attr_mask``, ``rel_mask``.
* ``Batch``: an ``ImageBatch`` and a ``TextBatch`` of the same length B where caption i belongs
  to image i (training pairs); ``positives()`` marks every pair with the same image id.
"""

from __future__ import annotations

import dataclasses
import sys
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from pipeline import shards
from pipeline.config import step
from pipeline.shards import GridShard, Layout, RegionShard, ShardError, Vocabulary
from pipeline.shards.tables import graph_row_problem


# ---------------------------------------------------------------------------------------------
# batches

class _TensorBatch:
    def to(self, device, non_blocking: bool = False):
        """Move to ``device``; float16 features (as loaders made with ``half=True`` carry them
        between processes) become float32 there."""
        return dataclasses.replace(self, **{
            f.name: v.to(device, non_blocking=non_blocking).float() if v.dtype == torch.float16
            else v.to(device, non_blocking=non_blocking)
            for f in dataclasses.fields(self) if isinstance(v := getattr(self, f.name), torch.Tensor)})

    def pin_memory(self):
        return dataclasses.replace(self, **{
            f.name: v.pin_memory()
            for f in dataclasses.fields(self) if isinstance(v := getattr(self, f.name), torch.Tensor)})


@dataclass
class ImageBatch(_TensorBatch):
    regions: torch.Tensor        # [B, R, D] float32
    boxes: torch.Tensor          # [B, R, 4] float32 in [0, 1]
    region_mask: torch.Tensor    # [B, R] bool
    boxes_known: torch.Tensor    # [B] bool
    image_hw: torch.Tensor       # [B, 2] int64 (height, width)
    image_ids: torch.Tensor      # [B] int64
    grid: torch.Tensor | None = None          # [B, G, C] float32
    grid_hw: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self.image_ids)


@dataclass
class TextBatch(_TensorBatch):
    tokens: torch.Tensor         # [B, L] int64
    lengths: torch.Tensor        # [B] int64
    mask: torch.Tensor           # [B, L] bool
    caption_ids: torch.Tensor    # [B] int64
    image_ids: torch.Tensor      # [B] int64
    obj_index: torch.Tensor      # [B, O] position in tokens
    obj_word: torch.Tensor       # [B, O] word id of the head
    obj_mask: torch.Tensor       # [B, O]
    attr_object: torch.Tensor    # [B, A] index into objects
    attr_id: torch.Tensor        # [B, A] attribute id
    attr_word: torch.Tensor      # [B, A] word id of the attribute
    attr_mask: torch.Tensor      # [B, A]
    rel_subject: torch.Tensor    # [B, E] index into objects
    rel_predicate: torch.Tensor  # [B, E] predicate id
    rel_object: torch.Tensor     # [B, E] index into objects
    rel_mask: torch.Tensor       # [B, E]

    def __len__(self) -> int:
        return len(self.caption_ids)


@dataclass
class Batch:
    image: ImageBatch
    text: TextBatch

    def __len__(self) -> int:
        return len(self.text)

    def to(self, device, non_blocking: bool = False) -> "Batch":
        return Batch(self.image.to(device, non_blocking), self.text.to(device, non_blocking))

    def pin_memory(self) -> "Batch":
        return Batch(self.image.pin_memory(), self.text.pin_memory())

    def positives(self) -> torch.Tensor:
        """[B, B] bool: image i and caption j match (same image id)."""
        return self.image.image_ids[:, None] == self.text.image_ids[None, :]


# ---------------------------------------------------------------------------------------------
# collate

def _pad(seqs: list[np.ndarray], min_width: int = 0, dtype=np.int64) -> tuple[np.ndarray, np.ndarray]:
    width = max([len(s) for s in seqs] + [min_width])
    out = np.empty((len(seqs), width) + seqs[0].shape[1:], dtype=dtype)
    mask = np.zeros((len(seqs), width), dtype=bool)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = s
        out[i, len(s):] = 0
        mask[i, :len(s)] = True
    return out, mask


def collate_images(items: list[dict], half: bool = False) -> ImageBatch:
    """``half=True`` keeps region and grid features float16 until ``.to(device)``: half the bytes
    from DataLoader workers to the main process and no conversion in the workers."""
    cast = (lambda t: t) if half else (lambda t: t.float())  # noqa: E731
    feats, mask = _pad([it["features"] for it in items], 1, np.float16)
    boxes, _ = _pad([it["boxes"] for it in items], 1, np.float32)
    grid = grid_hw = None
    if items[0].get("grid") is not None:
        grid = cast(torch.from_numpy(np.stack([it["grid"] for it in items]).astype(np.float16, copy=False)))
        grid_hw = items[0]["grid_hw"]
    return ImageBatch(
        regions=cast(torch.from_numpy(feats)), boxes=torch.from_numpy(boxes),
        region_mask=torch.from_numpy(mask),
        boxes_known=torch.tensor([it["boxes_known"] for it in items]),
        image_hw=torch.tensor(np.array([it["image_hw"] for it in items], dtype=np.int64)),
        image_ids=torch.tensor([it["image_id"] for it in items], dtype=torch.int64),
        grid=grid, grid_hw=grid_hw)


def collate_text(items: list[dict]) -> TextBatch:
    t = lambda a: torch.from_numpy(a)  # noqa: E731
    tokens, mask = _pad([it["tokens"] for it in items], 1)
    obj_index, obj_mask = _pad([it["obj_index"] for it in items], 1)
    obj_word, _ = _pad([it["obj_word"] for it in items], 1)
    attr_object, attr_mask = _pad([it["attr_object"] for it in items], 1)
    attr_id, _ = _pad([it["attr_id"] for it in items], 1)
    attr_word, _ = _pad([it["attr_word"] for it in items], 1)
    rel_subject, rel_mask = _pad([it["rel_subject"] for it in items], 1)
    rel_predicate, _ = _pad([it["rel_predicate"] for it in items], 1)
    rel_object, _ = _pad([it["rel_object"] for it in items], 1)
    return TextBatch(
        tokens=t(tokens), lengths=t(mask.sum(1)), mask=t(mask),
        caption_ids=torch.tensor([it["caption_id"] for it in items], dtype=torch.int64),
        image_ids=torch.tensor([it["image_id"] for it in items], dtype=torch.int64),
        obj_index=t(obj_index), obj_word=t(obj_word), obj_mask=t(obj_mask),
        attr_object=t(attr_object), attr_id=t(attr_id), attr_word=t(attr_word), attr_mask=t(attr_mask),
        rel_subject=t(rel_subject), rel_predicate=t(rel_predicate), rel_object=t(rel_object),
        rel_mask=t(rel_mask))


def collate_pairs(items: list[tuple[dict, dict]], half: bool = False) -> Batch:
    return Batch(collate_images([a for a, _ in items], half), collate_text([b for _, b in items]))


# ---------------------------------------------------------------------------------------------
# shard selection

def run_kinds(grid: bool) -> tuple[str, ...]:
    """The kinds of file a run reads: region (and grid) shards of its splits, captions, graphs."""
    return ("regions", "grid", "captions", "graphs") if grid else ("regions", "captions", "graphs")


def shard_hashes(layout: Layout, splits, grid: bool, pinned: dict | None = None) -> dict[str, str]:
    """``{kind: config hash}`` of every file a run on ``splits`` reads, checked against
    ``pinned`` (the hashes the run was trained on, e.g. ``RunConfig.shard_hashes``). A run calls
    this once and hands the result to each of its ShardData; it raises ShardError when a kind
    mixes configs or differs from ``pinned``."""
    return resolve_read_set(layout, splits, grid, pinned)[0]


def resolve_read_set(layout: Layout, splits, grid: bool, pinned: dict | None = None):
    """(config hashes, entries) of the files a run on ``splits`` reads."""
    index = layout.index
    if grid and not index.entries("grid"):
        from pipeline import precomp   # only on this error path: the trainer does not need it

        if precomp.imported(layout):
            raise ShardError(f"{layout.dir}: the model needs grid features, which are extracted from "
                             f"the images; a dataset imported from precomp features has none (train a "
                             f"region-only model, or ingest the images and extract)")
        raise ShardError(f"{layout.dir}: the model needs grid features but the dataset has "
                         f"no grid shards; run "
                         f"{step('extract', layout.root, layout.name, '--kind grid --weights WEIGHTS')}")
    entries = index.read_set(run_kinds(grid), list(splits))
    return shards.resolve_config_hashes(entries, pinned, str(index.path)), entries


# ---------------------------------------------------------------------------------------------
# text: every caption of the split encoded once into flat int32 arrays

class _Ragged:
    """Rows of varying length stored as one flat array + offsets (compact, fork-friendly)."""

    def __init__(self, rows: list[list], width: int = 1):
        lens = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        self.offsets = np.concatenate([[0], np.cumsum(lens)])
        flat = [v for r in rows for v in r]
        self.values = np.asarray(flat, dtype=np.int32).reshape(-1, width) if width > 1 else \
            np.asarray(flat, dtype=np.int32)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i]:self.offsets[i + 1]]


def encode_graph(row: dict, vocab: Vocabulary, max_len: int) -> tuple[list, list, list, list]:
    """One graph-table row -> (token ids, objects, attributes, relations) as the batch wants them.
    Tokens are cut to ``max_len`` (specials included); objects whose head falls beyond the cut
    are dropped together with their attributes and relations."""
    words = row["tokens"][:max_len - 2]
    ids = vocab.encode(words)
    keep, objects = {}, []
    for k, o in enumerate(row["objects"] or []):
        pos = o["token_index"] + 1  # + 1 for <start>
        if 0 <= o["token_index"] < len(words):
            keep[k] = len(objects)
            objects.append((pos, vocab.stoi.get((o["head"] or "").lower(), Vocabulary.UNK)))
    attrs = [(keep[a["object"]], vocab.attribute_id(a["attribute"] or ""),
              vocab.stoi.get((a["attribute"] or "").lower(), Vocabulary.UNK))
             for a in row["attributes"] or [] if a["object"] in keep]
    rels = [(keep[r["subject"]], vocab.predicate_id(r["predicate"] or ""), keep[r["object"]])
            for r in row["relations"] or [] if r["subject"] in keep and r["object"] in keep]
    return ids, objects, attrs, rels


def dangling(row: dict) -> Counter:
    """Attributes and relations of a graphs row whose object index points at no object of the
    row (``encode_graph`` drops them; the parser never writes them)."""
    n = len(row["objects"])
    return Counter({"relation(s)": sum(not (0 <= r["subject"] < n and 0 <= r["object"] < n)
                                       for r in row["relations"]),
                    "attribute(s)": sum(not 0 <= a["object"] < n for a in row["attributes"])})


class TextStore:
    def __init__(self, caption_ids: np.ndarray, image_ids: np.ndarray, graph_files: list[Path],
                 vocab: Vocabulary, max_len: int = 64):
        self.caption_ids, self.image_ids = caption_ids, image_ids
        pos = {int(c): i for i, c in enumerate(caption_ids)}
        encoded: list = [None] * len(caption_ids)
        wanted = pa.array(caption_ids, pa.int64())
        for path in graph_files:
            table = shards.read_table(path, "graphs")
            table = table.append_column("row", pa.array(np.arange(len(table))))   # for messages
            table = table.filter(pc.is_in(table["caption_id"], wanted))
            dropped = Counter()
            for row in table.to_pylist():
                if problem := graph_row_problem(row):
                    raise ShardError(f"{path}: row {row['row']} (caption_id {row['caption_id']}): {problem}")
                dropped.update(dangling(row))
                encoded[pos[row["caption_id"]]] = encode_graph(row, vocab, max_len)
            if dropped.total():
                counts = " and ".join(f"{n} {what}" for what, n in dropped.items() if n)
                print(f"warning: {path}: dropped {counts} whose object index is out of range", file=sys.stderr)
        missing = [int(caption_ids[i]) for i, e in enumerate(encoded) if e is None]
        if missing:
            raise ShardError(f"{len(missing)} caption(s) have no row in the graph tables "
                             f"(first: caption_id {missing[:5]}); rerun `itmkit parse`")
        self.tokens = _Ragged([e[0] for e in encoded])
        self.objects = _Ragged([e[1] for e in encoded], 2)
        self.attributes = _Ragged([e[2] for e in encoded], 3)
        self.relations = _Ragged([e[3] for e in encoded], 3)

    def __len__(self) -> int:
        return len(self.caption_ids)

    def get(self, i: int) -> dict:
        return caption_item(self.caption_ids[i], self.image_ids[i], self.tokens[i],
                            self.objects[i], self.attributes[i], self.relations[i])


def caption_item(caption_id, image_id, tokens, objects, attributes, relations) -> dict:
    """One caption as ``collate_text`` takes it, from the parts ``encode_graph`` returns as
    arrays: tokens [L], objects [O, 2], attributes [A, 3], relations [E, 3]."""
    o, a, r = objects, attributes, relations
    return {"caption_id": int(caption_id), "image_id": int(image_id),
            "tokens": tokens, "obj_index": o[:, 0], "obj_word": o[:, 1],
            "attr_object": a[:, 0], "attr_id": a[:, 1], "attr_word": a[:, 2],
            "rel_subject": r[:, 0], "rel_predicate": r[:, 1], "rel_object": r[:, 2]}


# ---------------------------------------------------------------------------------------------
# the split of a dataset: images in region-shard order, their first captions by caption_id

@dataclass
class DataConfig:
    split: str = "train"
    captions_per_image: int = 5
    max_len: int = 64            # tokens per caption, <start> and <end> included
    grid: bool = False
    max_images: int | None = None  # first N images of the split (quick runs and tests)
    verify: bool = True          # re-hash every file read against shards.json before reading


class ShardData:
    """Everything one split needs, opened lazily: region (and grid) shards are HDF5 handles
    opened per process on first read; captions are encoded once into compact arrays.

    ``hashes`` are the run's config hashes (see ``shard_hashes``); the files of this split must
    match them. Every file it reads is re-hashed against shards.json when it is built (unless
    ``cfg.verify`` is False), so an altered shard is refused, never read."""

    def __init__(self, root, name: str, vocab: Vocabulary, cfg: DataConfig,
                 hashes: dict[str, str] | None = None):
        self.layout, self.cfg, self.vocab = Layout(Path(root), name), cfg, vocab
        self.hashes, entries = resolve_read_set(self.layout, [cfg.split], cfg.grid, hashes)
        if cfg.verify:
            self.layout.index.check(entries)
        files = {kind: [self.layout.dir / e.path for e in entries if e.kind == kind]
                 for kind in ("regions", "grid", "graphs")}

        self.shards = [RegionShard(p) for p in files["regions"]]
        ids = [s.image_ids for s in self.shards]
        self.image_ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        self.loc = np.concatenate([np.stack([np.full(len(a), k), np.arange(len(a))], 1)
                                   for k, a in enumerate(ids)]) if ids else np.zeros((0, 2), np.int64)
        if cfg.max_images is not None:
            self.image_ids, self.loc = self.image_ids[:cfg.max_images], self.loc[:cfg.max_images]
        if len(np.unique(self.image_ids)) != len(self.image_ids):
            raise ShardError(f"{self.layout.dir}/regions: split '{cfg.split}' lists an image twice")

        self.grid_shards, self.grid_loc, self.grid_hw = [], None, None
        if cfg.grid:
            self._open_grid(files["grid"])

        # captions: the first captions_per_image of each image, by caption_id, image-major
        cap = shards.read_table(self.layout.captions, "captions", ["caption_id", "image_id", "split"])
        cap = cap.filter(pc.equal(cap["split"], cfg.split))
        cid, iid = cap["caption_id"].to_numpy(), cap["image_id"].to_numpy()
        order = np.lexsort((cid, iid))
        cid, iid = cid[order], iid[order]
        starts = np.searchsorted(iid, self.image_ids, "left")
        counts = np.searchsorted(iid, self.image_ids, "right") - starts
        k = cfg.captions_per_image
        short = np.flatnonzero(counts < k)
        if len(short):
            raise ShardError(f"{self.layout.captions}: image_id {int(self.image_ids[short[0]])} of split "
                             f"'{cfg.split}' has {int(counts[short[0]])} caption(s), need "
                             f"{k} ({len(short)} image(s) short)")
        take = (starts[:, None] + np.arange(k)[None, :]).reshape(-1)
        self.text = TextStore(cid[take], iid[take], sorted(files["graphs"]), vocab, cfg.max_len)

    def _open_grid(self, files: list[Path]) -> None:
        self.grid_shards = [GridShard(p) for p in files]
        where = {int(i): (k, r) for k, s in enumerate(self.grid_shards) for r, i in enumerate(s.image_ids)}
        missing = [int(i) for i in self.image_ids if int(i) not in where]
        if missing:
            raise ShardError(f"{self.layout.dir}/grid: no grid features for {len(missing)} image(s) of "
                             f"split '{self.cfg.split}' (first: {missing[:5]})")
        self.grid_loc = np.array([where[int(i)] for i in self.image_ids], dtype=np.int64).reshape(-1, 2)
        sizes = {s.grid_hw for s in self.grid_shards}
        if len(sizes) != 1:
            raise ShardError(f"{self.layout.dir}/grid: shards of split '{self.cfg.split}' have grid sizes {sizes}")
        self.grid_hw = sizes.pop()

    @property
    def n_images(self) -> int:
        return len(self.image_ids)

    def image(self, i: int) -> dict:
        k, row = self.loc[i]
        item = image_item(self.shards[k].get(int(row), ("features", "boxes")))
        if self.grid_loc is not None:
            gk, grow = self.grid_loc[i]
            item["grid"], item["grid_hw"] = self.grid_shards[gk].get(int(grow)), self.grid_hw
        return item

    def caption(self, j: int) -> dict:
        return self.text.get(j)


def image_item(r: shards.Regions) -> dict:
    """One image's regions as ``collate_images`` takes them: boxes divided by the image size
    and clipped to [0, 1], or the whole image when the shard's boxes are unknown (NaN)."""
    h, w = r.image_hw
    boxes = r.boxes / np.array([w, h, w, h], dtype=np.float32)
    known = not np.isnan(boxes).any()
    boxes = np.clip(boxes, 0.0, 1.0) if known else np.tile(np.float32([0, 0, 1, 1]), (len(boxes), 1))
    return {"image_id": r.image_id, "image_hw": (h, w), "features": r.features,
            "boxes": boxes, "boxes_known": known}


class PairDataset(Dataset):
    """Training samples: every (image, caption) pair, caption-major: item j is caption j and
    its image j // captions_per_image."""

    def __init__(self, data: ShardData):
        self.data = data

    def __len__(self) -> int:
        return len(self.data.text)

    def __getitem__(self, j: int):
        return self.data.image(j // self.data.cfg.captions_per_image), self.data.caption(j)


class ImageDataset(Dataset):
    def __init__(self, data: ShardData):
        self.data = data

    def __len__(self) -> int:
        return self.data.n_images

    def __getitem__(self, i: int) -> dict:
        return self.data.image(i)


class CaptionDataset(Dataset):
    def __init__(self, data: ShardData):
        self.data = data

    def __len__(self) -> int:
        return len(self.data.text)

    def __getitem__(self, j: int) -> dict:
        return self.data.caption(j)


def make_loader(dataset: Dataset, collate, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                workers: int = 0, rank: int = 0, world_size: int = 1, drop_last: bool = False,
                pin_memory: bool = False, sampler=None) -> DataLoader:
    """A DataLoader whose order depends only on (seed, epoch): call ``loader.sampler.set_epoch``
    before each epoch. Under DDP each rank reads its own 1/world_size of the samples. A given
    ``sampler`` (``PairedBatchSampler``) replaces the shuffling one."""
    if sampler is None and (shuffle or world_size > 1):
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle,
                                     seed=seed, drop_last=drop_last)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate,
                      num_workers=workers, pin_memory=pin_memory, drop_last=drop_last,
                      persistent_workers=workers > 0,
                      generator=torch.Generator().manual_seed(seed))


class PairedBatchSampler(torch.utils.data.Sampler):
    """The caption indices of ``PairDataset`` in an order whose every run of ``batch_size`` holds,
    for each image pair in ``pairs`` (indices into the split's images), a caption of each image
    side by side: the pair's two images meet in one batch as often as they have captions, so the
    loss sees the one difference between them (NegCLIP-style batch composition; a random batch
    holds an image's partner with probability about batch / images). The order depends only on
    (seed, epoch), like ``DistributedSampler``'s; under DDP each rank takes every ``world``-th
    unit (a caption, or a pair's two) and packs its own batches of ``batch_size``. A pair is split
    only when a batch has one slot left and no single caption remains to fill it (near the end of
    an epoch whose captions are mostly paired)."""

    def __init__(self, n_images: int, captions_per_image: int, pairs, batch_size: int, *, seed: int = 0,
                 rank: int = 0, world: int = 1, drop_last: bool = True):
        if batch_size < 2:
            raise ValueError(f"pair_batches needs batches of at least 2 captions per process, not {batch_size}")
        self.n_images, self.k, self.batch_size = n_images, captions_per_image, batch_size
        self.seed, self.rank, self.world, self.drop_last, self.epoch = seed, rank, world, drop_last, 0
        seen: set[int] = set()
        self.pairs = []
        for a, b in pairs:   # an image in two pairs joins the first only: a unit holds two captions
            if a != b and a not in seen and b not in seen:
                self.pairs.append((int(a), int(b)))
                seen |= {int(a), int(b)}
        self.single = np.array(sorted(set(range(n_images)) - seen), dtype=np.int64)
        self.order = self._order(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.order = self._order(epoch)

    def _order(self, epoch: int) -> list[int]:
        rng = np.random.default_rng([self.seed, epoch])
        k = self.k
        units = [[int(c)] for i in self.single for c in range(i * k, (i + 1) * k)]
        for a, b in self.pairs:   # caption j of a beside a random caption of b, each used once
            for ca, cb in zip(rng.permutation(k), rng.permutation(k)):
                units.append([a * k + int(ca), b * k + int(cb)])
        units = [units[u] for u in rng.permutation(len(units))][self.rank::self.world]
        pairs, single = [u for u in units if len(u) == 2], [u for u in units if len(u) == 1]
        batches, batch = [], []
        while pairs or single:   # each slot drawn in proportion to the captions left of each sort
            room = self.batch_size - len(batch)
            pair_share = 2 * len(pairs) / (2 * len(pairs) + len(single))
            if pairs and room >= 2 and (not single or rng.random() < pair_share):
                batch += pairs.pop()
            elif single:
                batch += single.pop()
            else:   # one slot left and only pairs: this one is split, its second caption goes on
                first, second = pairs.pop()
                batch.append(first)
                single.append([second])
            if len(batch) == self.batch_size:
                batches.append(batch)
                batch = []
        if batch and not self.drop_last:
            batches.append(batch)
        return [c for b in batches for c in b]

    def __iter__(self):
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


def hard_negative_pairs(layout: Layout) -> list[dict]:
    """The rows (image_id, partner_id, kind) of a dataset's ``hard_negatives.parquet``; none
    when the dataset has no such file."""
    if not layout.hard_negatives.exists():
        return []
    return shards.read_table(layout.hard_negatives, "hard_negatives").to_pylist()


def image_pairs(layout: Layout, image_ids, kinds: str) -> list[tuple[int, int]]:
    """The dataset's hard-negative pairs (``hard_negatives.parquet``) of the kinds named in
    ``kinds`` (comma-separated, or ``all``) whose two images are both in ``image_ids``, as index
    pairs into it. A dataset without the file, or an unknown kind, is an error naming both."""
    if not layout.hard_negatives.exists():
        raise ShardError(f"pair_batches={kinds}: dataset '{layout.name}' has no hard-negative pairs "
                         f"({layout.hard_negatives} does not exist)")
    table = hard_negative_pairs(layout)
    present = sorted({r["kind"] for r in table})
    wanted = set(present) if kinds == "all" else {k.strip() for k in kinds.split(",") if k.strip()}
    if not wanted or wanted - set(present):
        raise ValueError(f"pair_batches={kinds}: {layout.hard_negatives} has the kinds "
                         f"{', '.join(present)} (or: all)")
    index = {int(i): n for n, i in enumerate(image_ids)}
    return [(index[r["image_id"]], index[r["partner_id"]]) for r in table
            if r["kind"] in wanted and r["image_id"] in index and r["partner_id"] in index]


def eval_loaders(data, batch_size: int, workers: int = 0) -> tuple[DataLoader, DataLoader]:
    """The loaders of a split's images (float16 features) and its captions, in file order, for
    scoring it: ``batch_size`` images, and five captions per image, per batch."""
    images = make_loader(ImageDataset(data), partial(collate_images, half=True), batch_size, workers=workers)
    texts = make_loader(CaptionDataset(data), collate_text, batch_size * 5, workers=workers)
    return images, texts

