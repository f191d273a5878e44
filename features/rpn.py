"""Region proposal network on one feature map (detectron2's StandardRPNHead layout)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import boxes as box_ops


class AnchorGenerator(nn.Module):
    """Anchors of every size x ratio at every position of a stride-``stride`` map, ordered
    (y, x, anchor) to match the head's output layout."""

    def __init__(self, sizes, ratios, stride, offset=0.0):
        super().__init__()
        self.stride, self.offset = stride, offset
        cell = []
        for size in sizes:  # size-major order, as detectron2
            for ratio in ratios:
                w = math.sqrt(size * size / ratio)
                h = ratio * w
                cell.append([-w / 2, -h / 2, w / 2, h / 2])
        self.register_buffer("cell", torch.tensor(cell), persistent=False)

    @property
    def num_anchors(self) -> int:
        return len(self.cell)

    def forward(self, height: int, width: int) -> torch.Tensor:
        s, dev = self.stride, self.cell.device
        ys = torch.arange(height, device=dev, dtype=torch.float32) * s + self.offset * s
        xs = torch.arange(width, device=dev, dtype=torch.float32) * s + self.offset * s
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        shifts = torch.stack([xx, yy, xx, yy], dim=-1).reshape(-1, 1, 4)
        return (shifts + self.cell.view(1, -1, 4)).reshape(-1, 4)


class RPNHead(nn.Module):
    def __init__(self, in_channels, channels, num_anchors):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.objectness_logits = nn.Conv2d(channels, num_anchors, 1)
        self.anchor_deltas = nn.Conv2d(channels, num_anchors * 4, 1)

    def forward(self, x):
        t = F.relu(self.conv(x))
        return self.objectness_logits(t), self.anchor_deltas(t)


class RegionProposalNetwork(nn.Module):
    """Scores every anchor, keeps the top ``pre_nms_topk``, decodes and clips them, drops tiny
    ones, runs NMS and returns at most ``post_nms_topk`` boxes per image (in input pixels)."""

    def __init__(self, in_channels, stride, *, channels=512, sizes=(32, 64, 128, 256, 512),
                 ratios=(0.5, 1.0, 2.0), offset=0.0, pre_nms_topk=6000, post_nms_topk=300,
                 nms_thresh=0.7, min_size=0.0):
        super().__init__()
        self.anchor_generator = AnchorGenerator(sizes, ratios, stride, offset)
        self.rpn_head = RPNHead(in_channels, channels, self.anchor_generator.num_anchors)
        self.box_coder = BoxCoder((1.0, 1.0, 1.0, 1.0), bbox_xform_clip=math.log(1000.0 / 16))
        self.pre_nms_topk, self.post_nms_topk = pre_nms_topk, post_nms_topk
        self.nms_thresh, self.min_size = nms_thresh, min_size

    def forward(self, features: torch.Tensor, image_sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
        logits, deltas = self.rpn_head(features)
        n, a, h, w = logits.shape
        logits = logits.permute(0, 2, 3, 1).reshape(n, -1)                       # (y, x, anchor)
        deltas = deltas.view(n, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4)
        anchors = self.anchor_generator(h, w)
        proposals = []
        for i, size in enumerate(image_sizes):
            scores, idx = logits[i].float().topk(min(self.pre_nms_topk, logits.shape[1]))
            boxes = self.box_coder.decode_single(deltas[i, idx].float(), anchors[idx])
            boxes = box_ops.clip_boxes_to_image(boxes, size)
            keep = box_ops.remove_small_boxes(boxes, max(self.min_size, 1e-3))
            keep = keep[torch.isfinite(boxes[keep]).all(1) & torch.isfinite(scores[keep])]
            keep = keep[box_ops.nms(boxes[keep], scores[keep], self.nms_thresh)][: self.post_nms_topk]
            proposals.append(boxes[keep])
        return proposals
