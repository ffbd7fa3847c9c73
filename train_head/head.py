"""The segmentation head: a small fully convolutional network over multi-scale cached features."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class SegmentationHead(nn.Module):
    """Per map: BatchNorm (maps of different blocks and timesteps differ in scale) and a 1x1 projection;
    all maps upsampled to the finest one and concatenated; `depth` 3x3 conv + BN + ReLU; 1x1 to logits;
    bilinear upsampling to the tile size."""

    def __init__(
        self,
        in_channels: list[int],
        num_classes: int,
        width: int = 64,
        depth: int = 2,
        dropout: float = 0.0,
        projection_width: int | None = None,
    ) -> None:
        super().__init__()
        self.in_channels = list(in_channels)
        self.num_classes = num_classes
        projection_width = projection_width or width
        self.projections = nn.ModuleList(
            nn.Sequential(nn.BatchNorm2d(c), nn.Conv2d(c, projection_width, kernel_size=1, bias=False))
            for c in in_channels
        )
        layers: list[nn.Module] = []
        channels = projection_width * len(in_channels)
        for _ in range(depth):
            layers += [
                nn.Conv2d(channels, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            channels = width
        if dropout > 0:
            layers.append(nn.Dropout2d(dropout))
        self.body = nn.Sequential(*layers)
        self.classifier = nn.Conv2d(channels, num_classes, kernel_size=1)

    def forward(self, features: list[torch.Tensor], output_size: int) -> torch.Tensor:
        size = max(f.shape[-1] for f in features)
        projected = []
        for projection, feature in zip(self.projections, features, strict=True):
            mapped = projection(feature)
            if mapped.shape[-1] != size:
                mapped = F.interpolate(mapped, size=(size, size), mode="bilinear", align_corners=False)
            projected.append(mapped)
        logits = self.classifier(self.body(torch.cat(projected, dim=1)))
        return F.interpolate(logits, size=(output_size, output_size), mode="bilinear", align_corners=False)
