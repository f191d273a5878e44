"""Export the image and caption embeddings of a two-tower run for a vector index.

    itmkit evaluate runs/NAME --export-index DIR [--split test] [--checkpoint best]

DIR gets ``images.npy`` [N, D] float16 and ``image_ids.npy`` [N] int64, ``captions.npy`` [M, D]
float16, ``caption_ids.npy`` and ``caption_image_ids.npy`` [M] int64 (row k of the embeddings
is the item with id k of the id arrays), and ``index.json`` describing them: the embeddings are
L2-normalised, so the score of a pair is the inner product (e.g. a FAISS ``IndexFlatIP``).
A DIR whose index.json says it holds the same checkpoint, split and shards is left as it is.
Cross-attention models have no per-item embedding (their score needs the image and the caption
together) and are refused. ``read_index(DIR)`` reads an export back, plain arrays only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline import shards
from training import models
from training.checkpoint import CheckpointError
from training.data import CaptionDataset, ImageDataset, collate_images, collate_text, make_loader
from training.evaluation import encode
from training.run import LoadedRun

FILES = ("images.npy", "image_ids.npy", "captions.npy", "caption_ids.npy", "caption_image_ids.npy")


def check_two_tower(name: str) -> None:
    if not models.get(name).two_tower:
        raise ValueError(f"--export-index: model '{name}' is a cross-attention model (two_tower = "
                         "False): its scores need the image and the caption together, so it has "
                         "no per-item embeddings to put in a vector index")


@torch.no_grad()
def embeddings(model, image_loader, text_loader, device="cpu",
               progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """[N, D] image and [M, D] caption embeddings (float32) of a two-tower model."""
    check_two_tower(model.name)
    was_training = model.training
    model.eval()
    img = torch.cat(encode(model.encode_image, image_loader, device, "encode images" if progress else None))
    txt = torch.cat(encode(model.encode_text, text_loader, device, "encode captions" if progress else None))
    model.train(was_training)
    return img.float().numpy(), txt.float().numpy()


def write_index(out_dir, img: np.ndarray, txt: np.ndarray, image_ids, caption_ids,
                caption_image_ids, meta: dict) -> list[Path]:
    """Write the embeddings as float16 with their ids, then index.json (last, so a DIR with an
    index.json is complete). Every file is written atomically."""
    out_dir = Path(out_dir)
    if len(img) != len(image_ids) or len(txt) != len(caption_ids) or len(txt) != len(caption_image_ids):
        raise ValueError(f"{out_dir}: {len(img)} image / {len(txt)} caption embeddings for "
                         f"{len(image_ids)} image ids / {len(caption_ids)} caption ids")
    out_dir.mkdir(parents=True, exist_ok=True)
    arrays = dict(zip(FILES, (img.astype(np.float16), np.asarray(image_ids, np.int64),
                              txt.astype(np.float16), np.asarray(caption_ids, np.int64),
                              np.asarray(caption_image_ids, np.int64))))
    for name, arr in arrays.items():
        with shards.atomic_path(out_dir / name) as tmp, open(tmp, "wb") as f:
            np.save(f, arr)
    index = dict(meta, images=len(img), captions=len(txt), dim=int(img.shape[1]), dtype="float16",
                 normalised=True, similarity="inner product", files=list(FILES),
                 created=shards.now_iso())
    shards.write_json(out_dir / "index.json", index)
    return [out_dir / n for n in FILES] + [out_dir / "index.json"]


def is_current(out_dir, meta: dict) -> bool:
    path = Path(out_dir) / "index.json"
    if not path.exists() or not all((Path(out_dir) / n).exists() for n in FILES):
        return False
    old = shards.read_json(path)
    return all(old.get(k) == v for k, v in meta.items())


def read_index(out_dir) -> dict:
    """index.json and the arrays of an export (``allow_pickle=False``: an object array, whose
    loading could run code, is refused)."""
    out_dir = Path(out_dir)
    if not (out_dir / "index.json").exists():
        raise CheckpointError(f"{out_dir}: no index.json (not an export, or an unfinished one)")
    out = {"meta": shards.read_json(out_dir / "index.json")}
    for name in FILES:
        try:
            out[name.removesuffix(".npy")] = np.load(out_dir / name, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise CheckpointError(f"{out_dir / name}: refused or unreadable: {e}") from None
    return out


def export_run(run: LoadedRun, out_dir, *, batch_size: int = 128, workers: int = 0,
               progress: bool = True) -> tuple[list[Path], str]:
    """Export the embeddings of the split ``run`` was loaded with (``load_run(..., split=)``)
    to ``out_dir``. Returns (files written, summary)."""
    check_two_tower(run.config.model)
    data = run.data
    if data is None:
        raise ValueError("export_run: load the run with a split (load_run(..., split='test'))")
    meta = {"model": run.config.model, "dataset": run.config.dataset, "split": data.cfg.split,
            "max_images": data.cfg.max_images, "run": str(run.dir), "checkpoint": run.which,
            "checkpoint_sha256": run.scored["sha256"],   # of the bytes loaded, not a later file
            "shard_hashes": dict(sorted(data.hashes.items()))}
    if is_current(out_dir, meta):
        return [], f"{out_dir} already holds these embeddings (same checkpoint, split and shards); skipped"
    device = next(run.model.parameters()).device
    images = make_loader(ImageDataset(data), collate_images, batch_size, workers=workers)
    texts = make_loader(CaptionDataset(data), collate_text, batch_size * 5, workers=workers)
    img, txt = embeddings(run.model, images, texts, device, progress)
    files = write_index(out_dir, img, txt, data.image_ids, data.text.caption_ids,
                        data.text.image_ids, meta)
    return files, f"exported {len(img)} image and {len(txt)} caption embeddings (dim {img.shape[1]}) to {out_dir}"
