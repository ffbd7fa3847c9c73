"""What every head offers fit-head: a forward pass for whole tiles and a training step's outputs.

fit-head calls `training_outputs` for every head kind, so a head that trains on dense tile logits (conv, linear)
and one that trains on sampled pixels (pixel-mlp) share one training loop, one loss and one optimizer.
"""

from __future__ import annotations

import torch
from pathseg.train_head.head import SegmentationHead
from torch import nn


class HeadBase(nn.Module):
    """`head(features, output_size) -> (B, K, T, T)` logits; `num_classes` is set by the subclass."""

    num_classes: int
    # True when the head's last step is a bilinear upsampling of its logits from the finest map's size: predict on
    # slides then keeps logits at that size and upsamples while blending, with the same result. A head that is
    # nonlinear per output pixel (pixel-mlp) sets False and is run at the tile size.
    logits_upsample_last: bool = True
    # True when the head also takes the tile's RGB, as the last input (image_head.py): loaders append it
    needs_image: bool = False

    def training_outputs(
        self,
        features: list[torch.Tensor],
        labels: torch.Tensor,
        output_size: int,
        generator: torch.Generator | None = None,
        ignore_index: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, targets) in the shapes `segmentation_loss` takes; dense heads score every pixel of the tile,
        so the targets are the labels as given and `generator`/`ignore_index` are not needed."""
        return self(features, output_size), labels


class ConvHead(HeadBase, SegmentationHead):
    """The `conv` kind: SegmentationHead as it always was (same parameters and state-dict keys, so runs saved
    before the registry existed load into it), with the shared training step."""
