"""Where the extraction time goes (``features extract --profile``): wall seconds per stage.

The model and the runner wrap each stage in ``stages("name")``. Without profiling that is a
context manager that does nothing; with it, each stage is timed, and on CUDA the device is
synchronised at stage boundaries so that a stage is charged for its own kernels (which slows the
run a little: profile runs are for reading, not for speed figures)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections import defaultdict

import torch

# in the order of the work; stages that did not run are not printed
ORDER = ("decode wait", "backbone", "grid head", "rpn", "box head", "box selection", "attributes",
         "to host", "writer stall", "writing")
NOTES = {
    "decode wait": "waiting for DataLoader workers to decode and resize",
    "backbone": "ResNet stem..res4 to the C4 map",
    "grid head": "res5 over the whole C4 map, grid pooling",
    "rpn": "RPN head, anchor decoding, NMS",
    "box head": "ROI pooling + res5 over the proposals, classifier",
    "box selection": "per-class NMS, max class score, box choice",
    "attributes": "attribute head over the kept boxes",
    "to host": "results copied to host memory",
    "writer stall": "model waiting for a full writer queue",
    "writing": "writer thread: float16, HDF5, sha256, shards.json (overlaps the model)",
}


class Stages:
    """Accumulated wall seconds per stage name; thread-safe (the writer thread times itself)."""

    def __init__(self, device: torch.device | str | None = None):
        self.sync = torch.device(device).type == "cuda" if device is not None else False
        self.seconds: dict[str, float] = defaultdict(float)
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.sync:
            torch.cuda.synchronize()
        t = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize()
            with self._lock:
                self.seconds[name] += time.perf_counter() - t

    def table(self, wall: float, images: int) -> str:
        """One line per stage: seconds, share of the loop's wall time, milliseconds per image."""
        lines = [f"{'stage':<14} {'s':>8} {'% wall':>7} {'ms/img':>8}  what"]
        for name in sorted(self.seconds, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER)):
            s = self.seconds[name]
            lines.append(f"{name:<14} {s:8.2f} {100 * s / max(wall, 1e-9):6.1f}% "
                         f"{1000 * s / max(images, 1):8.1f}  {NOTES.get(name, '')}")
        lines.append(f"{'loop wall':<14} {wall:8.2f} {100.0:6.1f}% {1000 * wall / max(images, 1):8.1f}  "
                     f"{images} image(s)")
        return "\n".join(lines)


def no_stages(name: str):
    """The stand-in for ``Stages`` when nothing is profiled."""
    return contextlib.nullcontext()
