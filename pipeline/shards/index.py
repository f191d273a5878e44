"""``shards.json``: the per-dataset index of what was written, by which config, from which
inputs, and the judge of which files are current. A ``ShardIndex`` belongs to a ``Layout``
(``layout.index``), which names the files: this module builds no path and parses no name.

The currency rule: a file is reused only when it is registered with the same config hash and
inputs hash, and the file on disk still has the registered size and sha256. Anything else
(missing, unregistered, another config or inputs, altered) is rewritten by the writers and
refused by the trainer.

A dataset folder may come from someone else, so ``shards.json`` is checked when it is read:
an entry with a missing or mistyped field, or whose path does not resolve (after symbolic
links) inside the dataset folder, makes the whole index refused with one line naming it.
Nothing outside the folder is ever opened, locked, hashed or removed through the index.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import typing
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from pipeline import __version__
from pipeline.shards.atomic import (ShardError, claim, now_iso, open_lock, read_json,
                                    remove_dead_tmp, sha256_file, write_json)
from pipeline.shards.h5 import open_h5

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


ENTRY_TYPES = typing.get_type_hints(Entry)
ENTRY_REQUIRED = [f.name for f in dataclasses.fields(Entry)
                  if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]


def entry_problem(raw, kind: str) -> str:
    """What is wrong with one raw entry of shards.json listed under ``kind`` ("" when nothing).
    Its path is checked against the folder by ``RealFolder.outside``."""
    if not isinstance(raw, dict):
        return f"is a {type(raw).__name__}, not an object"
    missing = [f for f in ENTRY_REQUIRED if f not in raw]
    if missing:
        return f"lacks field(s) {', '.join(missing)}"
    for name, value in raw.items():
        want = ENTRY_TYPES.get(name)
        if want is None:
            return f"has an unknown field '{name}'"
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            return f"field '{name}' is {json.dumps(value)[:40]}, not {want.__name__}"
    if raw["kind"] != kind:
        return f"is listed under '{kind}' but its kind is '{raw['kind']}'"
    if raw["size"] < 0 or raw["rows"] < 0:
        return "has a negative size or row count"
    return ""


def checked(data, folder: Path, where: Path) -> dict:
    """``data`` (the index read from ``where``) when every entry has its fields, of their types,
    and a path that stays inside ``folder``; else a ShardError naming the first bad entry."""
    if not isinstance(data, dict) or not isinstance(data.get("kinds"), dict):
        raise ShardError(f"{where}: not an itmkit shards.json")
    real = RealFolder(folder)
    for kind, lst in data["kinds"].items():
        if not isinstance(lst, list):
            raise ShardError(f"{where}: '{kind}' is not a list of entries")
        for i, raw in enumerate(lst):
            why = entry_problem(raw, kind) or real.outside(raw["path"])
            if why:
                path = raw.get("path") if isinstance(raw, dict) else None
                name = f" {json.dumps(path)}" if isinstance(path, str) else ""
                raise ShardError(f"{where}: {kind} entry {i}{name} {why}; the index is refused "
                                 "(edited by hand, or made for another folder?)")
    return data


class RealFolder:
    """Where paths under one folder really lead, following symbolic links. Each parent folder
    is resolved once, so checking the many entries of one index costs one ``lstat`` each."""

    def __init__(self, folder: Path):
        self.folder, self.root, self._parents = str(folder), os.path.realpath(folder), {}

    def outside(self, rel: str) -> str:
        """Why ``rel`` does not name a file inside the folder after symbolic links are
        followed; "" when it does. The file need not exist."""
        if not rel or rel.startswith("/") or ".." in rel.split("/"):
            return "is not a relative path inside the dataset folder"
        parent, _, name = rel.rpartition("/")
        if parent not in self._parents:
            self._parents[parent] = os.path.realpath(os.path.join(self.folder, parent))
        real = os.path.join(self._parents[parent], name)
        if os.path.islink(real):
            real = os.path.realpath(real)
        if real != self.root and not real.startswith(self.root.rstrip("/") + "/"):
            return f"resolves to {real}, outside the dataset folder {self.root} (a symbolic link?)"
        return ""


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
    """``<dataset_dir>/shards.json`` of ``layout`` (made by ``layout.index``). Every update
    re-reads the file under an exclusive lock, so parallel jobs (Snakemake, dask workers) can
    register outputs into the same index."""

    def __init__(self, layout):   # a pipeline.shards.Layout, which imports this module
        self.layout = layout
        self.dir = Path(layout.dir)
        self.path = self.dir / INDEX_NAME
        self.name = layout.name

    # -- reading
    def load(self) -> dict:
        """The index as stored, every entry checked (see ``checked``)."""
        if not self.path.exists():
            return {"dataset": self.name, "itmkit_version": __version__, "kinds": {}}
        return checked(read_json(self.path), self.dir, self.path)

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
            for split in splits if self.layout.split_kind(kind) else [None]:
                got = self.split_entries(kind, split) if split else self.entries(kind)
                if not got:
                    raise ShardError(f"{self.path}: no {kind} registered"
                                     + (f" for split '{split}'" if split else ""))
                out += got
        return out

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
        """Re-hash the registered files (all, or ``entries``) and refuse HDF5 shards that would
        read bytes from other files; one message per problem (empty when all are intact). Files
        are hashed in parallel threads (hashlib releases the GIL)."""
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
        if p.suffix == ".h5":  # the hash covers the shard's own bytes: refuse one reading others
            try:
                open_h5(p).close()
            except ShardError as err:
                return str(err)
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
        rel = self._inside(self._rel(path))
        p = self.dir / rel
        try:
            entry = Entry(kind=kind, path=rel, sha256=sha256_file(p), size=p.stat().st_size,
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
        registered = {e.path: e for e in self.entries(kind)}
        folder = Path(self.layout.pattern(kind)).parent
        self._inside(folder.relative_to(self.dir).as_posix())  # a folder linked elsewhere
        keep = {self._rel(p) for p in keep}
        splits = None if splits is None else set(splits)
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
        if folder.is_dir():
            out.temporary = sorted(p.relative_to(self.dir).as_posix() for p in remove_dead_tmp(folder))
        return out

    # -- helpers
    def _inside(self, rel: str) -> str:
        """``rel`` unchanged, or a ShardError when it resolves outside the dataset folder."""
        why = RealFolder(self.dir).outside(rel)
        if why:
            raise ShardError(f"{self.dir / rel}: {why}; refused")
        return rel

    def _rel(self, path) -> str:
        """Path relative to the dataset folder. A relative ``path`` is taken from the dataset
        folder, unless it names a file from the working directory (``data/demo/x.h5``)."""
        p = Path(path)
        if not p.is_absolute():
            if not (self.dir / p).exists() and p.exists():
                p = p.absolute()
            else:
                return p.as_posix()
        try:  # the file itself is not resolved: a link named as a shard is that shard
            return (p.parent.resolve() / p.name).relative_to(self.dir.resolve()).as_posix()
        except ValueError:
            raise ValueError(f"{path} is not inside dataset folder {self.dir}") from None

    @contextlib.contextmanager
    def _locked(self):
        self.dir.mkdir(parents=True, exist_ok=True)
        with open_lock(self.dir / (INDEX_NAME + ".lock")) as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                data = self.load()
                yield data
                data["itmkit_version"] = __version__
                write_json(self.path, data)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

