"""ResNet C4 backbone in the Caffe/detectron2 convention.

Parameter names follow detectron2 (``stem.conv1``, ``res2.0.conv1.norm`` ...), so a detectron2
checkpoint loads by name. Batch norm is frozen: a per-channel affine from stored statistics.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d


class ConvNorm(nn.Conv2d):
    """Bias-free conv followed by a frozen batch norm stored as ``.norm`` (detectron2's naming)."""

    def __init__(self, cin, cout, kernel, stride=1, padding=0, dilation=1):
        super().__init__(cin, cout, kernel, stride=stride, padding=padding, dilation=dilation, bias=False)
        self.norm = FrozenBatchNorm2d(cout)

    def forward(self, x):
        return self.norm(super().forward(x))


class Bottleneck(nn.Module):
    def __init__(self, cin, cout, bottleneck, stride=1, stride_in_1x1=True, dilation=1):
        super().__init__()
        self.shortcut = ConvNorm(cin, cout, 1, stride=stride) if cin != cout or stride != 1 else None
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = ConvNorm(cin, bottleneck, 1, stride=s1)
        self.conv2 = ConvNorm(bottleneck, bottleneck, 3, stride=s3, padding=dilation, dilation=dilation)
        self.conv3 = ConvNorm(bottleneck, cout, 1)

    def forward(self, x):
        out = F.relu_(self.conv1(x))
        out = F.relu_(self.conv2(out))
        out = self.conv3(out)
        out = out + (self.shortcut(x) if self.shortcut is not None else x)
        return F.relu_(out)


def make_stage(blocks, cin, cout, bottleneck, first_stride, stride_in_1x1=True, dilation=1) -> nn.Sequential:
    return nn.Sequential(*[
        Bottleneck(cin if i == 0 else cout, cout, bottleneck, first_stride if i == 0 else 1, stride_in_1x1, dilation)
        for i in range(blocks)])


class Stem(nn.Module):
    def __init__(self, caffe_maxpool=True):
        super().__init__()
        self.conv1 = ConvNorm(3, 64, 7, stride=2, padding=3)
        # Caffe rounds the pooled size up (ceil mode, no padding); detectron2 pads by 1 instead.
        self.pool = (nn.MaxPool2d(3, 2, 0, ceil_mode=True) if caffe_maxpool else nn.MaxPool2d(3, 2, 1))

    def forward(self, x):
        return self.pool(F.relu_(self.conv1(x)))


class ResNetC4(nn.Module):
    """stem -> res2 -> res3 -> res4; output stride 16, 1024 channels. res5 lives in the ROI head."""

    out_channels = 1024
    stride = 16

    def __init__(self, blocks=(3, 4, 23), stride_in_1x1=True, caffe_maxpool=True):
        super().__init__()
        self.stem = Stem(caffe_maxpool)
        self.res2 = make_stage(blocks[0], 64, 256, 64, 1, stride_in_1x1)
        self.res3 = make_stage(blocks[1], 256, 512, 128, 2, stride_in_1x1)
        self.res4 = make_stage(blocks[2], 512, 1024, 256, 2, stride_in_1x1)

    def forward(self, x):
        return self.res4(self.res3(self.res2(self.stem(x))))


def make_res5(blocks=3, stride_in_1x1=True, dilation=1) -> nn.Sequential:
    """res5 with stride 2 (detectron2's C4 head), or, for ``dilation`` > 1, stride 1 with dilated
    3x3 convs: the published Caffe bottom-up model (res5 stays at stride 16, dilation 2)."""
    return make_stage(blocks, 1024, 2048, 512, 1 if dilation > 1 else 2, stride_in_1x1, dilation)
