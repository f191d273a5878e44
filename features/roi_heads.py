"""Res5 ROI head: pool each box from C4, run res5, mean-pool to a 2048-d region feature; then the
1601-way classifier, class-specific box regression and the attribute predictor."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import RoIAlign, RoIPool
from torchvision.ops import boxes as box_ops

from features.backbone import make_res5

POOLERS = {
    "roi_align": lambda res, scale, ratio: RoIAlign(res, scale, ratio, aligned=False),
    "roi_align_v2": lambda res, scale, ratio: RoIAlign(res, scale, ratio, aligned=True),
    "roi_pool": lambda res, scale, ratio: RoIPool(res, scale),
}


class BoxPredictor(nn.Module):
    def __init__(self, in_dim, num_classes, bbox_reg_classes):
        super().__init__()
        self.cls_score = nn.Linear(in_dim, num_classes + 1)
        self.bbox_pred = nn.Linear(in_dim, bbox_reg_classes * 4)

    def forward(self, x):
        return self.cls_score(x), self.bbox_pred(x)


class AttributePredictor(nn.Module):
    """Embedding of the predicted object class, concatenated with the region feature, through one
    hidden layer to the attribute logits (index 0 is "no attribute")."""

    def __init__(self, in_dim, num_classes, num_attributes, embed_dim=256, hidden_dim=512):
        super().__init__()
        self.obj_embed = nn.Embedding(num_classes + 1, embed_dim)
        self.fc = nn.Sequential(nn.Linear(in_dim + embed_dim, hidden_dim), nn.ReLU())
        self.attr_score = nn.Linear(hidden_dim, num_attributes + 1)

    def forward(self, x, obj_labels):
        return self.attr_score(self.fc(torch.cat([x, self.obj_embed(obj_labels)], dim=1)))


class Res5ROIHeads(nn.Module):
    def __init__(self, *, stride=16, pooler="roi_align", resolution=14, sampling_ratio=0,
                 stride_in_1x1=True, res5_dilation=1, num_classes=1600, bbox_reg_classes=1601, num_attributes=400,
                 attr_embed_dim=256, attr_hidden_dim=512, background_last=True):
        super().__init__()
        if pooler not in POOLERS:
            raise ValueError(f"unknown pooler {pooler!r}; known: {', '.join(POOLERS)}")
        self.pooler = POOLERS[pooler](resolution, 1.0 / stride, sampling_ratio)
        self.res5 = make_res5(3, stride_in_1x1, res5_dilation)
        self.box_predictor = BoxPredictor(2048, num_classes, bbox_reg_classes)
        self.attribute_predictor = AttributePredictor(2048, num_classes, num_attributes,
                                                      attr_embed_dim, attr_hidden_dim)
        self.num_classes, self.background_last = num_classes, background_last

    def region_features(self, c4: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:
        """[sum of boxes, 2048] features of boxes given in input pixels, one list entry per image."""
        pooled = self.pooler(c4, [b.to(c4.dtype) for b in boxes])
        return self.res5(pooled).mean(dim=(2, 3))

    def grid_features(self, c4: torch.Tensor, grid_size) -> torch.Tensor:
        """res5 over the whole map, average-pooled to ``grid_size``: [N, gh*gw, 2048]."""
        x = F.adaptive_avg_pool2d(self.res5(c4), grid_size)
        return x.flatten(2).transpose(1, 2)

    def foreground_probs(self, logits: torch.Tensor) -> torch.Tensor:
        probs = F.softmax(logits.float(), dim=1)
        return probs[:, :-1] if self.background_last else probs[:, 1:]

    def class_logit_index(self, fg_labels: torch.Tensor) -> torch.Tensor:
        """Foreground label (0..num_classes-1) -> its row in the classifier / class embedding."""
        return fg_labels if self.background_last else fg_labels + 1

    def attributes(self, features, fg_labels) -> tuple[torch.Tensor, torch.Tensor]:
        """Best attribute (0-based, "no attribute" excluded) and its probability."""
        logits = self.attribute_predictor(features, self.class_logit_index(fg_labels))
        scores, labels = F.softmax(logits.float(), dim=1)[:, 1:].max(dim=1)
        return labels, scores


def max_class_scores(boxes: torch.Tensor, fg_probs: torch.Tensor, nms_thresh: float) -> torch.Tensor:
    """For each box, its best class score among the classes for which it survives per-class NMS
    (0 where it survives none): the ranking of the original bottom-up extractor."""
    best = torch.zeros(len(boxes), dtype=fg_probs.dtype, device=fg_probs.device)
    boxes = boxes.float()
    # Classes in order of their top score; a class none of whose scores beats the current best
    # of its box cannot change the result, so most of the 1600 NMS runs are skipped (exactly).
    for c in fg_probs.max(dim=0).values.argsort(descending=True).tolist():
        scores = fg_probs[:, c]
        if not bool((scores > best).any()):
            continue
        keep = box_ops.nms(boxes, scores, nms_thresh)
        best[keep] = torch.maximum(best[keep], scores[keep])
    return best


def select_boxes(max_conf: torch.Tensor, conf_thresh: float, min_boxes: int, max_boxes: int,
                 fixed: int | None = None) -> torch.Tensor:
    """Indices of the kept boxes, best first: those scoring >= ``conf_thresh``, clipped to
    [min_boxes, max_boxes], or exactly the ``fixed`` best (fewer only if fewer exist)."""
    order = torch.sort(max_conf, descending=True, stable=True).indices
    if fixed is not None:
        return order[:fixed]
    n = int((max_conf >= conf_thresh).sum())
    return order[: min(max(n, min_boxes), max_boxes)]
