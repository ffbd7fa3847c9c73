"""`head.kind: unet-resnet18`: MONAI's FlexibleUNet on a ResNet18 encoder, trained end to end on pixels.

The PathSegDiff paper compares its diffusion features with supervised networks that see only the tile; a U-Net
on ResNet18 is one of them. MONAI builds it (segmentation-models-pytorch cannot be imported next to the project's
torch), with its defaults: decoder channels (256, 128, 64, 32, 16), nearest-neighbour upsampling, no pretrained
weights of its own (MONAI's are 3-D MedicalNet ones).

One change to MONAI's encoder: its resnet18 uses the parameter-free "type A" shortcut in the three blocks that
halve the resolution (stride-2 average of the input, zero-padded to the new width, and taken through `.data`,
so no gradient flows along it). torchvision's ResNet18, whose ImageNet weights are the ones anyone has, uses a
1x1 stride-2 convolution + BatchNorm there (`layerN.0.downsample.0/1`). Those blocks are given that projection,
so the encoder is torchvision's ResNet18 layer for layer, its ImageNet weights compute what they were trained to
compute, and gradients reach the stem along the shortcuts too. It adds 173,824 parameters (13,719,554 in all
for two classes, against MONAI's 13,545,730), and the encoder's state-dict keys become exactly torchvision's
without `fc.*`, so a torchvision file loads by name.

MONAI's decoder meets its skips only when the tile's sides are multiples of 32 (a 48-pixel tile fails inside
it), so the tile is padded to one and the logits cropped back (`fcn8_vgg16.run_on_image`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from monai.networks.nets import FlexibleUNet
from pathseg.train_head.fcn8_vgg16 import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    load_torchvision_tensors,
    pixel_input,
    run_on_image,
)
from pathseg.train_head.head_base import HeadBase
from torch import nn

RESNET18_FILE = "torchvision's resnet18 weights (resnet18-f37072fd.pth)"
HALVING_LAYERS = ("layer2", "layer3", "layer4")  # their first block halves the resolution and widens 2x


def _projection_shortcut(block: nn.Module) -> nn.Sequential:
    """torchvision's downsample for a BasicBlock: 1x1 conv with the block's stride, no bias, then BatchNorm."""
    conv = block.conv1
    return nn.Sequential(nn.Conv2d(conv.in_channels, conv.out_channels, kernel_size=1, stride=conv.stride,
                                   bias=False), nn.BatchNorm2d(conv.out_channels))


def build_unet(num_classes: int) -> FlexibleUNet:
    """MONAI's FlexibleUNet (resnet18, 2-D, RGB in) with torchvision's projection shortcuts in the encoder."""
    model = FlexibleUNet(in_channels=3, out_channels=num_classes, backbone="resnet18", pretrained=False,
                         spatial_dims=2)
    for name in HALVING_LAYERS:
        block = getattr(model.encoder, name)[0]
        block.downsample = _projection_shortcut(block)
    return model


class UNetResNet18Head(HeadBase):
    """The U-Net as a head: takes the tile's RGB alone (the loader's last input) and returns full-size logits."""

    needs_image = True
    logits_upsample_last = False  # the logits come from the pixels at tile size, not from a coarse map

    def __init__(self, num_classes: int, encoder_weights: Path | str | None = None,
                 trust_checkpoint: bool = False) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.unet = build_unet(num_classes)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        if encoder_weights is not None:
            self.load_resnet18(Path(encoder_weights), trust_checkpoint)

    def load_resnet18(self, path: Path, trust: bool = False) -> None:
        """ImageNet ResNet18 from a local torchvision file into the encoder; its 1000-class `fc` is dropped."""
        load_torchvision_tensors(dict(self.unet.encoder.state_dict()), path, ("fc.",), RESNET18_FILE, trust)

    def forward(self, inputs: list[torch.Tensor], output_size: int) -> torch.Tensor:
        return run_on_image(self.unet, pixel_input(inputs), output_size, self.mean, self.std)
