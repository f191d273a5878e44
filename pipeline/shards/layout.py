"""Where every file of a dataset lives. ``Layout`` is the only code that builds or parses the
name of a shard: the writers, the workflow, the trainer and ``prune`` all ask it. Its ``index``
(``shards.json``) asks it too: this module imports the index, never the other way."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from pipeline.shards.index import ShardIndex
from pipeline.shards.tables import read_table

# kind -> name of its chunk files under the dataset folder; {split} and {chunk} are filled in
# by Layout.shard (chunk as at least four digits) and left as Snakemake wildcards by pattern()
SHARD_FILES = {
    "regions": "regions/regions-{split}-{chunk}.h5",
    "grid": "grid/grid-{split}-{chunk}.h5",
    "graphs": "text/graphs/graphs-{chunk}.parquet",
}
SPLIT_KINDS = tuple(k for k, name in SHARD_FILES.items() if "{split}" in name)


def _name_regex(template: str) -> re.Pattern:
    parts = re.split(r"(\{split\}|\{chunk\})", template)
    groups = {"{split}": r"(?P<split>[^/]+)", "{chunk}": r"(?P<chunk>\d{4,})"}
    return re.compile("".join(groups.get(p, re.escape(p)) for p in parts) + "$")


_NAMES = {kind: _name_regex(t) for kind, t in SHARD_FILES.items()}


@dataclass(frozen=True)
class ShardName:
    kind: str
    split: str | None   # None for kinds that are not split (graphs)
    chunk: int


@dataclass(frozen=True)
class Layout:
    root: Path
    name: str

    @property
    def dir(self) -> Path:
        return Path(self.root) / self.name

    @property
    def index(self) -> ShardIndex:
        return ShardIndex(self)

    @property
    def images(self) -> Path:
        return self.dir / "images.parquet"

    @property
    def captions(self) -> Path:
        return self.dir / "text" / "captions.parquet"

    @property
    def boxes(self) -> Path:
        return self.dir / "boxes.parquet"

    @property
    def hard_negatives(self) -> Path:
        return self.dir / "hard_negatives.parquet"

    @property
    def vocab(self) -> Path:
        return self.dir / "text" / "vocab.json"

    @property
    def vocab_vectors(self) -> Path:
        return self.dir / "text" / "vocab.vectors.npy"

    # -- shard files: chunk k (of one split) of a kind
    @staticmethod
    def split_kind(kind: str) -> bool:
        """Whether ``kind``'s files are named by split (regions, grid), not by chunk alone."""
        return kind in SPLIT_KINDS

    def shard(self, kind: str, split: str | None, chunk: int) -> Path:
        if (split is None) != (kind not in SPLIT_KINDS):
            raise ValueError(f"{kind} shards are {'' if kind in SPLIT_KINDS else 'not '}named by split")
        return self.dir / SHARD_FILES[kind].format(split=split, chunk=f"{int(chunk):04d}")

    def regions(self, split: str, chunk: int) -> Path:
        return self.shard("regions", split, chunk)

    def grid(self, split: str, chunk: int) -> Path:
        return self.shard("grid", split, chunk)

    def graphs(self, chunk: int) -> Path:
        return self.shard("graphs", None, chunk)

    def pattern(self, kind: str) -> str:
        """The file name with ``{split}`` and ``{chunk}`` wildcards (for Snakemake rules)."""
        return str(self.dir / SHARD_FILES[kind])

    def parse(self, path, kind: str | None = None) -> ShardName | None:
        """What a shard file name means; None when ``path`` is not named as a shard of ``kind``
        (of any kind when None). ``path`` is relative to the dataset folder, or absolute."""
        rel = self._relative(Path(path))
        for k in ([kind] if kind else SHARD_FILES) if rel is not None else ():
            m = _NAMES[k].fullmatch(rel.as_posix())
            if m:
                return ShardName(k, m.groupdict().get("split"), int(m["chunk"]))
        return None

    def _relative(self, p: Path) -> Path | None:
        if not p.is_absolute():
            return p
        for base in (self.dir.absolute(), self.dir.resolve()):
            if p.is_relative_to(base):
                return p.relative_to(base)
        return None

    def on_disk(self, kind: str) -> list[Path]:
        """The files under the dataset folder named as shards of ``kind``, sorted."""
        folder = (self.dir / SHARD_FILES[kind]).parent
        return sorted(p for p in folder.glob("*") if self.parse(p, kind) is not None)

    def plan(self, kind: str, rows_per_split: dict, per_file: int) -> list[Path]:
        """Every file of a whole run that puts ``per_file`` rows in each chunk, for ``{split:
        rows}`` (``{None: rows}`` for kinds that are not split), in split then chunk order."""
        return [self.shard(kind, split, k) for split, n in sorted(rows_per_split.items(), key=lambda kv: str(kv[0]))
                for k in range(-(-n // per_file))]

    def planned(self, kind: str, per_file: int) -> list[Path]:
        """``plan`` for the dataset as ingested: the images of each split of images.parquet
        (regions, grid) or the captions of captions.parquet (graphs)."""
        if kind in SPLIT_KINDS:
            splits = read_table(self.images, "images", columns=["split"])["split"].to_pylist()
            return self.plan(kind, Counter(splits), per_file)
        return self.plan(kind, {None: read_table(self.captions, "captions", columns=["caption_id"]).num_rows},
                         per_file)
