"""``itmkit vocab``: the word, predicate and attribute vocabularies of a dataset.

Built from the graph tokens of the train split only (the split of each caption comes from
captions.parquet); words are lowercased parser tokens; ``<pad>`` = 0, ``<start>``, ``<end>``,
``<unk>`` first. Prints the out-of-vocabulary rate of every split, with a warning for a split
other than train where it exceeds OOV_WARNING (10 %). With ``--vectors`` it also writes initial
word vectors from a local GloVe-format text file.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline import shards
from pipeline.config import (add_dataset_argument, add_quiet_argument, add_root_argument, positive_int,
                             resolve_root, step)
from pipeline.shards.tables import graph_row_problem

VOCAB_VERSION = "1"
TRAIN_SPLIT = "train"
# an out-of-vocabulary rate above this on another split is warned about: one token in ten read as
# <unk> means a train split too small for the min count, or captions unlike train's
OOV_WARNING = 0.10


@dataclass
class VocabConfig:
    # the one default of the CLI and the workflow; the threshold of SCAN and VSE++ (count >= 4)
    min_count: int = 4


@dataclass
class Counts:
    words: Counter
    predicates: Counter
    attributes: Counter
    split_tokens: dict  # split -> Counter of lowercased tokens (for coverage)


def graph_files(layout: shards.Layout) -> tuple[list[Path], str]:
    """The registered graph chunks, all of one parser config, and that config's hash."""
    entries = layout.index.entries("graphs")
    if not entries:
        raise shards.ShardError(f"{layout.index.path}: no graph chunks registered; run "
                                f"{step('parse', layout.root, layout.name)} first")
    hashes = sorted({e.config_hash for e in entries})
    if len(hashes) > 1:
        raise shards.ShardError(f"{layout.index.path}: graph chunks of {len(hashes)} parser configs "
                                f"{hashes}; rerun {step('parse', layout.root, layout.name)} to replace the old ones")
    return layout.index.files("graphs", hashes[0]), hashes[0]


def count(layout: shards.Layout, files: list[Path], progress: bool = True) -> Counts:
    captions = shards.read_table(layout.captions, columns=["caption_id", "split"])
    split_of = dict(zip(captions["caption_id"].to_pylist(), captions["split"].to_pylist()))
    words, predicates, attributes = Counter(), Counter(), Counter()
    split_tokens: dict[str, Counter] = {}
    seen = 0
    for path in tqdm(files, desc="vocab", unit="chunk", disable=not progress, file=sys.stderr):
        table = shards.read_table(path, "graphs")
        rows = table.select(["caption_id", "tokens", "objects", "attributes", "relations"]).to_pylist()
        for k, row in enumerate(rows):
            if problem := graph_row_problem(row):
                raise shards.ShardError(f"{path}: row {k} (caption_id {row['caption_id']}): {problem}")
            split = split_of.get(row["caption_id"])
            if split is None:
                raise shards.ShardError(f"{path}: caption_id {row['caption_id']} is not in {layout.captions} "
                                        f"(graphs of older captions? rerun {step('parse', layout.root, layout.name)})")
            tokens = [t.lower() for t in row["tokens"]]
            split_tokens.setdefault(split, Counter()).update(tokens)
            if split == TRAIN_SPLIT:
                words.update(tokens)
                predicates.update(r["predicate"] for r in row["relations"])
                attributes.update(a["attribute"] for a in row["attributes"])
            seen += 1
    if seen != len(split_of):
        raise shards.ShardError(f"{layout.dir}: graph chunks hold {seen:,} captions but {layout.captions} "
                                f"has {len(split_of):,}; finish {step('parse', layout.root, layout.name)}")
    return Counts(words, predicates, attributes, split_tokens)


def _ranked(counter: Counter, min_count: int, exclude=()) -> list[list]:
    """[name, count] with count >= min_count, most frequent first, ties alphabetical."""
    items = [(w, c) for w, c in counter.items() if c >= min_count and w not in exclude]
    return [[w, c] for w, c in sorted(items, key=lambda wc: (-wc[1], wc[0]))]


def build_vocab(counts: Counts, cfg: VocabConfig) -> dict:
    words = [[s, 0] for s in shards.VOCAB_SPECIALS] + _ranked(counts.words, cfg.min_count, shards.VOCAB_SPECIALS)
    known = {w for w, _ in words}
    coverage = {}
    for split, tokens in sorted(counts.split_tokens.items()):
        total = sum(tokens.values())
        oov = sum(c for t, c in tokens.items() if t not in known)
        coverage[split] = {"tokens": total, "oov": oov, "oov_rate": oov / total if total else 0.0}
    return {"words": words, "min_count": cfg.min_count,
            "predicates": _ranked(counts.predicates, cfg.min_count),
            "attributes": _ranked(counts.attributes, cfg.min_count),
            "built_from": TRAIN_SPLIT, "coverage": coverage}


def oov_warnings(vocab: dict) -> list[str]:
    """One line per split other than train whose out-of-vocabulary rate exceeds OOV_WARNING."""
    return [f"{c['oov_rate']:.1%} of the {split} tokens ({c['oov']:,} of {c['tokens']:,}) are not in the "
            f"vocabulary and read as <unk>; train is too small for --min-count {vocab['min_count']}, or "
            f"{split} captions are unlike train's"
            for split, c in vocab["coverage"].items() if split != TRAIN_SPLIT and c["oov_rate"] > OOV_WARNING]


def read_glove(path: Path, wanted: dict[str, int], progress: bool = True) -> tuple[dict[int, np.ndarray], int]:
    """Vectors of the wanted words from a GloVe-format text file ("word v1 ... vD" per line;
    a word2vec "count dim" header line is skipped). Words may contain spaces: the last D
    fields are the vector. Returns ({vocab id: vector}, D)."""
    found, dim = {}, None
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(tqdm(f, desc="vectors", unit=" lines", disable=not progress,
                                           file=sys.stderr), 1):
            parts = line.rstrip("\n\r").rstrip(" ").split(" ")
            if lineno == 1 and len(parts) == 2 and all(p.isdigit() for p in parts):
                continue
            if dim is None:
                dim = len(parts) - 1
                if dim < 1:
                    raise ValueError(f"{path}:{lineno}: expected 'word v1 ... vD', got {line[:80]!r}")
            if len(parts) < dim + 1:
                raise ValueError(f"{path}:{lineno}: {len(parts) - 1} values, expected {dim}")
            word = " ".join(parts[:len(parts) - dim])
            i = wanted.get(word) if word in wanted else wanted.get(word.lower())
            if i is None or (i in found and word != word.lower()):
                continue  # keep the lowercase entry when a file has both "Dog" and "dog"
            try:
                found[i] = np.asarray(parts[-dim:], dtype=np.float32)
            except ValueError:
                raise ValueError(f"{path}:{lineno}: non-numeric vector values for {word!r}") from None
    if dim is None:
        raise ValueError(f"{path}: empty vectors file")
    return found, dim


def build_vectors(itos: list[str], found: dict[int, np.ndarray], dim: int, seed: int = 0) -> np.ndarray:
    """Rows in vocabulary order: GloVe vectors where found; ``<pad>`` zeros; every other word
    random normal with the standard deviation of the found vectors (0.1 when none is found)."""
    rng = np.random.default_rng(seed)
    std = float(np.std(np.stack(list(found.values())))) if found else 0.1
    out = rng.normal(0.0, std, size=(len(itos), dim)).astype(np.float32)
    for i, v in found.items():
        out[i] = v
    out[shards.Vocabulary.PAD] = 0.0
    return out


def _file_identity(path: Path) -> dict:
    st = path.stat()  # hashing a multi-GB GloVe file on every run costs minutes
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_dataset_argument(p)
    add_root_argument(p)
    p.add_argument("--min-count", type=positive_int, default=VocabConfig.min_count,
                   help="keep words, predicates and attributes seen at least this often in train")
    p.add_argument("--vectors", default=None,
                   help="GloVe-format text file; writes text/vocab.vectors.npy in vocabulary order")
    add_quiet_argument(p)


def command(args) -> int:
    layout = shards.Layout(resolve_root(args.root).absolute(), args.dataset)
    cfg = VocabConfig(min_count=args.min_count)
    index = layout.index
    try:
        files, graphs_hash = graph_files(layout)
        inputs = hashlib.sha256("".join(
            [e.sha256 for e in sorted(index.entries("graphs"), key=lambda e: e.path)]
            + [shards.sha256_file(layout.captions)]).encode()).hexdigest()[:16]
        chash = shards.config_hash({"vocab": VOCAB_VERSION, **asdict(cfg), "graphs": graphs_hash})
        written = []
        if index.is_valid("vocab", layout.vocab, chash, inputs):
            vocab = shards.read_vocab(layout.vocab)
            skipped = "vocabulary already current"
        else:
            vocab = build_vocab(count(layout, files, not args.quiet), cfg)
            vocab["config"] = {"vocab": VOCAB_VERSION, **asdict(cfg), "graphs": graphs_hash}
            shards.write_vocab(layout.vocab, vocab)
            index.register("vocab", layout.vocab, rows=len(vocab["words"]), config_hash=chash,
                           inputs_hash=inputs, extra={"predicates": len(vocab["predicates"]),
                                                      "attributes": len(vocab["attributes"])})
            written.append(layout.vocab.name)
            skipped = ""
            old = index.entry("vocab", layout.vocab_vectors)
            if old is not None and old.inputs_hash != index.entry("vocab", layout.vocab).sha256:
                index.unregister("vocab", [layout.vocab_vectors])  # rows no longer match the words
                layout.vocab_vectors.unlink(missing_ok=True)
        cov = ", ".join(f"{s} {c['oov_rate']:.2%}" for s, c in vocab["coverage"].items())
        if args.vectors:
            vec_path, glove = layout.vocab_vectors, Path(args.vectors)
            if not glove.exists():
                raise shards.ShardError(f"{glove}: vectors file not found")
            vhash = shards.config_hash({"vectors": _file_identity(glove), "vocab": chash})
            vinputs = index.entry("vocab", layout.vocab).sha256
            if index.is_valid("vocab", vec_path, vhash, vinputs):
                skipped += ("; " if skipped else "") + "vectors already current"
            else:
                itos = [w for w, _ in vocab["words"]]
                found, dim = read_glove(glove, {w: i for i, w in enumerate(itos)}, not args.quiet)
                shards.write_vectors(vec_path, build_vectors(itos, found, dim))
                index.register("vocab", vec_path, rows=len(itos), config_hash=vhash, inputs_hash=vinputs,
                               extra={"dim": dim, "found": len(found), "source": str(glove)})
                written.append(f"{vec_path.name} ({len(found):,}/{len(itos):,} words in "
                               f"{glove.name}, dim {dim})")
    except (shards.ShardError, ValueError, OSError) as e:
        print(f"vocab: {e}", file=sys.stderr)
        return 1
    for warning in oov_warnings(vocab):
        print(f"vocab: warning: {warning}", file=sys.stderr)
    print(f"vocab {args.dataset}: {'wrote ' + ', '.join(written) if written else 'wrote nothing'} in "
          f"{layout.vocab.parent}; {len(vocab['words']):,} words (min count {vocab['min_count']}), "
          f"{len(vocab['predicates']):,} predicates, {len(vocab['attributes']):,} attributes from "
          f"{TRAIN_SPLIT}; OOV rate {cov}" + (f"; skipped: {skipped}" if skipped else ""))
    return 0
