"""The extraction loop, shaped for a GPU: DataLoader workers decode and resize a chunk's images
ahead of the model (into pinned memory on CUDA, copied without blocking), batches hold images
of one resized size, and a writer thread turns results into shards while the model goes on.

Each chunk is claimed before its images are decoded; its outputs are written in images.parquet
order and registered (then its claim released) when its last image is written. Batches never
cross a chunk boundary and depend only on images.parquet, so a resumed chunk sees the same
batches."""

from __future__ import annotations

import contextlib
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from features.config import ExtractorConfig
from features.profile import no_stages
from features.single import result_regions
from features.transforms import BadImage, load_image, resized_size, to_network_input
from pipeline import shards


@dataclass
class RunOptions:
    """How the model runs. None of these changes what a shard holds beyond float rounding (as
    the batch size does not), so none is part of the config hash."""
    device: str = "cpu"
    batch_size: int = 2
    workers: int = 2                 # DataLoader decoding processes (0: in this process)
    channels_last: bool = False      # NHWC convolutions (tensor cores)
    cudnn_benchmark: bool = False    # let cuDNN time its algorithms per input shape
    profile: bool = False            # time every stage (features.profile)
    queue: int = 8                   # batches of results the writer may fall behind by


@dataclass
class Chunk:
    split: str
    index: int
    rows: np.ndarray                 # positions in images.parquet
    ids: list                        # their image ids
    inputs_hash: dict                # kind -> hash of what the chunk's shard is made from
    kinds: list = field(default_factory=list)   # kinds whose shard must be (re)written


@dataclass
class Report:
    written: dict = field(default_factory=lambda: {"regions": 0, "grid": 0})
    reused: int = 0
    meanwhile: int = 0                               # of those, written by another process meanwhile
    images: int = 0
    backbone_images: int = 0                         # images through the backbone (one pass each)
    bad: list = field(default_factory=list)          # (image_id, path, split, action, reason)
    removed: list = field(default_factory=list)
    bad_path: Path | None = None
    setup_seconds: float = 0.0                       # building the model and filling its weights
    loop_seconds: float = 0.0                        # decoding, forward passes and writing shards
    loop_cpu_seconds: float = 0.0                    # CPU time of this process meanwhile (all threads)
    stages: object = None                            # features.profile.Stages with --profile


# ---------------------------------------------------------------------------------------------
# decoding in DataLoader workers, batches of one size

class ImageDataset(Dataset):
    def __init__(self, paths: list[str], cfg: ExtractorConfig):
        self.paths, self.cfg = paths, cfg

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, row):
        cfg = self.cfg
        try:
            im, note = load_image(self.paths[row], cfg.max_pixels, cfg.min_image_side)
        except BadImage as e:
            return {"row": row, "image": None, "error": str(e)}
        return {"row": row, "image": to_network_input(im, cfg.min_size, cfg.max_size),
                "orig_hw": (im.height, im.width), "note": note, "error": None}


def resized_sizes(images, cfg: ExtractorConfig) -> list:
    """The network input size of each row of images.parquet, None where its size is unknown."""
    return [resized_size(h, w, cfg.min_size, cfg.max_size) if h and w else None
            for w, h in zip(images["width"].to_pylist(), images["height"].to_pylist())]


def size_batches(rows, sizes, batch_size: int, window: int) -> list[list[int]]:
    """``rows`` cut into batches of at most ``batch_size`` rows whose images resize to the same
    size (``sizes``, one per row; the model stacks only equal sizes and never pads). A batch is
    emitted when full, or when its first row is ``window`` rows behind the newest, so the writer
    puts results back in row order with at most about ``window`` images waiting."""
    open_: dict = {}                      # size -> [positions], in order of their first row
    out = []
    for pos, size in enumerate(sizes):
        group = open_.setdefault(size, [])
        group.append(pos)
        if len(group) == batch_size:
            out.append(open_.pop(size))
        for key in [k for k, g in open_.items() if pos - g[0] >= window]:
            out.append(open_.pop(key))
    out += open_.values()
    return [[int(rows[p]) for p in batch] for batch in out]


# ---------------------------------------------------------------------------------------------
# one output file per kind and chunk

class RegionsOutput:
    def __init__(self, path, attrs, boxes_per_chunk):
        self.writer = shards.RegionShardWriter(path, boxes_per_chunk=boxes_per_chunk, attrs=attrs)
        self.rows = 0

    def add(self, image_id, hw, result):
        self.rows += 1
        self.writer.append(result_regions(image_id, hw, result))

    def close(self) -> int:
        self.writer.close()
        return self.rows

    def abort(self):
        self.writer.abort()


class GridOutput:
    def __init__(self, path, attrs, grid_size):
        self.path, self.attrs, self.grid_size = path, attrs, grid_size
        self.ids, self.features = [], []

    def add(self, image_id, hw, result):
        self.ids.append(image_id)
        self.features.append(result["grid"].numpy().astype(np.float16))

    def close(self) -> int:
        feats = (np.stack(self.features) if self.features else
                 np.zeros((0, self.grid_size[0] * self.grid_size[1], shards.FEATURE_DIM), np.float16))
        shards.write_grid(self.path, np.asarray(self.ids, np.int64), feats, self.grid_size, attrs=self.attrs)
        return len(self.ids)

    def abort(self):
        pass


def open_outputs(layout, c: Chunk, attrs, cfg, given, ids) -> dict:
    outs = {}
    for kind in c.kinds:
        a = dict(attrs, split=c.split, chunk=c.index, kind=kind, config_hash=attrs["config_hash"][kind])
        path = layout.shard(kind, c.split, c.index)
        if kind == "regions":
            per = cfg.fixed_boxes or (max([len(given.get(int(ids[r]), ())) for r in c.rows], default=1)
                                      if given is not None else cfg.max_boxes)
            outs[kind] = RegionsOutput(path, a, max(1, per))
        else:
            outs[kind] = GridOutput(path, a, cfg.grid_size)
    return outs


# ---------------------------------------------------------------------------------------------
# the writer thread

@dataclass
class _Open:
    """A chunk whose outputs are being written: results wait in ``pending`` until every earlier
    row is written."""
    outputs: dict
    pending: dict = field(default_factory=dict)      # position -> (image_id, hw, result or None)
    next: int = 0
    skipped: list = field(default_factory=list)
    decoded: int = 0                                 # images that reached the model
    backbone: int = 0                                # images the backbone ran on


class Writer(threading.Thread):
    """Writes, registers and releases chunks from a bounded queue of results, so that the model
    is never kept waiting by HDF5, hashing or shards.json (only by a full queue)."""

    def __init__(self, run: "ChunkRunner", claims: dict, size: int, stages):
        super().__init__(name="shard-writer", daemon=True)
        self.run_, self.claims, self.stages = run, claims, stages
        self.queue: queue.Queue = queue.Queue(max(1, size))
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.open: dict[int, _Open] = {}

    # -- the model's side
    def put(self, c: Chunk, items: list, backbone: int) -> None:
        with self.stages("writer stall"):
            while True:
                self.check()
                try:
                    self.queue.put((c, items, backbone), timeout=0.1)
                    return
                except queue.Full:
                    continue

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def finish(self) -> None:
        """Wait for every queued result to be written; raise what the writer raised."""
        self.queue.put(None)
        while self.is_alive() and self.error is None:
            self.join(0.1)
        self.check()

    def abort(self) -> None:
        self.stop.set()
        self.join()

    # -- the thread
    def run(self) -> None:
        try:
            while not self.stop.is_set():
                try:
                    item = self.queue.get(timeout=0.1)
                except queue.Empty:
                    continue
                if item is None:
                    return
                with self.stages("writing"):
                    self._add(*item)
        except BaseException as e:  # handed to the model's side by check()
            self.error = e
        finally:
            for state in self.open.values():
                for out in state.outputs.values():
                    out.abort()
            self.open = {}

    def _add(self, c: Chunk, items: list, backbone: int) -> None:
        r = self.run_
        state = self.open.get(id(c))
        if state is None:
            state = self.open[id(c)] = _Open(open_outputs(r.layout, c, r.attrs, r.cfg, r.given, r.ids))
        state.backbone += backbone
        for pos, image_id, hw, result in items:
            state.pending[pos] = (image_id, hw, result)
        while state.next in state.pending:
            image_id, hw, result = state.pending.pop(state.next)
            state.next += 1
            if result is None:
                state.skipped.append(image_id)
                continue
            state.decoded += 1
            for out in state.outputs.values():
                out.add(image_id, hw, result)
        if state.next == len(c.rows):
            self._finish(c, self.open.pop(id(c)))

    def _finish(self, c: Chunk, state: _Open) -> None:
        r = self.run_
        # how the chunk's images went through the backbone: passes per image, and the kinds that
        # one pass wrote (both kinds from one pass: the shards of the chunk cost one pass)
        passes = state.backbone / state.decoded if state.decoded else 0
        extra = {"backbone": {"passes": int(passes) if passes == int(passes) else round(passes, 3),
                              "kinds": sorted(state.outputs)}}
        if state.skipped:
            extra["skipped_images"] = sorted(state.skipped)
        for kind, out in state.outputs.items():
            rows = out.close()
            r.layout.index.register(kind, r.layout.shard(kind, c.split, c.index), rows=rows,
                                    config_hash=r.cfg_hash[kind], inputs_hash=c.inputs_hash[kind], extra=extra)
            r.report.written[kind] += 1
        self.claims.pop(id(c)).close()


# ---------------------------------------------------------------------------------------------
# the loop

class ChunkRunner:
    """Runs chunks through the model (see the module's docstring)."""

    def __init__(self, layout, cfg, model, images, given, attrs, cfg_hash, report, options: RunOptions,
                 stages=no_stages):
        self.layout, self.cfg, self.model, self.given = layout, cfg, model, given
        self.ids, self.paths = images["image_id"].to_numpy(), images["path"].to_pylist()
        self.sizes = resized_sizes(images, cfg)
        self.attrs, self.cfg_hash, self.report = attrs, cfg_hash, report
        self.options, self.stages = options, stages

    def __call__(self, chunks: list[Chunk], bar, wait: bool) -> list[Chunk]:
        """Write ``chunks``; return those another process holds (only when ``wait`` is False)."""
        if not chunks:
            return []
        busy, claims = [], {}   # claims: id(chunk) -> the ExitStack that holds its outputs
        bs = self.options.batch_size

        def batches():  # runs in this process, a few batches ahead of the model
            for c in chunks:
                stack = contextlib.ExitStack()
                state = self._claim(stack, c, wait)
                if state == "busy":
                    busy.append(c)
                if state != "write":
                    bar.update(len(c.rows))
                    continue
                claims[id(c)] = stack
                # window: on COCO's sizes, batches of 4 then hold 2.3 images on average (docs/features.md)
                yield from size_batches(c.rows, [self.sizes[r] for r in c.rows], bs, window=32 * bs)

        cuda = torch.device(self.options.device).type == "cuda"
        loader = DataLoader(ImageDataset(self.paths, self.cfg), batch_sampler=batches(),
                            num_workers=self.options.workers, collate_fn=list, pin_memory=cuda)
        where = {int(r): (c, pos) for c in chunks for pos, r in enumerate(c.rows)}
        counted = [0]
        hook = self.model.backbone.register_forward_hook(lambda m, i, out: counted.__setitem__(0, counted[0] + len(out)))
        writer = Writer(self, claims, self.options.queue, self.stages)
        writer.start()
        try:
            batches_ = iter(loader)
            while True:
                with self.stages("decode wait"):
                    batch = next(batches_, None)
                if batch is None:
                    break
                c = where[batch[0]["row"]][0]
                before = counted[0]
                items = self._forward(batch, c, where)
                writer.put(c, items, counted[0] - before)
                self.report.images += len(batch)
                self.report.backbone_images += counted[0] - before
                bar.update(len(batch))
            writer.finish()
        except BaseException:
            writer.abort()
            raise
        finally:
            hook.remove()
            for stack in claims.values():
                stack.close()
        return busy

    def _claim(self, claims: contextlib.ExitStack, c: Chunk, wait: bool) -> str:
        """'write' (``claims`` holds the chunk's outputs that are still to do), 'busy' (another
        process holds one) or 'done' (another process wrote them meanwhile)."""
        for kind in c.kinds:
            if not claims.enter_context(shards.claim(self.layout.shard(kind, c.split, c.index), wait=wait)):
                claims.close()
                return "busy"
        todo = [k for k in c.kinds if not self.layout.index.is_valid(
            k, self.layout.shard(k, c.split, c.index), self.cfg_hash[k], c.inputs_hash[k])]
        self.report.reused += len(c.kinds) - len(todo)
        self.report.meanwhile += len(c.kinds) - len(todo)
        c.kinds = todo
        if not todo:
            claims.close()
        return "write" if todo else "done"

    def _forward(self, batch, c: Chunk, where) -> list:
        """The model on a batch's good images; returns (position, image id, (H, W), result on
        the host or None for a skipped image) per image."""
        items, good = [], []
        for item in batch:
            row = item["row"]
            image_id, path = int(self.ids[row]), self.paths[row]
            if item["error"] is None and self.given is not None and image_id not in self.given:
                item["error"] = "no boxes for this image in boxes.parquet"
            if item["error"] is not None:
                self.report.bad.append((image_id, path, c.split, "skipped", item["error"]))
                items.append((where[row][1], image_id, None, None))
                continue
            if item["note"]:
                self.report.bad.append((image_id, path, c.split, "converted", item["note"]))
            good.append(item)
        if not good:
            return items
        boxes = None if self.given is None else [torch.from_numpy(self.given[int(self.ids[it["row"]])]) for it in good]
        results = self.model([it["image"] for it in good], [it["orig_hw"] for it in good], boxes,
                             regions="regions" in c.kinds, grid="grid" in c.kinds, stages=self.stages)
        with self.stages("to host"):
            results = [{k: v.cpu() for k, v in res.items()} for res in results]
        for it, res in zip(good, results):
            items.append((where[it["row"]][1], int(self.ids[it["row"]]), it["orig_hw"], res))
        return items
