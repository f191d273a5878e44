"""The extractor's settings in one dataclass. Its JSON form is stored in every shard and hashed
into shards.json, so two runs with different settings never share shards."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pipeline.images import MAX_PIXELS
from pipeline.shards import config_hash


@dataclass
class ExtractorConfig:
    # input: Caffe convention (BGR, pixel means subtracted, no std division)
    min_size: int = 600                  # short side after resize
    max_size: int = 1000                 # long side is at most this
    pixel_mean_bgr: tuple = (102.9801, 115.9465, 122.7717)
    # backbone: ResNet-101 C4, stride in the 1x1 conv, frozen BN, Caffe ceil-mode max pool
    depth: int = 101
    stride_in_1x1: bool = True
    caffe_maxpool: bool = True
    # region proposal network on the C4 map (stride 16)
    anchor_sizes: tuple = (64, 128, 256, 512)   # 12 anchors, as the published Caffe model
    anchor_ratios: tuple = (0.5, 1.0, 2.0)
    anchor_offset: float = 0.0
    rpn_channels: int = 512              # the published Caffe model's 3x3 RPN conv has 512 outputs
    rpn_pre_nms_topk: int = 6000
    rpn_post_nms_topk: int = 300
    rpn_nms: float = 0.7
    rpn_min_size: float = 0.0
    # box head: pooling on C4 -> res5 -> mean pool -> 2048-d
    pooler: str = "roi_pool"             # roi_pool (published Caffe model) | roi_align | roi_align_v2
    pooler_resolution: int = 14
    pooler_sampling_ratio: int = 0
    res5_dilation: int = 2               # published Caffe model: res5 at stride 1, dilated 3x3 convs
                                         # (1: detectron2's stride-2 res5)
    num_classes: int = 1600              # Visual Genome objects (+1 background)
    bbox_reg_classes: int = 1600         # class-specific regression of the 1600 objects (published
                                         # model); 1601 includes the background, 1 is class-agnostic
    background_last: bool = True         # detectron2 puts the background logit last
    num_attributes: int = 400            # (+1 "no attribute" logit at index 0)
    attr_embed_dim: int = 256
    attr_hidden_dim: int = 512
    # which boxes are kept (as the original extractor: per-class NMS, then max class score)
    boxes: str = "adaptive"              # adaptive | fixed:K | given
    nms: float = 0.3
    conf_thresh: float = 0.2
    min_boxes: int = 10
    max_boxes: int = 100
    regress_boxes: bool = False          # False: report the proposal boxes the features come from
    # what a region's features see: "image", the whole image (the backbone's receptive field reaches
    # past the box, as in the published extractor), or "box", the image with every pixel outside
    # the box set to the mean pixel (one more backbone pass per box)
    region_input: str = "image"
    # grid features: res5 over the whole C4 map, average-pooled to this grid
    grid_size: tuple = (7, 7)
    amp: bool = False
    # bad-image policy
    max_pixels: int = MAX_PIXELS         # larger images are refused (decompression-bomb guard)
    min_image_side: int = 10             # smaller images carry no content worth a feature

    def __post_init__(self):
        self.pixel_mean_bgr = tuple(float(v) for v in self.pixel_mean_bgr)
        self.anchor_sizes = tuple(self.anchor_sizes)
        self.anchor_ratios = tuple(self.anchor_ratios)
        self.grid_size = tuple(self.grid_size)
        self.fixed_boxes  # validates ``boxes``
        if self.region_input not in REGION_INPUTS:
            raise ValueError(f"region_input must be one of {list(REGION_INPUTS)}, got {self.region_input!r}")
        if self.depth not in RESNET_BLOCKS:
            raise ValueError(f"depth must be one of {sorted(RESNET_BLOCKS)}, got {self.depth}")
        if not 0 < self.min_boxes <= self.max_boxes:
            raise ValueError(f"need 0 < min_boxes <= max_boxes, got {self.min_boxes}, {self.max_boxes}")

    @property
    def fixed_boxes(self) -> int | None:
        """K for ``fixed:K``, else None."""
        if self.boxes in ("adaptive", "given"):
            return None
        kind, _, k = self.boxes.partition(":")
        if kind != "fixed" or not k.isdigit() or int(k) < 1:
            raise ValueError(f"boxes must be 'adaptive', 'given' or 'fixed:K' (K >= 1), got {self.boxes!r}")
        return int(k)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def settings_for(self, kind: str) -> dict:
        """The settings that shape one kind of output; its shards' config hash covers only
        these, so changing the box rule does not invalidate grid shards (and vice versa)."""
        drop = {"regions": GRID_ONLY, "grid": REGION_ONLY}[kind]
        return {k: v for k, v in self.to_dict().items()
                if k not in drop and not (k in ADDED_LATER and v == ADDED_LATER[k])}

    def shard_hash(self, kind: str, weights_sha256: str) -> str:
        """The config hash shards of ``kind`` are registered under in shards.json."""
        return config_hash({"extractor": self.settings_for(kind), "weights": weights_sha256})

    @classmethod
    def from_dict(cls, d: dict) -> "ExtractorConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown extractor settings {unknown}")
        return cls(**d)


# blocks per stage res2..res5
RESNET_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}

REGION_INPUTS = ("image", "box")

# settings added after shards were first written: left out of the hash while at their default, so
# the shards written before them stay current
ADDED_LATER = {"region_input": "image"}

GRID_ONLY = frozenset({"grid_size"})
REGION_ONLY = frozenset({
    "anchor_sizes", "anchor_ratios", "anchor_offset", "rpn_channels", "rpn_pre_nms_topk",
    "rpn_post_nms_topk", "rpn_nms", "rpn_min_size", "pooler", "pooler_resolution",
    "pooler_sampling_ratio", "num_classes", "bbox_reg_classes", "background_last", "num_attributes",
    "attr_embed_dim", "attr_hidden_dim", "boxes", "nms", "conf_thresh", "min_boxes", "max_boxes",
    "regress_boxes", "region_input"})
