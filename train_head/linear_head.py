"""The `linear` kind: a 1x1 linear probe on the concatenated feature maps.

A probe measures how linearly decodable the classes are from the cached features, the usual yardstick for
comparing timesteps and blocks: any gain of the conv head over it is the head's, not the features'.
"""

from __future__ import annotations

import torch
from pathseg.train_head.head_base import HeadBase
from torch import nn
from torch.nn import functional as F


class LinearProbeHead(HeadBase):
    """Per map a BatchNorm2d, every map bilinearly upsampled to the finest map's size, concatenated, one 1x1 conv
    to the classes, bilinear upsampling to the tile.

    The BatchNorm is there because maps of different blocks and timesteps differ in scale by orders of magnitude,
    which a single learning rate cannot fit; at eval it is a per-channel affine map, so the probe stays linear in
    the features. Upsampling before the 1x1 conv equals upsampling after it (both are linear, the interpolation
    weights sum to 1); it is done before so the probe reads exactly as described.
    """

    def __init__(self, in_channels: list[int], num_classes: int) -> None:
        super().__init__()
        self.in_channels = list(in_channels)
        self.num_classes = num_classes
        self.norms = nn.ModuleList(nn.BatchNorm2d(c) for c in in_channels)
        self.classifier = nn.Conv2d(sum(in_channels), num_classes, kernel_size=1)

    def forward(self, features: list[torch.Tensor], output_size: int) -> torch.Tensor:
        size = max(f.shape[-1] for f in features)
        maps = []
        for norm, feature in zip(self.norms, features, strict=True):
            mapped = norm(feature)
            if mapped.shape[-1] != size:
                mapped = F.interpolate(mapped, size=(size, size), mode="bilinear", align_corners=False)
            maps.append(mapped)
        logits = self.classifier(torch.cat(maps, dim=1))
        return F.interpolate(logits, size=(output_size, output_size), mode="bilinear", align_corners=False)
