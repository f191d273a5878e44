"""``itmkit import-precomp``: SCAN / VSE-infinity "precomp" features into itmkit shards.

A precomp folder holds, per split, ``{split}_ims.npy`` (float32 [N, 36, 2048] bottom-up features)
and ``{split}_caps.txt`` (5 lines per image, in image order). Split names: ``train``, ``dev``
(-> val), ``test`` and, for COCO, ``testall`` (the 5K test set, -> test; its first 1,000 images
are SCAN's ``test``, so ``test`` is then left out).

The ``.npy`` files are opened as memory maps and copied a block of images at a time, so COCO's
~60 GB train features never sit in RAM. Boxes and labels are not in precomp files: boxes are
stored as NaN, labels and scores as -1 / NaN, image sizes as 0 and image paths as "".
"""

from __future__ import annotations

import argparse
import codecs
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline import manifest, shards
from pipeline.config import (add_dataset_argument, add_quiet_argument, add_root_argument, positive_int,
                             resolve_root)
from pipeline.ingest import IngestError, Report, clean_caption
from pipeline.shards import Layout, Regions, RegionShardWriter

PRECOMP_VERSION = 1
SOURCE = "scan-precomp"   # the "source" of the config its files record
SCAN_SPLITS = {"train": "train", "dev": "val", "test": "test", "testall": "test"}
FP16_MAX = float(np.finfo(np.float16).max)


@dataclass
class PrecompConfig:
    images_per_shard: int = 5000
    block: int = 128            # images copied per read from the memory map
    min_captions: int = 5
    max_tokens: int = 200
    version: int = PRECOMP_VERSION


@dataclass
class Split:
    """One SCAN split as found on disk, with its captions checked."""

    scan_name: str
    split: str
    ims: Path
    caps: Path
    shape: tuple
    per_image: int = 0
    keep: list[int] = field(default_factory=list)           # npy rows of the images kept
    captions: dict[int, list[str]] = field(default_factory=dict)  # npy row -> clean captions

    def fingerprint(self) -> str:
        st = self.ims.stat()
        return shards.config_hash([self.ims.name, st.st_size, st.st_mtime_ns, list(self.shape),
                                   shards.sha256_file(self.caps)])


def find_splits(folder: Path, notes: list[str]) -> list[Split]:
    if not folder.is_dir():
        raise IngestError(f"{folder}: precomp folder not found")
    names = [n for n in SCAN_SPLITS if (folder / f"{n}_ims.npy").exists()]
    if "testall" in names and "test" in names:
        names.remove("test")
        notes.append("test_ims.npy left out: testall (the 5K test set) is the test split and "
                     "contains it as its first 1,000 images")
    if not names:
        raise IngestError(f"{folder}: no {{train,dev,test,testall}}_ims.npy files here")
    out = []
    for n in names:
        ims, caps = folder / f"{n}_ims.npy", folder / f"{n}_caps.txt"
        if not caps.exists():
            raise IngestError(f"{caps}: missing (every {n}_ims.npy needs its {n}_caps.txt)")
        try:
            arr = np.load(ims, mmap_mode="r")
        except (ValueError, OSError, EOFError) as e:
            raise IngestError(f"{ims}: cannot read as .npy (truncated or not an array?): {e}") from e
        if arr.ndim != 3 or arr.shape[0] == 0:
            raise IngestError(f"{ims}: expected features of shape [images, boxes, dim], got {arr.shape}")
        out.append(Split(n, SCAN_SPLITS[n], ims, caps, tuple(arr.shape)))
    order = {"train": 0, "val": 1, "test": 2}
    return sorted(out, key=lambda s: order[s.split])


def check_captions(s: Split, cfg: PrecompConfig, report: Report) -> None:
    """Read ``{split}_caps.txt`` line by line (bytes, so one bad line is one skipped caption)."""
    lines = s.caps.read_bytes().removeprefix(codecs.BOM_UTF8).split(b"\n")   # a spreadsheet's BOM
    if lines and lines[-1] == b"":
        lines.pop()
    n = s.shape[0]
    if len(lines) % n:
        raise IngestError(f"{s.caps}: {len(lines):,} lines is not a whole number of captions per image "
                          f"for the {n:,} images of {s.ims.name}")
    s.per_image = len(lines) // n
    for row in range(n):
        good = []
        for j in range(s.per_image):
            line_no = row * s.per_image + j
            raw = lines[line_no].rstrip(b"\r")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("utf-8", errors="surrogateescape")
            clean, category, msg = clean_caption(text, cfg.max_tokens)
            if clean is None:
                report.add(category, f"{s.caps.name} line {line_no + 1}", msg)
            else:
                good.append(clean)
        if len(good) < cfg.min_captions:
            report.add("too few captions", f"{s.ims.name} row {row}",
                       f"image has {len(good)} valid caption(s), min_captions is {cfg.min_captions}")
            continue
        s.keep.append(row)
        s.captions[row] = good


def write_shard(path: Path, s: Split, rows: list[int], ids: dict[int, int], cfg: PrecompConfig,
                attrs: dict, progress) -> int:
    """Copy the features of ``rows`` (ascending npy rows) into one region shard; returns the
    number of values clipped to the float16 range."""
    k, dim = s.shape[1], s.shape[2]
    clipped = 0
    with RegionShardWriter(path, boxes_per_chunk=k, feature_dim=dim, attrs=attrs) as w:
        for a in range(0, len(rows), cfg.block):
            want = rows[a:a + cfg.block]
            # a fresh map per block, dropped after the copy: pages already copied leave the
            # process instead of piling up as resident memory over a 60 GB file
            ims = np.load(s.ims, mmap_mode="r")
            block = np.array(ims[want[0]:want[-1] + 1], dtype=np.float32)
            del ims
            if len(block) != len(want):  # images left out for their captions
                block = block[np.asarray(want) - want[0]]
            bad = ~np.isfinite(block).all(axis=(1, 2))
            if bad.any():
                raise IngestError(f"{s.ims}: row {want[int(np.argmax(bad))]} holds NaN or infinite features")
            over = int((np.abs(block) > FP16_MAX).sum())
            if over:
                clipped += over
                np.clip(block, -FP16_MAX, FP16_MAX, out=block)
            block = block.astype(np.float16)
            for i, row in enumerate(want):
                w.append(Regions(ids[row], (0, 0), block[i]))
            progress.update(len(want))
    return clipped


@dataclass
class Result:
    dataset_dir: Path
    split_counts: dict
    captions: int
    written: list = field(default_factory=list)
    reused: list = field(default_factory=list)
    removed: list = field(default_factory=list)
    clipped: int = 0
    notes: list = field(default_factory=list)
    report: Report | None = None


def imported(layout: Layout) -> bool:
    """Whether the dataset's images.parquet was written by ``import-precomp``: it has features
    but no images (so no grid features, and nothing to extract from)."""
    if not layout.images.exists():
        return False
    return shards.table_metadata(layout.images).get("config", {}).get("source") == SOURCE


def import_precomp(folder, name: str, root, cfg: PrecompConfig = PrecompConfig(), *,
                   strict: bool = False, force: bool = False, progress: bool = True) -> Result:
    folder = Path(folder)
    if cfg.images_per_shard < 1 or cfg.block < 1:
        raise ValueError("--images-per-shard and the block size must be at least 1")
    notes: list[str] = []
    report = Report(strict=strict)
    splits = find_splits(folder, notes)
    for s in splits:
        check_captions(s, cfg, report)

    # image ids: consecutive over the kept images, train then val then test
    ids, next_id = {}, 0
    for s in splits:
        ids[s.split] = {row: next_id + i for i, row in enumerate(s.keep)}
        next_id += len(s.keep)
    if next_id == 0:
        raise IngestError(f"{folder}: no image has {cfg.min_captions} valid captions; nothing written")

    layout = Layout(Path(root), name)
    index = layout.index
    chash = shards.config_hash({"source": SOURCE, "dir": str(folder.resolve()), **asdict(cfg)})
    result = Result(layout.dir, {s: 0 for s in ("train", "val", "test")}, 0, notes=notes, report=report)
    attrs = {"config": {"source": SOURCE, **asdict(cfg)}, "config_hash": chash,
             "boxes": "unknown (NaN): imported from precomp features"}
    total = sum(len(s.keep) for s in splits)
    current = set()
    with tqdm(total=total, desc="import-precomp", unit="img", disable=not progress, mininterval=2) as bar:
        for s in splits:
            ihash = s.fingerprint()
            for k, start in enumerate(range(0, len(s.keep), cfg.images_per_shard)):
                rows = s.keep[start:start + cfg.images_per_shard]
                path = layout.regions(s.split, k)
                current.add(path.relative_to(layout.dir).as_posix())
                if not force and index.is_valid("regions", path, chash, ihash):
                    result.reused.append(path)
                    bar.update(len(rows))
                    continue
                result.clipped += write_shard(path, s, rows, ids[s.split], cfg,
                                              dict(attrs, source_file=str(s.ims.resolve())), bar)
                index.register("regions", path, rows=len(rows), config_hash=chash, inputs_hash=ihash)
                result.written.append(path)
            result.split_counts[s.split] += len(s.keep)

    # shards of an earlier import (or extraction) under names this one did not write are stale
    result.removed += index.prune("regions", current).removed

    images, caps = [], []
    for s in splits:
        for row in s.keep:
            image_id = ids[s.split][row]
            images.append({"image_id": image_id, "path": "", "split": s.split, "width": 0, "height": 0})
            for text in s.captions[row]:
                caps.append({"caption_id": len(caps), "image_id": image_id, "split": s.split, "text": text})
    ihash = shards.config_hash([s.fingerprint() for s in splits])
    # precomp folders come without a manifest: SCAN's are of COCO or Flickr30K, told by the name
    meta = {"config": attrs["config"], "config_hash": chash, "source_dir": str(folder.resolve()),
            "splits": {s.scan_name: s.split for s in splits},
            "dataset": manifest.dataset_record(manifest.family_from_name(name), [])}
    for kind, path, table in (("images", layout.images, images), ("captions", layout.captions, caps)):
        if force or not index.is_valid(kind, path, chash, ihash):
            shards.write_table(path, table, kind, metadata=meta)
            index.register(kind, path, rows=len(table), config_hash=chash, inputs_hash=ihash)
    result.captions = len(caps)
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", required=True, help="precomp folder with {split}_ims.npy and {split}_caps.txt")
    add_dataset_argument(p, "--name", help="dataset name (folder under the data root), e.g. f30k")
    add_root_argument(p)
    d = PrecompConfig()
    p.add_argument("--images-per-shard", type=positive_int, default=d.images_per_shard,
                   help="images per region shard")
    p.add_argument("--min-captions", type=int, default=d.min_captions,
                   help="images with fewer valid captions are left out")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens,
                   help="captions with more tokens are left out")
    p.add_argument("--strict", action="store_true", help="fail on the first bad caption instead of skipping it")
    p.add_argument("--force", action="store_true", help="rewrite shards even if shards.json says they are current")
    add_quiet_argument(p)


def command(args) -> int:
    cfg = PrecompConfig(images_per_shard=args.images_per_shard, min_captions=args.min_captions,
                        max_tokens=args.max_tokens)
    try:
        r = import_precomp(args.dir, args.name, resolve_root(args.root), cfg, strict=args.strict,
                           force=args.force, progress=not args.quiet)
    except (IngestError, ValueError, shards.ShardError) as e:
        print(f"import-precomp: error: {e}", file=sys.stderr)
        return 1
    for note in r.notes:
        print(f"import-precomp: note: {note}", file=sys.stderr)
    msgs = [m for _, m in r.report.problems]
    for m in msgs[:20]:
        print(f"import-precomp: skipped {m}", file=sys.stderr)
    if len(msgs) > 20:
        print(f"import-precomp: ... and {len(msgs) - 20} more", file=sys.stderr)
    sc = r.split_counts
    line = (f"import-precomp: {args.name}: {len(r.written)} region shard(s) written, {len(r.reused)} reused "
            f"(already current); {sc['train']:,} train / {sc['val']:,} val / {sc['test']:,} test images, "
            f"{r.captions:,} captions in {r.dataset_dir}; boxes unknown (NaN)")
    if r.report.problems:
        line += "; skipped " + ", ".join(f"{n} {c}" for c, n in sorted(r.report.counts().items()))
    if r.clipped:
        line += f"; {r.clipped:,} feature values clipped to the float16 range"
    if r.removed:
        line += f"; removed {len(r.removed)} stale shard(s)"
    print(line)
    return 0
