"""`head.kind: conv-image`: the conv head, with the tile's own pixels joined in before the last convolutions.

Features at 1/8 (up2.2) or 1/4 (up3.2) of the tile blur the narrow gaps between touching glands, and the
conv head's bilinear upsampling cannot bring them back. eva's ConvDecoderWithImage reports that adding the
image before the last convolutions is what makes coarse features segment sharply. Here the conv head's trunk
(per-map BatchNorm, projections, 3x3 convolutions) ends in IMAGE_WIDTH channels instead of the classes; those
are upsampled to the tile, concatenated with the tile's RGB in [-1, 1], and two 3x3 conv + BN + ReLU layers at
full resolution, then a 1x1 convolution, give the logits. IMAGE_WIDTH is small because those layers run on
every pixel of the tile: on a CPU they are most of the head's cost.

The image comes as the last element of the input list (the loader, stitching and predict append it), so the
rest of stage 2 passes inputs through unchanged.
"""

from __future__ import annotations

import torch
from pathseg.train_head.head import SegmentationHead
from pathseg.train_head.head_base import HeadBase
from torch import nn
from torch.nn import functional as F

IMAGE_WIDTH = 16


def _conv_block(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True)]


class ImageConvHead(HeadBase):
    needs_image = True
    logits_upsample_last = False  # the last layers are per full-resolution pixel: predict runs it at tile size

    def __init__(self, in_channels: list[int], num_classes: int, width: int = 64, depth: int = 2,
                 dropout: float = 0.0, projection_width: int | None = None) -> None:
        super().__init__()
        self.in_channels = list(in_channels)
        self.num_classes = num_classes
        self.trunk = SegmentationHead(in_channels, IMAGE_WIDTH, width, depth, dropout, projection_width)
        self.refine = nn.Sequential(*_conv_block(IMAGE_WIDTH + 3, IMAGE_WIDTH), *_conv_block(IMAGE_WIDTH, IMAGE_WIDTH))
        self.classifier = nn.Conv2d(IMAGE_WIDTH, num_classes, kernel_size=1)

    def forward(self, inputs: list[torch.Tensor], output_size: int) -> torch.Tensor:
        *features, image = inputs
        fused = self.trunk(features, output_size)  # (B, IMAGE_WIDTH, T, T), bilinear from the finest map
        if image.shape[-1] != output_size:
            image = F.interpolate(image, size=(output_size, output_size), mode="bilinear", align_corners=False)
        return self.classifier(self.refine(torch.cat([fused, image], dim=1)))
