"""Atomic writes, claims on a file being written, hashing and provenance.

Every writer of the store goes through ``atomic_path``: it writes a temporary file whose name is
unique to the process, fsyncs it and renames it onto the final name, so a killed or failing
writer never leaves a half file under that name and two processes never share a temporary
file. ``claim`` serialises the writers of one file across processes; a full disk becomes a
``ShardError`` of one line that names the file.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import hashlib
import json
import os
import platform
import re
import secrets
import socket
from pathlib import Path
from typing import Iterator

from pipeline import __version__

# temporary files are named <name>.<host>-<pid>-<token>.tmp: unique to the writer, and a later
# writer on the same host can tell whether the process that left one is gone
HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:40] or "host"
_TMP = re.compile(r"(?P<final>.+?)(\.(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-[0-9a-f]+)?\.tmp")


class ShardError(RuntimeError):
    """A shard (or shards.json) is missing, truncated, malformed or inconsistent, or cannot be
    written (e.g. the disk is full)."""


def is_no_space(e: BaseException) -> bool:
    """A full disk or an exhausted quota, also as HDF5 reports it (an OSError or a RuntimeError
    such as "Can't flush cache", with the errno inside the message)."""
    if isinstance(e, ShardError):
        return False
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if isinstance(e, (OSError, RuntimeError)) and ("No space left" in str(e) or "errno = 28," in str(e)):
        return True
    # torch.save into a file object reports the file's failed write as "unexpected pos ...", with
    # the file's OSError as the context
    return isinstance(e, RuntimeError) and e.__context__ is not None and is_no_space(e.__context__)


@contextlib.contextmanager
def no_space_is_one_line(path) -> Iterator[None]:
    """Turn a full disk met while writing ``path`` into a ShardError that names the file."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        if is_no_space(e):
            raise ShardError(f"{path}: no space left on device (nothing was written under this "
                             "name; free some space and rerun)") from None
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_dead_tmp(folder: Path, final: str | None = None) -> list[Path]:
    """Remove the temporary files in ``folder`` (of the file named ``final``, or of any) that
    writers which are gone left behind: killed on this host, or ``<name>.tmp`` of older itmkit
    versions. Temporary files of live writers, and of writers on other hosts, are kept."""
    removed = []
    for tmp in folder.glob("*.tmp" if final is None else glob_escape(final) + ".*tmp"):
        m = _TMP.fullmatch(tmp.name)
        if m is None or (final is not None and m["final"] != final):
            continue
        if m["pid"] is None or (m["host"] == HOST and not _pid_alive(int(m["pid"]))):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path unique to this process; on success fsync it and rename it onto
    ``path``. On any exception the temporary file is removed and ``path`` (if it existed) is
    untouched; a full disk is reported as a one-line ShardError naming ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_tmp(path.parent, path.name)
    tmp = path.with_name(f"{path.name}.{HOST}-{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        with no_space_is_one_line(path):
            yield tmp
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def lock_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.parent / f".{path.name}.lock"


@contextlib.contextmanager
def claim(path: str | os.PathLike, wait: bool = True) -> Iterator[bool]:
    """The exclusive right, among processes, to write ``path`` and register it.

    Yields True while held. With ``wait=False`` it yields False at once when another process
    holds it. The claim is an ``flock`` on the hidden file ``.<name>.lock`` next to ``path``, so
    the kernel releases it when its holder dies (even by SIGKILL): a claim is never stale. The
    holder writes its host and pid into that file, for ``claim_holder``."""
    lock = lock_path(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open_lock(lock) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            held = False
        else:
            held = True
            try:
                f.truncate(0)
                f.write(f"{socket.gethostname()} {os.getpid()}\n")
                f.flush()
            except OSError:   # a full disk: the claim holds all the same, its holder goes unnamed
                pass
        try:
            yield held
        finally:
            if held:
                fcntl.flock(f, fcntl.LOCK_UN)


def claim_holder(path: str | os.PathLike) -> str:
    """Who holds (or last held) the claim on ``path``: "host H, pid P", or "another process"
    when that is not known yet."""
    try:
        host, pid = lock_path(path).read_text().split()
    except (OSError, ValueError):
        return "another process"
    return f"host {host}, pid {pid}"


def open_lock(path: str | os.PathLike):
    """Open (or create) the lock file ``path`` for ``flock``. A symbolic link there is refused,
    not followed: a folder from elsewhere could otherwise have it lock, create or truncate a
    file outside itself."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ShardError(f"{path}: is a symbolic link; a lock file must be a plain file "
                             "(remove it)") from None
        raise
    return os.fdopen(fd, "r+")


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike):
    path = Path(path)
    if not path.exists():
        raise ShardError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{path}: not valid JSON (truncated or corrupt): {e}") from e


def sha256_file(path: str | os.PathLike, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def config_hash(cfg) -> str:
    """Stable short hash of a JSON-able config (key order does not matter)."""
    blob = json.dumps(cfg, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def software_versions() -> dict:
    import importlib.metadata as md

    out = {"itmkit": __version__, "python": platform.python_version()}
    for pkg in ("numpy", "h5py", "pyarrow", "torch", "torchvision", "spacy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def provenance(attrs: dict | None) -> dict:
    """What a file records about how it was made: the writer's settings and the software
    versions. No time: two identical runs write byte-identical files (shards.json keeps the
    time of each registration)."""
    attrs = dict(attrs or {})
    attrs.setdefault("software", software_versions())
    return attrs
