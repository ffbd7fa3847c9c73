"""`head.kind: fcn8-vgg16`: FCN-8s (Long, Shelhamer & Darrell, CVPR 2015) on VGG16, trained end to end on pixels.

The PathSegDiff paper compares its diffusion features with supervised networks that see only the tile, and
FCN-8s is one of them. It is written here in plain torch because torchvision cannot be imported next to the
project's torch; the VGG16 trunk keeps torchvision's parameter names (`features.0.weight` ... `features.28.bias`)
so a local `vgg16-397923af.pth` loads without renaming.

Structure, as in the paper: VGG16's 13 convolutions and 5 poolings; fc6 and fc7 as convolutions (7x7 512->4096,
1x1 4096->4096, each ReLU + dropout 0.5) so torchvision's `classifier.0`/`classifier.3` matrices reshape into
them; 1x1 class scores on fc7, pool4 and pool3; a 2x transposed convolution of the fc7 scores added to the pool4
scores, another 2x added to the pool3 scores, then 8x to the tile. All three upsamplings start as bilinear
interpolation and are learned (the paper fixed the last one; learning it costs nothing and never hurt there).

Alignment differs from the Caffe original, which padded conv1_1 by 100 pixels and cropped every fused map by
hand-computed offsets so that any input size worked with an unpadded fc6. Here fc6 is padded by 3, keeping
pool5's size, and each transposed convolution is padded so it doubles (or multiplies by 8) a size exactly; the
tile is zero-padded (after ImageNet normalisation, so with the ImageNet mean colour) up to a multiple of 32 and
the logits are cropped back. The same maps come out without the 100-pixel margin that made the original spend
most of its fc6 work on padding.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pathseg.train_head.head_base import HeadBase
from torch import nn
from torch.nn import functional as F

from pathseg.errors import PathsegError
from pathseg.loading.checkpoints import load_checkpoint
from pathseg.loading.data_files import read_safetensors

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision's vgg16().features: the channels of each convolution, "M" for a 2x2 max-pooling
VGG16_LAYOUT: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512,
                                 "M"]
POOL3, POOL4 = 16, 23  # indices of the poolings whose outputs FCN-8s scores (1/8 and 1/16 of the tile)
STRIDE = 32  # pool5's stride: tiles are padded to a multiple of it
FC_WIDTH = 4096
VGG16_FILE = "torchvision's vgg16 weights (vgg16-397923af.pth)"


class VGG16Features(nn.Module):
    """torchvision's `vgg16().features`, parameter for parameter, so its ImageNet weights load by name."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for entry in VGG16_LAYOUT:
            if entry == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(channels, int(entry), kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                channels = int(entry)
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """pool3, pool4 and pool5: the three maps FCN-8s scores."""
        taps = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in (POOL3, POOL4):
                taps.append(x)
        return taps[0], taps[1], x


def bilinear_kernel(channels: int, factor: int) -> torch.Tensor:
    """A (C, C, 2f, 2f) transposed-convolution weight that upsamples each channel by `factor` bilinearly (FCN's
    initialisation): class scores are upsampled independently, so off-diagonal channel pairs are zero."""
    size = 2 * factor
    centre = factor - 0.5
    ramp = 1 - (torch.arange(size, dtype=torch.float32) - centre).abs() / factor
    kernel = torch.zeros(channels, channels, size, size)
    kernel[range(channels), range(channels)] = ramp[:, None] * ramp[None, :]
    return kernel


def _upsampling(channels: int, factor: int) -> nn.ConvTranspose2d:
    # kernel 2f, stride f, padding f/2: the output is exactly f times the input, so no crop is needed
    layer = nn.ConvTranspose2d(channels, channels, 2 * factor, stride=factor, padding=factor // 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(bilinear_kernel(channels, factor))
    return layer


class FCN8s(nn.Module):
    """FCN-8s on normalised images whose sides are multiples of 32; `FCN8VGG16Head` pads to that."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.vgg = VGG16Features()
        self.fc6 = nn.Conv2d(512, FC_WIDTH, kernel_size=7, padding=3)
        self.fc7 = nn.Conv2d(FC_WIDTH, FC_WIDTH, kernel_size=1)
        self.drop6 = nn.Dropout(0.5)
        self.drop7 = nn.Dropout(0.5)
        self.score_fr = nn.Conv2d(FC_WIDTH, num_classes, kernel_size=1)
        self.score_pool4 = nn.Conv2d(512, num_classes, kernel_size=1)
        self.score_pool3 = nn.Conv2d(256, num_classes, kernel_size=1)
        self.upscore2 = _upsampling(num_classes, 2)
        self.upscore_pool4 = _upsampling(num_classes, 2)
        self.upscore8 = _upsampling(num_classes, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pool3, pool4, pool5 = self.vgg(x)
        fc7 = self.drop7(F.relu(self.fc7(self.drop6(F.relu(self.fc6(pool5)))), inplace=True))
        fuse_pool4 = self.upscore2(self.score_fr(fc7)) + self.score_pool4(pool4)
        fuse_pool3 = self.upscore_pool4(fuse_pool4) + self.score_pool3(pool3)
        return self.upscore8(fuse_pool3)


class FCN8VGG16Head(HeadBase):
    """FCN-8s as a head: takes the tile's RGB alone (the loader's last input) and returns full-size logits."""

    needs_image = True
    logits_upsample_last = False  # the logits come from the pixels at tile size, not from a coarse map

    def __init__(self, num_classes: int, encoder_weights: Path | str | None = None,
                 trust_checkpoint: bool = False) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.fcn = FCN8s(num_classes)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        if encoder_weights is not None:
            self.load_vgg16(Path(encoder_weights), trust_checkpoint)

    def load_vgg16(self, path: Path, trust: bool = False) -> None:
        """ImageNet VGG16 from a local torchvision file: features by name, classifier.0/3 into fc6/fc7, the
        1000-class classifier.6 dropped."""
        fcn = self.fcn
        targets = dict(fcn.vgg.state_dict())
        for key, layer in (("classifier.0", fcn.fc6), ("classifier.3", fcn.fc7)):
            targets |= {f"{key}.{kind}": tensor for kind, tensor in layer.state_dict().items()}
        load_torchvision_tensors(targets, path, ("classifier.6.",), VGG16_FILE, trust)

    def forward(self, inputs: list[torch.Tensor], output_size: int) -> torch.Tensor:
        return run_on_image(self.fcn, pixel_input(inputs), output_size, self.mean, self.std)


def pixel_input(inputs: list[torch.Tensor]) -> torch.Tensor:
    """The tile's RGB, the only input a pixels-only baseline takes; more inputs mean features were wired in by
    mistake, which would otherwise be ignored without a word."""
    if len(inputs) != 1:
        raise ValueError(f"a pixels-only head takes exactly one input (the tile's RGB), got {len(inputs)}")
    return inputs[-1]


def run_on_image(network: nn.Module, image: torch.Tensor, output_size: int, mean: torch.Tensor,
                 std: torch.Tensor) -> torch.Tensor:
    """`network`'s logits for RGB in [-1, 1]: normalised as ImageNet weights expect, padded to a multiple of 32
    (both networks halve five times and must meet their own skips), cropped back and resized to `output_size`."""
    x = ((image + 1) / 2 - mean) / std
    height, width = x.shape[-2:]
    x = F.pad(x, (0, -width % STRIDE, 0, -height % STRIDE))  # zeros: the ImageNet mean colour
    logits = network(x)[..., :height, :width]
    if (height, width) != (output_size, output_size):
        logits = F.interpolate(logits, size=(output_size, output_size), mode="bilinear", align_corners=False)
    return logits


def read_torchvision_weights(path: Path, what: str, trust: bool = False) -> dict[str, torch.Tensor]:
    """A local torchvision state dict, from a PyTorch file (read by the safe loader) or a .safetensors file."""
    if not path.is_file():
        raise PathsegError(f"{path} does not exist; pass {what}")
    if path.suffix == ".safetensors":
        loaded = read_safetensors(path, f"pass {what}")
    else:
        loaded = load_checkpoint(path, what, trust=trust)
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise PathsegError(f"{path} does not hold a plain state dict of tensors; pass {what}")
    return {str(key): value for key, value in loaded.items()}


def load_torchvision_tensors(targets: dict[str, torch.Tensor], path: Path, dropped: tuple[str, ...], what: str,
                             trust: bool = False) -> None:
    """Copies a torchvision file's tensors into `targets`: torchvision's key -> the state-dict tensor (sharing the
    module's storage) that takes it.

    Keys starting with one of `dropped` (the ImageNet classifier) are ignored. A 2-D file matrix fills a 4-D
    convolution of the same size (VGG's fully connected layers as fc6/fc7). Every key is checked before anything
    is copied, so a wrong file leaves the head as it was. BatchNorm's `num_batches_tracked` may be absent: older
    torchvision files predate it, and it does not change what the network computes.
    """
    state = read_torchvision_weights(path, what, trust)
    unexpected, misshaped = [], []
    for key, tensor in state.items():
        if key.startswith(dropped):
            continue
        target = targets.get(key)
        if target is None:
            unexpected.append(key)
            continue
        wanted = tuple(target.shape)
        if tensor.dim() == 2 and target.dim() == 4:  # a fully connected layer that is a convolution here
            wanted = (wanted[0], target[0].numel())
        if tuple(tensor.shape) != wanted:
            misshaped.append(f"{key} {tuple(tensor.shape)}, wanted {wanted}")
    missing = [key for key in targets if key not in state and not key.endswith("num_batches_tracked")]
    for problem, keys in (("unexpected keys", unexpected), ("mis-shaped keys", misshaped), ("missing keys", missing)):
        if keys:
            shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
            raise PathsegError(f"{path} does not fit this network ({problem}: {shown}); pass {what}")
    with torch.no_grad():
        for key, target in targets.items():
            if key in state:
                target.copy_(state[key].reshape(target.shape))
