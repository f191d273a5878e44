"""Which GPU an extraction job runs on when several jobs share a machine.

Snakemake counts GPUs (``--resources gpu=4``) but does not say which one a job gets. A job started
with ``--gpu-locks DIR`` takes the first visible GPU whose lock file in DIR no other process holds
and keeps it while it runs: four jobs at once get four GPUs. The lock is an ``flock``, which the
kernel releases when its holder ends, even on a kill. Lock files are named by the GPU's UUID, so
jobs that see the GPUs under different indices (a cluster setting ``CUDA_VISIBLE_DEVICES`` per
job) still agree on what is taken."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import socket
import sys
import time
from pathlib import Path


def visible_gpus() -> list[str]:
    """UUIDs of the CUDA devices this process sees, in index order."""
    import torch  # here: choosing among given devices needs no torch

    return [str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]


def lock_path(lock_dir: Path, uuid: str) -> Path:
    return Path(lock_dir) / f"gpu-{re.sub(r'[^A-Za-z0-9_.-]', '_', uuid)}.lock"


@contextlib.contextmanager
def held_gpu(uuids: list[str], lock_dir, wait: bool = True, poll_s: float = 0.5):
    """Yield the index (into ``uuids``) of a GPU no other holder of a lock in ``lock_dir`` uses,
    holding its lock until the block ends; None when every one is taken and ``wait`` is False.
    With ``wait``, polls until one is free (saying so once on stderr)."""
    if not uuids:
        raise RuntimeError("--gpu-locks: no CUDA device is visible to this process")
    Path(lock_dir).mkdir(parents=True, exist_ok=True)
    said = False
    while True:
        for i, uuid in enumerate(uuids):
            f = open(lock_path(lock_dir, uuid), "a+")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                continue
            try:
                f.seek(0)
                f.truncate()
                f.write(f"{socket.gethostname()} {os.getpid()}\n")  # who holds it, for people
                f.flush()
                yield i
            finally:
                f.close()  # releases the lock
            return
        if not wait:
            yield None
            return
        if not said:
            print(f"features extract: all {len(uuids)} GPU(s) are taken (locks in {lock_dir}); waiting",
                  file=sys.stderr)
            said = True
        time.sleep(poll_s)
