"""One image that is in no dataset -> its region and grid features, as a dataset's shards hold
them, with the extractor config those shards recorded.

    cfg = recorded_config(RegionShard(path).attrs, path)       # the config a shard was made with
    check_weights(cfg, "regions", "random", 0, RegionShard(path).attrs["config_hash"], path)
    out = extract_image("photo.jpg", cfg, weights="random", kinds=("regions", "grid"))
    out.regions      # shards.Regions: float16 features, boxes in pixels, labels and scores
    out.grid         # [H*W, C] float16, out.grid_hw = (H, W)

Decoding (``load_image``, with its bad-image policy), resizing, the network and the float16
casts are those of the extraction runner (``features/runner.py``), so an image of a dataset
extracted here gets the features its shard holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from features.config import ExtractorConfig
from features.rcnn import BottomUpRCNN
from features.transforms import load_image, to_network_input
from features.weights import RANDOM, WeightsError, WeightsInfo, load_weights, weights_info
from pipeline import shards

REGION_OUTPUTS = ("boxes", "obj_labels", "obj_scores", "attr_labels", "attr_scores")


@dataclass
class SingleImage:
    regions: shards.Regions | None   # when "regions" was asked for
    grid: np.ndarray | None          # [H*W, C] float16, when "grid" was asked for
    grid_hw: tuple[int, int] | None
    note: str                        # how the image was converted on decoding ('' if not)
    weights: WeightsInfo


def result_regions(image_id: int, hw: tuple[int, int], result: dict) -> shards.Regions:
    """A network result (``BottomUpRCNN`` output of one image) as a region shard row."""
    return shards.Regions(image_id, hw, result["features"].cpu().numpy().astype(np.float16),
                          **{k: result[k].cpu().numpy() for k in REGION_OUTPUTS})


def recorded_config(attrs: dict, where) -> ExtractorConfig:
    """The extractor config a region or grid shard records in its attributes."""
    if "extractor" not in attrs:
        raise ValueError(f"{where}: the shard records no extractor config (features imported from "
                         "precomp files, or written by a generator), so another image cannot be "
                         "extracted the way its images were")
    return ExtractorConfig.from_dict(attrs["extractor"])


def check_weights(cfg: ExtractorConfig, kind: str, weights: str, seed: int, config_hash: str,
                  where) -> WeightsInfo:
    """``weights`` (a path or ``random`` with ``seed``) identified, and refused unless it is the
    extractor whose ``kind`` shards have ``config_hash``."""
    info = weights_info(weights, seed)
    if cfg.shard_hash(kind, info.sha256) != config_hash:
        what = (f"random weights of seed {seed}" if info.is_random
                else f"{weights} (sha256 {info.sha256[:16]})")
        raise WeightsError(f"{where}: these {kind.removesuffix('s')} features were not extracted with "
                           f"{what} (config hash {cfg.shard_hash(kind, info.sha256)} != {config_hash}); "
                           "give the weights (and, for random weights, the seed) the dataset was "
                           "extracted with")
    return info


@torch.no_grad()
def extract_image(path, cfg: ExtractorConfig, weights: str = RANDOM, seed: int = 0, device="cpu",
                  kinds=("regions",), image_id: int = -1, boxes: np.ndarray | None = None) -> SingleImage:
    """Features of the image at ``path``; ``boxes`` [n, 4] in pixels when ``cfg.boxes`` is
    ``given``. A file that is not a usable image raises ``BadImage`` with the reason."""
    if cfg.boxes == "given" and boxes is None and "regions" in kinds:
        raise ValueError("the extractor config takes given boxes (boxes='given'); pass boxes, or "
                         "extract with the detector's own boxes (boxes='adaptive')")
    im, note = load_image(path, cfg.max_pixels, cfg.min_image_side)
    model = BottomUpRCNN(cfg)
    info = load_weights(model, weights, seed)
    model.to(device)
    hw = (im.height, im.width)
    given = None if boxes is None else [torch.as_tensor(np.asarray(boxes, np.float32))]
    res = model([to_network_input(im, cfg.min_size, cfg.max_size)], [hw], given,
                regions="regions" in kinds, grid="grid" in kinds)[0]
    regions = result_regions(image_id, hw, res) if "regions" in kinds else None
    grid = res["grid"].cpu().numpy().astype(np.float16) if "grid" in kinds else None
    return SingleImage(regions, grid, cfg.grid_size if "grid" in kinds else None, note, info)
