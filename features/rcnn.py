"""The bottom-up attention Faster R-CNN: ResNet C4 backbone, RPN, Res5 ROI head with object and
attribute predictors, plus grid features from the same backbone pass."""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import boxes as box_ops

from features.backbone import ResNetC4
from features.config import RESNET_BLOCKS, ExtractorConfig
from features.profile import no_stages
from features.roi_heads import Res5ROIHeads, max_class_scores, select_boxes
from features.rpn import RegionProposalNetwork


class BottomUpRCNN(nn.Module):
    def __init__(self, cfg: ExtractorConfig):
        super().__init__()
        self.cfg = cfg
        blocks = RESNET_BLOCKS[cfg.depth]
        self.backbone = ResNetC4(blocks[:3], cfg.stride_in_1x1, cfg.caffe_maxpool)
        self.proposal_generator = RegionProposalNetwork(
            ResNetC4.out_channels, ResNetC4.stride, channels=cfg.rpn_channels,
            sizes=cfg.anchor_sizes, ratios=cfg.anchor_ratios, offset=cfg.anchor_offset,
            pre_nms_topk=cfg.rpn_pre_nms_topk, post_nms_topk=cfg.rpn_post_nms_topk,
            nms_thresh=cfg.rpn_nms, min_size=cfg.rpn_min_size)
        self.roi_heads = Res5ROIHeads(
            stride=ResNetC4.stride, pooler=cfg.pooler, resolution=cfg.pooler_resolution,
            sampling_ratio=cfg.pooler_sampling_ratio, stride_in_1x1=cfg.stride_in_1x1,
            res5_dilation=cfg.res5_dilation,
            num_classes=cfg.num_classes, bbox_reg_classes=cfg.bbox_reg_classes,
            num_attributes=cfg.num_attributes, attr_embed_dim=cfg.attr_embed_dim,
            attr_hidden_dim=cfg.attr_hidden_dim, background_last=cfg.background_last)
        self.box_coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
        self.register_buffer("pixel_mean", torch.tensor(cfg.pixel_mean_bgr).view(3, 1, 1), persistent=False)
        self.memory_format = torch.contiguous_format
        self.eval()

    def channels_last(self) -> "BottomUpRCNN":
        """NHWC weights and inputs: faster convolutions on tensor-core GPUs, the same numbers up
        to float rounding."""
        self.memory_format = torch.channels_last
        return self.to(memory_format=torch.channels_last)

    @torch.no_grad()
    def forward(self, images: list[torch.Tensor], orig_sizes: list[tuple[int, int]],
                given_boxes: list[torch.Tensor] | None = None, regions: bool = True,
                grid: bool = True, stages=no_stages) -> list[dict]:
        """``images``: resized uint8 BGR [3, h, w] tensors; ``orig_sizes``: (H, W) before resizing;
        ``given_boxes``: optional [n, 4] boxes per image in original pixels. Returns per image
        ``features``/``boxes`` (original pixels)/labels/scores when ``regions``, ``grid`` when grid.
        ``stages`` times each stage (``features.profile.Stages``)."""
        out = [dict() for _ in images]
        for group in _same_size_groups(images):
            # copied one by one: an image the DataLoader pinned is copied asynchronously
            dev = self.pixel_mean.device
            x = torch.stack([images[i].to(dev, non_blocking=True) for i in group])
            x = (x.float() - self.pixel_mean).contiguous(memory_format=self.memory_format)
            with self._autocast(x.device):
                with stages("backbone"):
                    c4 = self.backbone(x)
                if grid:
                    with stages("grid head"):
                        g = self.roi_heads.grid_features(c4, self.cfg.grid_size).float()
                    for j, i in enumerate(group):
                        out[i]["grid"] = g[j]
                if regions:
                    sizes = [tuple(images[i].shape[1:]) for i in group]
                    with stages("rpn"):
                        proposals = (self.proposal_generator(c4, sizes) if given_boxes is None else
                                     [self._to_input_pixels(given_boxes[i], images[i], orig_sizes[i]) for i in group])
                    for j, i in enumerate(group):
                        given = None if given_boxes is None else given_boxes[i]
                        out[i].update(self._regions(c4[j:j + 1], x[j], proposals[j], sizes[j], orig_sizes[i],
                                                    given, stages))
        return out

    def _regions(self, c4, x, proposals, size, orig_size, given, stages=no_stages) -> dict:
        """``x``: the image's mean-subtracted input, for ``region_input="box"``."""
        cfg, heads = self.cfg, self.roi_heads
        if given is None:  # too few proposals (tiny image, degenerate scores): pad with the whole image
            need = (cfg.fixed_boxes or 1) - len(proposals)
            if need > 0:
                whole = torch.tensor([[0.0, 0.0, size[1], size[0]]], device=c4.device)
                proposals = torch.cat([proposals, whole.expand(need, 4)])
        box_only = cfg.region_input == "box"
        with stages("box head"):
            if box_only and given is not None:   # nothing to select: pool the given boxes once, each alone
                features = self._box_only_features(x, proposals, stages)
            else:
                features = heads.region_features(c4, [proposals]).float()
            cls_logits, deltas = heads.box_predictor(features)
            fg = heads.foreground_probs(cls_logits)
        with stages("box selection"):
            if given is None:
                keep = select_boxes(max_class_scores(proposals, fg, cfg.nms), cfg.conf_thresh,
                                    cfg.min_boxes, cfg.max_boxes, cfg.fixed_boxes)
            else:
                keep = torch.arange(len(proposals), device=c4.device)
        features, fg = features[keep], fg[keep]
        if box_only and given is None:   # detections were selected on the whole image; describe each alone
            features = self._box_only_features(x, proposals[keep], stages)
            fg = heads.foreground_probs(heads.box_predictor(features)[0])
        obj_scores, obj_labels = fg.max(dim=1) if len(fg) else (fg.new_zeros(0), fg.new_zeros(0, dtype=torch.long))
        with stages("attributes"):
            attr_labels, attr_scores = heads.attributes(features, obj_labels)
        if given is not None:
            boxes = given.float()
        else:
            boxes = proposals[keep].float()
            if cfg.regress_boxes:
                boxes = self._regress(boxes, deltas[keep].float(), obj_labels, size)
            boxes = self._to_original_pixels(boxes, size, orig_size)
        return {"features": features, "boxes": boxes, "obj_labels": obj_labels, "obj_scores": obj_scores,
                "attr_labels": attr_labels, "attr_scores": attr_scores}

    def _box_only_features(self, x, boxes, stages=no_stages) -> torch.Tensor:
        """Region features of ``boxes`` (input pixels), each from its own backbone pass over ``x``
        with every pixel outside the box set to the mean pixel (0 after the mean is subtracted), so
        nothing outside a box reaches its features."""
        out = [x.new_zeros(0, self.roi_heads.box_predictor.cls_score.in_features)]
        for chunk in boxes.split(BOX_ONLY_BATCH):
            masked = x.unsqueeze(0) * box_masks(chunk, x.shape[1:]).unsqueeze(1).to(x.dtype)
            with stages("backbone"):
                c4 = self.backbone(masked.contiguous(memory_format=self.memory_format))
            out.append(self.roi_heads.region_features(c4, list(chunk.unsqueeze(1))).float())
        return torch.cat(out)

    def _regress(self, boxes, deltas, labels, size):
        n_reg = self.cfg.bbox_reg_classes
        col = (torch.zeros_like(labels) if n_reg == 1 else
               self.roi_heads.class_logit_index(labels) if n_reg == self.cfg.num_classes + 1 else labels)
        d = deltas.view(len(boxes), n_reg, 4)[torch.arange(len(boxes)), col]
        return box_ops.clip_boxes_to_image(self.box_coder.decode_single(d, boxes), size)

    @staticmethod
    def _scale(size, orig_size, device):
        sy, sx = size[0] / orig_size[0], size[1] / orig_size[1]
        return torch.tensor([sx, sy, sx, sy], device=device)

    def _to_input_pixels(self, boxes, image, orig_size):
        boxes = boxes.to(self.pixel_mean.device).float()
        return boxes * self._scale(tuple(image.shape[1:]), orig_size, boxes.device)

    def _to_original_pixels(self, boxes, size, orig_size):
        return box_ops.clip_boxes_to_image(boxes / self._scale(size, orig_size, boxes.device), orig_size)

    def _autocast(self, device):
        if not self.cfg.amp:
            return contextlib.nullcontext()
        dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
        return torch.autocast(device.type, dtype=dtype)


BOX_ONLY_BATCH = 16   # masked copies of one image per backbone pass


def box_masks(boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[n, h, w] booleans: the pixels each box (x1, y1, x2, y2, in pixels) touches."""
    h, w = size
    ys = torch.arange(h, device=boxes.device).view(1, h, 1) + 0.5
    xs = torch.arange(w, device=boxes.device).view(1, 1, w) + 0.5
    x1, y1, x2, y2 = (boxes[:, k].view(-1, 1, 1) for k in range(4))
    # a pixel counts when the box covers any part of it: [floor(x1), ceil(x2)) on each axis
    return ((xs > x1.floor()) & (xs < x2.ceil())) & ((ys > y1.floor()) & (ys < y2.ceil()))


def _same_size_groups(images) -> list[list[int]]:
    """Images are batched only with images of the same size, so no padding ever changes a result."""
    groups: dict[tuple, list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(tuple(im.shape), []).append(i)
    return list(groups.values())
