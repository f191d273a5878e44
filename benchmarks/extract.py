"""Images/s of the extraction runner against the bare model, and grid-only against region+grid.

    python benchmarks/extract.py [--images 6] [--min-size 600 --max-size 1000] [--device cpu]

Makes a small synthetic dataset (640x480 JPEGs of coloured shapes) in a temporary folder, then
measures, in one process:
  1. bare forward: the model on tensors decoded and resized beforehand (regions + grid);
  2. runner, regions + grid: ``features extract`` end to end (decode in workers, write shards);
  3. runner, grid only.
Runner figures exclude building the model and drawing its random weights (reported apart).
Prints figures; asserts nothing. Random weights: speed does not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from features.config import ExtractorConfig
from features.extract import extract
from features.rcnn import BottomUpRCNN
from features.transforms import load_image, to_network_input
from features.weights import load_weights
from pipeline import shards


def make_dataset(root: Path, n: int, seed: int = 0) -> shards.Layout:
    layout = shards.Layout(root, "bench")
    (layout.dir / "img").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        im = Image.new("RGB", (640, 480), tuple(int(v) for v in rng.integers(0, 255, 3)))
        d = ImageDraw.Draw(im)
        for _ in range(6):
            x, y = rng.integers(0, 560), rng.integers(0, 400)
            w, h = rng.integers(30, 200, 2)
            fill = tuple(int(v) for v in rng.integers(0, 255, 3))
            (d.rectangle if rng.random() < 0.5 else d.ellipse)([x, y, x + w, y + h], fill=fill)
        path = layout.dir / "img" / f"{i:05d}.jpg"
        im.save(path, quality=90)
        rows.append(dict(image_id=i, path=str(path), split="train", width=640, height=480))
    shards.write_table(layout.images, rows, "images")
    return layout


def bare_forward(layout, cfg, device, n_images) -> float:
    model = BottomUpRCNN(cfg)
    load_weights(model, "random")
    model.to(device)
    paths = shards.read_table(layout.images, "images")["path"].to_pylist()
    ims = [load_image(p)[0] for p in paths]
    tensors = [to_network_input(im, cfg.min_size, cfg.max_size) for im in ims]
    sizes = [(im.height, im.width) for im in ims]
    model([tensors[0]], [sizes[0]])  # warm-up
    _sync(device)
    t = time.perf_counter()
    for x, s in zip(tensors, sizes):
        model([x], [s])
    _sync(device)
    return n_images / (time.perf_counter() - t)


def runner(layout, cfg, kinds, device, batch_size, workers) -> tuple[float, float]:
    r = extract(layout, cfg, kinds, device=device, shard_size=1000, batch_size=batch_size,
                workers=workers, progress=False)
    return r.images / r.loop_seconds, r.setup_seconds


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=6)
    p.add_argument("--min-size", type=int, default=600)
    p.add_argument("--max-size", type=int, default=1000)
    p.add_argument("--proposals", type=int, default=300)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--amp", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = ExtractorConfig(min_size=args.min_size, max_size=args.max_size,
                          rpn_post_nms_topk=args.proposals, amp=args.amp)
    with tempfile.TemporaryDirectory() as tmp:
        bare = bare_forward(make_dataset(Path(tmp) / "a", args.images), cfg, args.device, args.images)
        both, setup = runner(make_dataset(Path(tmp) / "b", args.images), cfg, ("regions", "grid"),
                             args.device, args.batch_size, args.workers)
        grid, _ = runner(make_dataset(Path(tmp) / "c", args.images), cfg, ("grid",),
                         args.device, args.batch_size, args.workers)
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {os.cpu_count()} cores"
    print(f"# {args.images} images 640x480 -> {cfg.min_size}/{cfg.max_size}, {args.proposals} proposals, "
          f"{dev}, torch threads {torch.get_num_threads()}, amp {args.amp}, load {os.getloadavg()[0]:.1f}, "
          f"{platform.node()}")
    print(f"bare forward (regions+grid)   {bare:8.3f} img/s")
    print(f"runner (regions+grid)         {both:8.3f} img/s   overhead {bare / both:.2f}x  "
          f"(model setup {setup:.1f}s, not counted)")
    print(f"runner (grid only)            {grid:8.3f} img/s   {grid / both:.1f}x faster than regions+grid")


if __name__ == "__main__":
    main()
