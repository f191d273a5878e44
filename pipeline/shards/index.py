"""``shards.json``: the per-dataset index of what was written, by which config, from which
inputs, and the judge of which files are current.

The currency rule: a file is reused only when it is registered with the same config hash and
inputs hash, and the file on disk still has the registered size and sha256. Anything else
(missing, unregistered, another config or inputs, altered) is rewritten by the writers and
refused by the trainer.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from pipeline import __version__
from pipeline.shards.atomic import (ShardError, claim, now_iso, read_json, remove_dead_tmp,
                                    sha256_file, write_json)
from pipeline.shards.layout import SPLIT_KINDS, Layout

INDEX_NAME = "shards.json"
KINDS = ("images", "captions", "boxes", "hard_negatives", "regions", "grid", "graphs", "vocab")


@dataclass
class Entry:
    kind: str
    path: str           # relative to the dataset folder
    sha256: str
    size: int
    rows: int
    config_hash: str
    inputs_hash: str = ""
    version: str = __version__
    created: str = field(default_factory=now_iso)
    extra: dict = field(default_factory=dict)


def resolve_config_hashes(entries: Iterable[Entry], pinned: Mapping[str, str] | None = None,
                          where: str = INDEX_NAME) -> dict[str, str]:
    """The config hash of each kind among ``entries`` (the files one run reads): exactly one per
    kind, and the one in ``pinned`` (the hashes a run was trained on) for the kinds it names.
    Pure: reads nothing; raises ShardError naming ``where`` otherwise."""
    by_kind: dict[str, set] = {}
    for e in entries:
        by_kind.setdefault(e.kind, set()).add(e.config_hash)
    out = {}
    for kind, hashes in sorted(by_kind.items()):
        hashes = sorted(hashes)
        want = (pinned or {}).get(kind)
        if want is not None and hashes != [want]:
            raise ShardError(f"{where}: the run expects {kind} shards of config {want}, but the "
                             f"files it reads have configs {hashes}; rewrite them with the run's "
                             f"config or start a new run")
        if len(hashes) > 1:
            raise ShardError(f"{where}: the {kind} files read together were written with several "
                             f"configs {hashes}; rerun that step, or remove the old files with "
                             f"`itmkit prune`")
        out[kind] = hashes[0]
    return out


@dataclass
class Pruned:
    removed: list = field(default_factory=list)     # paths relative to the dataset folder
    busy: list = field(default_factory=list)        # being written by another process: left
    temporary: list = field(default_factory=list)   # temporary files of writers that are gone


class ShardIndex:
    """``<dataset_dir>/shards.json``. Every update re-reads the file under an exclusive lock,
    so parallel jobs (Snakemake, dask workers) can register outputs into the same index."""

    def __init__(self, dataset_dir, name: str | None = None):
        self.dir = Path(dataset_dir)
        self.path = self.dir / INDEX_NAME
        self.name = name or self.dir.name
        self.layout = Layout(self.dir.parent, self.dir.name)

    # -- reading
    def load(self) -> dict:
        if not self.path.exists():
            return {"dataset": self.name, "itmkit_version": __version__, "kinds": {}}
        data = read_json(self.path)
        if not isinstance(data, dict) or "kinds" not in data:
            raise ShardError(f"{self.path}: not an itmkit shards.json")
        return data

    def entries(self, kind: str | None = None) -> list[Entry]:
        kinds = self.load()["kinds"]
        names = [kind] if kind else list(kinds)
        return [Entry(**e) for k in names for e in kinds.get(k, [])]

    def entry(self, kind: str, path) -> Entry | None:
        rel = self._rel(path)
        return next((e for e in self.entries(kind) if e.path == rel), None)

    def files(self, kind: str, config_hash: str | None = None) -> list[Path]:
        """Absolute paths of the registered files of one kind, sorted by name. With
        ``config_hash`` given, refuses to return a mix of files written under other configs."""
        entries = sorted(self.entries(kind), key=lambda e: e.path)
        if config_hash is not None:
            other = [e.path for e in entries if e.config_hash != config_hash]
            if other:
                raise ShardError(f"{self.path}: {kind} files {other} were written with another "
                                 f"config than {config_hash}; rerun that step")
        return [self.dir / e.path for e in entries]

    def split_entries(self, kind: str, split: str) -> list[Entry]:
        """The registered files of one split of a split kind (regions, grid), in chunk order."""
        named = [(n, e) for e in self.entries(kind) if (n := self.layout.parse(e.path, kind)) and n.split == split]
        return [e for _, e in sorted(named, key=lambda ne: ne[0].chunk)]

    def splits(self, kind: str) -> set[str]:
        """The splits that have registered files of a split kind."""
        return {n.split for e in self.entries(kind) if (n := self.layout.parse(e.path, kind))}

    def read_set(self, kinds: Iterable[str], splits: Iterable[str]) -> list[Entry]:
        """The registered files a run reads: those of ``splits`` for split kinds, all for the
        others. Raises ShardError when a kind (or a split of a split kind) has none."""
        out, splits = [], list(splits)
        for kind in kinds:
            for split in splits if kind in SPLIT_KINDS else [None]:
                got = self.split_entries(kind, split) if split else self.entries(kind)
                if not got:
                    raise ShardError(f"{self.path}: no {kind} registered"
                                     + (f" for split '{split}'" if split else ""))
                out += got
        return out

    def config_hashes(self, kinds: Iterable[str], splits: Iterable[str],
                      pinned: Mapping[str, str] | None = None) -> dict[str, str]:
        """``{kind: config hash}`` of the files a run on ``splits`` reads (see read_set and
        resolve_config_hashes)."""
        return resolve_config_hashes(self.read_set(kinds, splits), pinned, str(self.path))

    # -- currency
    def status(self, kind: str, path, config_hash: str, inputs_hash: str = "") -> str:
        """'current', or why not: 'missing', 'unregistered', 'stale' (another config or other
        inputs) or 'altered' (size or sha256 differs from shards.json)."""
        p = self.dir / self._rel(path)
        e = self.entry(kind, path)
        if not p.exists():
            return "missing"
        if e is None:
            return "unregistered"
        if e.config_hash != config_hash or e.inputs_hash != inputs_hash:
            return "stale"
        if p.stat().st_size != e.size or sha256_file(p) != e.sha256:
            return "altered"
        return "current"

    def is_valid(self, kind: str, path, config_hash: str, inputs_hash: str = "") -> bool:
        """The cache-reuse rule (see the module's docstring)."""
        return self.status(kind, path, config_hash, inputs_hash) == "current"

    def stale(self, kind: str, config_hash: str) -> list[Entry]:
        return [e for e in self.entries(kind) if e.config_hash != config_hash]

    def verify(self, entries: Iterable[Entry] | None = None) -> list[str]:
        """Re-hash the registered files (all, or ``entries``); one message per problem (empty
        when all are intact). Files are hashed in parallel threads (hashlib releases the GIL)."""
        entries = self.entries() if entries is None else list(entries)
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            return [m for m in pool.map(self._problem, entries) if m]

    def check(self, entries: Iterable[Entry]) -> None:
        """Raise a ShardError naming every file of ``entries`` that is missing or altered."""
        problems = self.verify(entries)
        if problems:
            raise ShardError(f"{len(problems)} file(s) differ from {self.path}: "
                             + "; ".join(problems[:5]) + (" ..." if len(problems) > 5 else "")
                             + ". Rerun the step that writes them (it rewrites altered files); "
                             "`itmkit verify DATASET_DIR` lists them all")

    def _problem(self, e: Entry) -> str:
        p = self.dir / e.path
        if not p.exists():
            return f"{p}: missing (registered as {e.kind})"
        if p.stat().st_size != e.size:
            return f"{p}: size {p.stat().st_size} != registered {e.size} (truncated or altered)"
        if sha256_file(p) != e.sha256:
            return f"{p}: sha256 differs from shards.json (altered)"
        return ""

    def plan_problems(self, kind: str, planned: Iterable) -> list[str]:
        """What keeps ``planned`` from being one complete set: files not registered or not on
        disk with their registered size, and files of several configs."""
        entries = {e.path: e for e in self.entries(kind)}
        problems, hashes = [], set()
        for path in planned:
            rel = self._rel(path)
            e, p = entries.get(rel), self.dir / rel
            if e is None:
                problems.append(f"{p}: not registered in {self.path}")
            elif not p.exists() or p.stat().st_size != e.size:
                problems.append(f"{p}: missing or not of its registered size")
            else:
                hashes.add(e.config_hash)
        if len(hashes) > 1:
            problems.append(f"{self.path}: the {kind} files of the plan have several configs {sorted(hashes)}")
        return problems

    # -- writing
    def register(self, kind: str, path, *, rows: int, config_hash: str, inputs_hash: str = "",
                 extra: dict | None = None) -> Entry:
        """Hash ``path`` and record it. A writer calls this while it holds the file's ``claim``,
        so that what is registered is what is on disk."""
        if kind not in KINDS:
            raise ValueError(f"unknown shard kind '{kind}'; known: {', '.join(KINDS)}")
        p = self.dir / self._rel(path)
        try:
            entry = Entry(kind=kind, path=self._rel(path), sha256=sha256_file(p), size=p.stat().st_size,
                          rows=int(rows), config_hash=config_hash, inputs_hash=inputs_hash,
                          extra=extra or {})
        except FileNotFoundError:  # deleted by something that takes no claim (e.g. Snakemake)
            raise ShardError(f"{p}: removed by another process before it was registered; "
                             "rerun the step") from None
        with self._locked() as data:
            lst = [e for e in data["kinds"].get(kind, []) if e["path"] != entry.path]
            data["kinds"][kind] = sorted(lst + [entry.__dict__], key=lambda e: e["path"])
        return entry

    def unregister(self, kind: str, paths: Iterable | None = None) -> None:
        """Forget entries (all of ``kind`` when ``paths`` is None); files are left alone."""
        rels = None if paths is None else {self._rel(p) for p in paths}
        with self._locked() as data:
            lst = data["kinds"].get(kind, [])
            data["kinds"][kind] = [e for e in lst if rels is not None and e["path"] not in rels]

    def prune(self, kind: str, keep: Iterable, *, config_hash: str | None = None,
              splits: Iterable[str] | None = None) -> Pruned:
        """Remove the ``kind`` shards that are not in ``keep``: registered ones are unregistered
        and deleted, unregistered files named as ``kind`` shards are deleted; with
        ``config_hash``, also the files registered under another config; with ``splits``, only
        files of those splits are touched. A file another process is writing (claimed) is
        left alone and listed as busy. Temporary files of writers that are gone go too."""
        keep = {self._rel(p) for p in keep}
        splits = None if splits is None else set(splits)
        registered = {e.path: e for e in self.entries(kind)}
        on_disk = {p.relative_to(self.dir).as_posix() for p in self.layout.on_disk(kind)}
        out = Pruned()
        for rel in sorted(set(registered) | on_disk):
            name = self.layout.parse(rel, kind)
            if splits is not None and (name is None or name.split not in splits):
                continue
            e = registered.get(rel)
            other_config = e is not None and config_hash is not None and e.config_hash != config_hash
            if rel in keep and not other_config:
                continue
            with claim(self.dir / rel, wait=False) as held:
                if not held:
                    out.busy.append(rel)
                    continue
                if e is not None:
                    self.unregister(kind, [rel])
                (self.dir / rel).unlink(missing_ok=True)
                out.removed.append(rel)
        folder = Path(self.layout.pattern(kind)).parent
        if folder.is_dir():
            out.temporary = sorted(p.relative_to(self.dir).as_posix() for p in remove_dead_tmp(folder))
        return out

    # -- helpers
    def _rel(self, path) -> str:
        """Path relative to the dataset folder. A relative ``path`` is taken from the dataset
        folder, unless it names a file from the working directory (``data/demo/x.h5``)."""
        p = Path(path)
        if not p.is_absolute():
            if not (self.dir / p).exists() and p.exists():
                p = p.absolute()
            else:
                return p.as_posix()
        try:
            return p.resolve().relative_to(self.dir.resolve()).as_posix()
        except ValueError:
            raise ValueError(f"{path} is not inside dataset folder {self.dir}") from None

    @contextlib.contextmanager
    def _locked(self):
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / (INDEX_NAME + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                data = self.load()
                yield data
                data["itmkit_version"] = __version__
                write_json(self.path, data)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
