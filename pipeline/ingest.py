"""``itmkit ingest``: read a dataset manifest into images.parquet + captions.parquet.

One reader per source format (Karpathy split file, official COCO captions files, a folder of
images with a CSV/JSONL of captions, the generated demo) turns the annotations into a list of
``Source`` images; the checks that follow are the same for all of them: duplicate ids, image
paths that leave the image folder, one file under two ids, bad captions, images missing on disk
or refused by the bad-image policy (pipeline/images.py), too few captions, identical image files,
expected counts. Problems are collected, never raised mid-way: by default the offending rows are
skipped and counted in the summary, with ``--strict`` the first problem fails the run before
anything is written.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import posixpath
import re
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from pipeline import manifest as manifests
from pipeline import shards
from pipeline.config import (UsageError, add_dataset_argument, add_quiet_argument, add_root_argument,
                             add_set_argument, resolve_root)
from pipeline.images import BadImage, open_image
from pipeline.manifest import SPLITS, Manifest, ManifestError
from pipeline.shards import Layout

INGEST_VERSION = 2  # 2: image paths confined to the image folder, one id per file, bad-image policy
MAX_SHOWN = 20  # problems printed; all of them go to the report file


class IngestError(RuntimeError):
    """The input cannot be ingested (unreadable annotation file, or a problem under --strict)."""


@dataclass
class Caption:
    caption_id: int
    text: object   # as read; cleaned by the checks
    where: str     # file and row, for messages


@dataclass
class Source:
    """One image as the annotations describe it."""

    image_id: int
    path: Path
    split: str
    where: str
    captions: list[Caption] = field(default_factory=list)
    width: int = 0
    height: int = 0


@dataclass
class Report:
    """Problems found (the row is skipped) and notes (the row is kept), by category; each names
    the file and row."""

    problems: list[tuple[str, str]] = field(default_factory=list)
    notes: list[tuple[str, str]] = field(default_factory=list)
    strict: bool = False

    def add(self, category: str, where: str, what: str) -> None:
        msg = f"{where}: {what}"
        if self.strict:
            raise IngestError(f"{msg} (--strict: nothing written)")
        self.problems.append((category, msg))

    def note(self, category: str, where: str, what: str) -> None:
        self.notes.append((category, f"{where}: {what}"))

    def counts(self) -> Counter:
        return Counter(c for c, _ in self.problems)


# ---------------------------------------------------------------------------------------------
# reading annotation files

READERS = {}


def reader(fmt: str):
    def register(fn):
        READERS[fmt] = fn
        return fn
    return register


def decode_text(raw: bytes) -> str:
    """UTF-8 with any invalid bytes kept as surrogates, so that one bad caption is reported by
    row instead of failing the whole file; a leading byte-order mark (what spreadsheet programs
    write) is dropped."""
    return raw.decode("utf-8-sig", errors="surrogateescape")


def read_json_annotations(path: Path):
    if not path.exists():
        raise IngestError(f"{path}: annotation file not found")
    try:
        return json.loads(decode_text(path.read_bytes()))
    except json.JSONDecodeError as e:
        raise IngestError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}") from e


def image_number(name: str) -> int | None:
    digits = re.findall(r"\d+", Path(name).stem)
    return int(digits[-1]) if digits else None


@reader("karpathy")
def read_karpathy(m: Manifest, report: Report) -> list[Source]:
    ann = m.annotation_files()[0]
    data = read_json_annotations(ann["file"])
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise IngestError(f"{ann['file']}: not a Karpathy split file (no 'images' list)")
    out = []
    for i, entry in enumerate(data["images"]):
        where = f"{ann['file'].name} images[{i}]"
        if not isinstance(entry, dict):
            report.add("malformed entry", where, "not a JSON object")
            continue
        where += f" ({entry.get('filename', '?')})"
        split = m["splits"].get(entry.get("split"))
        if split is None:
            if entry.get("split") not in m["splits"]:
                report.add("unknown split", where, f"split {entry.get('split')!r} is not in the "
                           f"manifest's splits {sorted(m['splits'])}")
            continue
        try:
            path = ann["images"] / m["path_template"].format(**entry)
        except (KeyError, IndexError) as e:
            report.add("malformed entry", where, f"path_template {m['path_template']!r} needs field {e}")
            continue
        key = m["image_id"]
        image_id = image_number(str(entry.get("filename", ""))) if key == "filename" else entry.get(key)
        if not isinstance(image_id, int) or isinstance(image_id, bool):
            report.add("malformed entry", where, f"no integer image id in field '{key}'")
            continue
        sentences = entry.get("sentences")
        if not isinstance(sentences, list):
            report.add("malformed entry", where, "no 'sentences' list")
            continue
        src = Source(image_id, path, split, where)
        for j, s in enumerate(sentences):
            swhere = f"{ann['file'].name} images[{i}].sentences[{j}]"
            if not isinstance(s, dict) or not isinstance(s.get("sentid"), int):
                report.add("malformed entry", swhere, "sentence without an integer 'sentid'")
                continue
            text = s.get("raw")
            if text is None and isinstance(s.get("tokens"), list):
                text = " ".join(map(str, s["tokens"]))
            src.captions.append(Caption(s["sentid"], text, swhere + f" (sentid {s['sentid']})"))
        out.append(src)
    return out


@reader("coco")
def read_coco(m: Manifest, report: Report) -> list[Source]:
    """Official ``captions_*.json``: an ``images`` list and an ``annotations`` list per file."""
    out = []
    for ann in m.annotation_files():
        data = read_json_annotations(ann["file"])
        name = ann["file"].name
        if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
                or not isinstance(data.get("annotations"), list):
            raise IngestError(f"{ann['file']}: not a COCO captions file (needs 'images' and 'annotations' lists)")
        split = m["splits"].get(ann["split"], ann["split"]) if m.get("splits") else ann["split"]
        if split not in SPLITS:
            raise IngestError(f"{m.file}: annotation file {name} has split {ann['split']!r}; "
                              f"must map to one of {SPLITS}")
        by_id = {}
        for i, img in enumerate(data["images"]):
            where = f"{name} images[{i}]"
            if not isinstance(img, dict) or not isinstance(img.get("id"), int) or "file_name" not in img:
                report.add("malformed entry", where, "image without an integer 'id' and a 'file_name'")
                continue
            src = Source(img["id"], ann["images"] / img["file_name"], split, f"{where} ({img['file_name']})",
                         width=int(img.get("width") or 0), height=int(img.get("height") or 0))
            if img["id"] not in by_id:  # a repeated id is reported by the common checks
                by_id[img["id"]] = src
            out.append(src)
        for i, a in enumerate(data["annotations"]):
            where = f"{name} annotations[{i}]"
            if not isinstance(a, dict) or not isinstance(a.get("id"), int):
                report.add("malformed entry", where, "annotation without an integer 'id'")
                continue
            src = by_id.get(a.get("image_id"))
            if src is None:
                report.add("missing image", where, f"annotation {a['id']} refers to image_id "
                           f"{a.get('image_id')!r}, which is not in the file's images")
                continue
            src.captions.append(Caption(a["id"], a.get("caption"), f"{where} (id {a['id']})"))
    return out


def read_rows(path: Path, columns: dict) -> list[tuple[int, dict | None, str]]:
    """(line number, row or None, error) of a CSV/TSV or JSONL file, decoding line by line so
    that bytes that are not UTF-8 spoil only their own row."""
    if not path.exists():
        raise IngestError(f"{path}: captions file not found")
    text = decode_text(path.read_bytes())
    rows = []
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                rows.append((n, None, f"not a JSON object: {e.msg}"))
                continue
            rows.append((n, row, "") if isinstance(row, dict) else (n, None, "not a JSON object"))
        return rows
    dialect = "excel-tab" if path.suffix.lower() == ".tsv" else "excel"
    r = csv.reader(io.StringIO(text, newline=""), dialect=dialect)
    header = next(r, None)
    need = [columns["file"], columns["caption"]]
    if header is None or any(c not in header for c in need):
        raise IngestError(f"{path}: header must name the columns {need}, found {header}")
    # a row holds at least the columns up to file and caption, at most the header's
    least, most = max(header.index(c) for c in need) + 1, len(header)
    counts = f"{least}–{most}" if least < most else f"{most}"
    for fields in r:
        if not fields:   # a blank line
            continue
        if least <= len(fields) <= most:
            rows.append((r.line_num, dict(zip(header, fields)), ""))
        else:
            rows.append((r.line_num, None, f"row has {len(fields)} field{'s' * (len(fields) != 1)}, "
                                           f"needs {counts}"))
    return rows


def stable_id(key: str) -> int:
    """A 60-bit id from the image's path relative to the image folder: the same file gets the
    same id in every run, whatever else is added to the folder."""
    return int(hashlib.sha1(key.encode("utf-8", "surrogateescape")).hexdigest()[:15], 16)


def hashed_split(key: str, fractions: dict) -> str:
    u = int(hashlib.sha1(("split:" + key).encode("utf-8", "surrogateescape")).hexdigest()[:8], 16) / 2**32
    acc = 0.0
    for split in SPLITS:
        acc += fractions[split]
        if u < acc:
            return split
    return SPLITS[-1]


@reader("folder")
def read_folder(m: Manifest, report: Report) -> list[Source]:
    """A folder of images and a CSV/TSV/JSONL with one (file, caption[, split]) per row."""
    ann = m.annotation_files()[0]
    cols = {"file": "file", "caption": "caption", "split": "split", **m["columns"]}
    mapping = m.get("splits") or {}
    by_key: dict[str, Source] = {}
    for n, row, error in read_rows(ann["file"], cols):
        where = f"{ann['file'].name} line {n}"
        if row is None:
            report.add("malformed entry", where, error)
            continue
        file = row.get(cols["file"])
        if not isinstance(file, str) or not file.strip():
            report.add("malformed entry", where, f"no image file in column '{cols['file']}'")
            continue
        key = posixpath.normpath(Path(file.strip()).as_posix())  # a/../b.png and b.png: one image
        try:
            key.encode("utf-8")
        except UnicodeEncodeError:
            report.add("malformed entry", where, "image file name is not valid UTF-8")
            continue
        given = row.get(cols["split"])
        if given not in (None, ""):
            split = mapping.get(given, given)
            if split not in SPLITS:
                report.add("unknown split", where, f"split {given!r} is not one of {SPLITS}")
                continue
        else:
            split = hashed_split(key, m["split_fractions"])
        src = by_key.get(key)
        if src is None:
            src = by_key[key] = Source(stable_id(key), ann["images"] / key, split, f"{where} ({key})")
        elif split != src.split:   # one file in two splits would leak test images into training
            report.add("split conflict", where, f"{file.strip()!r} is the image of {src.where}, "
                       f"which is in {src.split}, not {split}")
            continue
        src.captions.append(Caption(n, row.get(cols["caption"]), where))
    return list(by_key.values())


# ---------------------------------------------------------------------------------------------
# checks shared by every format

def clean_caption(text, max_tokens: int) -> tuple[str | None, str, str]:
    """(clean text, problem category, message); text is None when the caption is rejected."""
    if not isinstance(text, str):
        return None, "malformed caption", f"caption is {type(text).__name__}, not text"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return None, "not UTF-8", "caption is not valid UTF-8"
    tokens = text.split()
    if not tokens:
        return None, "empty caption", "caption is empty or whitespace-only"
    if len(tokens) > max_tokens:
        return None, "too long", f"caption has {len(tokens):,} tokens (max_tokens {max_tokens})"
    return " ".join(tokens), "", ""


def outside_message(path: Path, roots: list[Path]) -> str:
    where = f"the image folder {roots[0]}" + (" and allowed_image_dirs" if len(roots) > 1 else "")
    return (f"image path resolves to {path}, outside {where} (to allow it, add its folder to the "
            f"manifest's allowed_image_dirs)")


def resolved(path: Path, folders: dict) -> Path:
    """``path.resolve()`` (symbolic links followed, .. removed), resolving each folder once, so that
    per image only the file itself is looked at (Path.resolve looks at every folder of the path)."""
    if path.name == "..":
        return path.resolve()
    folder = folders.get(path.parent)
    if folder is None:
        folder = folders[path.parent] = path.parent.resolve()
    path = folder / path.name
    return path.resolve() if path.is_symlink() else path


def check(sources: list[Source], m: Manifest, report: Report, *, with_images: bool,
          progress: bool) -> list[Source]:
    roots = [d.resolve() for d in m.image_dirs()]
    kept, seen_images, seen_captions, seen_files, folders = [], {}, {}, {}, {}
    for src in sources:
        if src.image_id in seen_images:
            report.add("duplicate id", src.where,
                       f"image id {src.image_id} already used by {seen_images[src.image_id]}")
            continue
        path = resolved(src.path, folders)
        if not any(path.is_relative_to(root) for root in roots):
            report.add("outside image folder", src.where, outside_message(path, roots))
            continue
        if path in seen_files:
            first = seen_files[path]
            report.add("duplicate file", src.where, f"image file {path} is already image {first.image_id} "
                       f"({first.where})")
            continue
        seen_images[src.image_id], seen_files[path], src.path = src.where, src, path
        good = []
        for c in sorted(src.captions, key=lambda c: c.caption_id):
            if c.caption_id in seen_captions:
                report.add("duplicate id", c.where, f"caption id {c.caption_id} already used by "
                           f"{seen_captions[c.caption_id]}")
                continue
            seen_captions[c.caption_id] = c.where
            text, category, msg = clean_caption(c.text, m["max_tokens"])
            if text is None:
                report.add(category, c.where, msg)
                continue
            good.append(Caption(c.caption_id, text, c.where))
        src.captions = good
        kept.append(src)

    out = []
    for src in tqdm(kept, desc="checking images", unit="img", disable=not progress or not with_images,
                    mininterval=2):
        if with_images:
            if not src.path.is_file():
                report.add("missing image", src.where, f"image file {src.path} not found")
                continue
            try:  # the header is read even when the annotations give the size: a bomb is refused here
                with open_image(src.path, m["max_pixels"]) as im:
                    size = im.size
            except BadImage as e:
                report.add("bad image", src.where, f"image file {src.path} refused: {e}")
                continue
            if not (src.width and src.height):
                src.width, src.height = size
        if len(src.captions) < m["min_captions"]:
            report.add("too few captions", src.where, f"image {src.image_id} has {len(src.captions)} "
                       f"valid caption(s), min_captions is {m['min_captions']}")
            continue
        out.append(src)
    order = {s: i for i, s in enumerate(SPLITS)}
    out.sort(key=lambda s: order[s.split])  # stable: source order within a split
    return check_content(out, m, report) if with_images else out


def identical_files(paths: list[Path]) -> list[list[int]]:
    """Groups of positions in ``paths`` whose files have the same bytes (2 or more each, in order).
    Groups are refined by byte size, then the first 4 KiB, then the sha256 of the whole file, so
    that only files equal so far are read further: in practice only true copies are read whole."""
    def head(p: Path) -> bytes:
        with open(p, "rb") as f:
            return f.read(4096)

    groups = [list(range(len(paths)))]
    for key in (lambda p: p.stat().st_size, head, shards.sha256_file):
        refined = []
        for group in groups:
            by_key = defaultdict(list)
            for i in group:
                by_key[key(paths[i])].append(i)
            refined += [g for g in by_key.values() if len(g) > 1]
        groups = refined
    return groups


def check_content(sources: list[Source], m: Manifest, report: Report) -> list[Source]:
    """Images with the bytes of an image before them (train, val, test order): a leak between
    splits when the splits differ. Reported and kept, or, with ``content_duplicates: skip``,
    skipped like a bad row."""
    skipped = set()
    for group in identical_files([s.path for s in sources]):
        first = sources[group[0]]
        for i in group[1:]:
            src = sources[i]
            category = "duplicate content" + (" across splits" if src.split != first.split else "")
            what = f"same content as {first.where} (image {first.image_id}, {first.split})"
            if m["content_duplicates"] == "skip":
                report.add(category, src.where, what)
                skipped.add(i)
            else:
                report.note(category, src.where, what)
    return [s for i, s in enumerate(sources) if i not in skipped]


def count_mismatches(m: Manifest, split_counts: dict) -> list[str]:
    exp = m.get("expected") or {}
    out = []
    if "images" in exp and sum(split_counts.values()) != exp["images"]:
        out.append(f"images {sum(split_counts.values()):,} != expected {exp['images']:,}")
    for split, n in (exp.get("splits") or {}).items():
        if split_counts.get(split, 0) != n:
            out.append(f"{split} {split_counts.get(split, 0):,} != expected {n:,}")
    folds = m.get("folds")
    if exp and folds and split_counts.get("test", 0) != folds["size"] * folds["count"]:
        out.append(f"test {split_counts.get('test', 0):,} is not {folds['count']} folds of {folds['size']:,}")
    return out


# ---------------------------------------------------------------------------------------------
# the command

@dataclass
class Result:
    dataset_dir: Path
    skipped: bool = False
    images: int = 0
    captions: int = 0
    split_counts: dict = field(default_factory=dict)
    problems: Counter = field(default_factory=Counter)   # skipped rows by category
    notes: Counter = field(default_factory=Counter)      # reported, kept rows by category
    mismatches: list = field(default_factory=list)
    report_file: Path | None = None
    messages: list = field(default_factory=list)         # one per problem
    note_messages: list = field(default_factory=list)    # one per note


def inputs_hash(m: Manifest) -> str:
    files = [a["file"] for a in m.annotation_files()]
    for f in files:
        if not f.exists():
            raise IngestError(f"{f}: annotation file not found (set it with --annotations or --source-root)")
    return shards.config_hash([shards.sha256_file(f) for f in files])


def formats() -> list[str]:
    """The annotation formats a manifest may name: the registered readers and the demo."""
    return sorted([*READERS, "demo"])


def ingest(m: Manifest, root, *, strict: bool = False, with_images: bool = True,
           force: bool = False, progress: bool = True) -> Result:
    if m.format not in formats():
        raise ManifestError(f"{m.file}: field 'format': no reader of format '{m.format}' is registered "
                            f"(pipeline/ingest.py); known: {', '.join(formats())}")
    layout = Layout(Path(root), m.name)
    if m.format == "demo":
        return ingest_demo(m, layout, strict=strict, force=force, progress=progress)
    chash = shards.config_hash({"manifest": m.resolved(), "with_images": with_images,
                                "version": INGEST_VERSION})
    ihash = inputs_hash(m)
    index = layout.index
    if not force and index.is_valid("images", layout.images, chash, ihash) \
            and index.is_valid("captions", layout.captions, chash, ihash):
        meta = shards.table_metadata(layout.images).get("summary", {})
        return Result(layout.dir, skipped=True, images=index.entry("images", layout.images).rows,
                      captions=index.entry("captions", layout.captions).rows,
                      split_counts=meta.get("splits", {}), mismatches=meta.get("mismatches", []))

    report = Report(strict=strict)
    if with_images and not m.images_dir.is_dir():
        raise IngestError(f"{m.images_dir}: image folder not found (set it with --images-dir or "
                          f"--source-root, or use --without-images for a text-only ingest)")
    sources = check(READERS[m.format](m, report), m, report, with_images=with_images, progress=progress)
    split_counts = {s: sum(src.split == s for src in sources) for s in SPLITS}
    mismatches = count_mismatches(m, split_counts)
    if strict and mismatches:
        raise IngestError(f"{m.file}: counts differ from the manifest's expected counts: "
                          f"{'; '.join(mismatches)} (--strict: nothing written)")
    if not sources:
        raise IngestError(f"{m.file}: no image survived the checks; nothing written "
                          f"({', '.join(f'{n} {c}' for c, n in report.counts().items()) or 'no entries'})")

    images = [{"image_id": s.image_id, "path": str(s.path), "split": s.split,
               "width": s.width, "height": s.height} for s in sources]
    caps = [{"caption_id": c.caption_id, "image_id": s.image_id, "split": s.split, "text": c.text}
            for s in sources for c in s.captions]
    notes = Counter(c for c, _ in report.notes)
    summary = {"splits": split_counts, "problems": dict(report.counts()), "notes": dict(notes),
               "mismatches": mismatches, "with_images": with_images}
    meta = {"manifest": m.resolved(), "config_hash": chash, "summary": summary,
            "dataset": manifests.manifest_record(m)}
    report_file = layout.dir / "ingest-report.txt"
    if report.problems or report.notes:
        with shards.atomic_path(report_file) as tmp:
            tmp.write_text("".join(f"[{c}] {msg}\n" for c, msg in report.problems + report.notes),
                           encoding="utf-8", errors="backslashreplace")
    else:  # an old report would describe another run
        report_file.unlink(missing_ok=True)
        report_file = None
    shards.write_table(layout.images, images, "images", metadata=meta)
    shards.write_table(layout.captions, caps, "captions", metadata=meta)
    index.register("images", layout.images, rows=len(images), config_hash=chash, inputs_hash=ihash)
    index.register("captions", layout.captions, rows=len(caps), config_hash=chash, inputs_hash=ihash)
    return Result(layout.dir, images=len(images), captions=len(caps), split_counts=split_counts,
                  problems=report.counts(), notes=notes, mismatches=mismatches, report_file=report_file,
                  messages=[msg for _, msg in report.problems], note_messages=[msg for _, msg in report.notes])


def ingest_demo(m: Manifest, layout: Layout, *, strict: bool, force: bool, progress: bool) -> Result:
    from pipeline import demo

    if m.name != demo.NAME:
        raise IngestError(f"{m.file}: the demo dataset is always named '{demo.NAME}', not {m.name!r}")
    cfg = demo.DemoConfig(**m["demo"])
    s = demo.generate(layout.root, cfg, force=force, progress=progress, record=manifests.manifest_record(m))
    split_counts = cfg.splits()
    mismatches = count_mismatches(m, split_counts)
    if strict and mismatches:
        raise IngestError(f"{m.file}: counts differ from the manifest's expected counts: {'; '.join(mismatches)}")
    return Result(layout.dir, skipped=s["skipped"], images=cfg.images, captions=5 * cfg.images,
                  split_counts=split_counts, mismatches=mismatches)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", required=True,
                   help="manifest file (manifests/coco.yaml) or the name of one in manifests/ (coco)")
    add_root_argument(p)
    p.add_argument("--source-root", help="folder the manifest's relative image/annotation paths start from")
    p.add_argument("--images-dir", help="image folder (overrides the manifest's 'images')")
    p.add_argument("--annotations", help="annotation file (overrides the manifest's 'annotations')")
    add_dataset_argument(p, "--name", required=False,
                         help="dataset name, i.e. folder under the data root (overrides 'name')")
    add_set_argument(p, "any manifest field, dotted keys for nested ones (e.g. --set expected=null "
                        "--set expected.splits.test=1000)")
    p.add_argument("--strict", action="store_true",
                   help="fail on the first bad row or count mismatch instead of skipping it")
    p.add_argument("--without-images", action="store_true",
                   help="text-only: do not look at image files (width/height 0, no missing-image check)")
    p.add_argument("--force", action="store_true", help="ingest again even if shards.json says it is current")
    add_quiet_argument(p)


def command(args) -> int:
    try:
        m = manifests.load(args.manifest, source_root=args.source_root, images_dir=args.images_dir,
                           annotations=args.annotations, name=args.name, sets=args.set)
        r = ingest(m, resolve_root(args.root), strict=args.strict, with_images=not args.without_images,
                   force=args.force, progress=not args.quiet)
    except UsageError:
        raise   # exit 2 (itmkit.cli)
    except (ManifestError, IngestError, ValueError, shards.ShardError) as e:
        print(f"ingest: error: {e}", file=sys.stderr)
        return 1
    shown = [f"skipped {msg}" for msg in r.messages] + [f"kept {msg}" for msg in r.note_messages]
    for msg in shown[:MAX_SHOWN]:
        print(f"ingest: {msg}", file=sys.stderr)
    if len(shown) > MAX_SHOWN:
        print(f"ingest: ... and {len(shown) - MAX_SHOWN} more", file=sys.stderr)
    splits = " / ".join(f"{r.split_counts.get(s, 0):,} {s}" for s in SPLITS)
    if r.skipped:
        line = f"ingest: {m.name}: up to date in {r.dataset_dir} ({r.images:,} images, {r.captions:,} captions); nothing written"
    else:
        line = f"ingest: {m.name}: wrote {r.images:,} images ({splits}) and {r.captions:,} captions to {r.dataset_dir}"
    found = [f"{verb} " + ", ".join(f"{n} {c}" for c, n in sorted(counts.items()))
             for verb, counts in (("skipped", r.problems), ("kept", r.notes)) if counts]
    if found:
        line += "; " + "; ".join(found) + f" (listed in {r.report_file})"
    if args.without_images and m.format != "demo":
        line += "; images not checked (--without-images)"
    line += ("; counts differ from the manifest: " + "; ".join(r.mismatches)) if r.mismatches \
        else ("; counts match the manifest" if m.get("expected") else "")
    print(line)
    return 0
