"""Head kinds by name (`head.kind`): the one table fit-head, run loading and the CLI's choices come from.

Importing this module does not import torch (each builder imports its head when called), so the CLI can list
and check the kinds in its help and flag parsing without paying torch's start-up time.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pathseg.config import HeadConfig
from pathseg.errors import PathsegError

if TYPE_CHECKING:
    from pathseg.train_head.head_base import HeadBase

HeadBuilder = Callable[[list[int], int, dict[str, Any]], "HeadBase"]

DEFAULT_KIND = "conv"  # what a run.json written before head kinds existed holds


def _conv(in_channels: list[int], num_classes: int, s: dict[str, Any]) -> HeadBase:
    from pathseg.train_head.head_base import ConvHead

    return ConvHead(in_channels, num_classes, s["width"], s["depth"], s["dropout"], s["projection_width"])


def _linear(in_channels: list[int], num_classes: int, s: dict[str, Any]) -> HeadBase:
    from pathseg.train_head.linear_head import LinearProbeHead

    return LinearProbeHead(in_channels, num_classes)


def _pixel_mlp(in_channels: list[int], num_classes: int, s: dict[str, Any]) -> HeadBase:
    from pathseg.train_head.pixel_mlp import PixelMLPEnsemble

    return PixelMLPEnsemble(in_channels, num_classes, list(s["mlp_hidden"]), s["ensemble"], s["pixels_per_tile"])


def _conv_image(in_channels: list[int], num_classes: int, s: dict[str, Any]) -> HeadBase:
    from pathseg.train_head.image_head import ImageConvHead

    return ImageConvHead(in_channels, num_classes, s["width"], s["depth"], s["dropout"], s["projection_width"])


def _unet_resnet18(in_channels: list[int], num_classes: int, s: dict[str, Any]) -> HeadBase:
    from pathseg.train_head.unet_resnet18 import UNetResNet18Head

    return UNetResNet18Head(num_classes, s.get("imagenet_weights"))


def _fcn8_vgg16(in_channels: list[int], num_classes: int, s: dict[str, Any]) -> HeadBase:
    from pathseg.train_head.fcn8_vgg16 import FCN8VGG16Head

    return FCN8VGG16Head(num_classes, s.get("imagenet_weights"))


HEADS: dict[str, HeadBuilder] = {"conv": _conv, "linear": _linear, "pixel-mlp": _pixel_mlp, "conv-image": _conv_image,
                                 "unet-resnet18": _unet_resnet18, "fcn8-vgg16": _fcn8_vgg16}

# Kinds that take the tile's pixels themselves (the loaders append them as the last input); any other kind takes
# them as one more input map when `rgb` is among its blocks.
PIXEL_KINDS = {"conv-image", "unet-resnet18", "fcn8-vgg16"}
# The paper's supervised baselines: networks trained end to end on the pixels alone, no cached features at all.
PIXEL_ONLY_KINDS = {"unet-resnet18", "fcn8-vgg16"}
PIXEL_CHANNELS = 3


def head_kinds() -> list[str]:
    return list(HEADS)


def check_kind(kind: str) -> str:
    """pathseg/config.py cannot import train_head/, so `head.kind` is checked here, where the kinds live."""
    if kind not in HEADS:
        raise PathsegError(f"head.kind {kind!r} is not one of {', '.join(HEADS)}")
    return kind


def takes_pixels(kind: str, blocks: list[str] | None) -> bool:
    """Whether a head of `kind` on `blocks` (head.blocks, else extract.blocks) is given the tile's pixels."""
    from pathseg.store.names import RGB_BLOCK

    return kind in PIXEL_KINDS or any(name.strip() == RGB_BLOCK for name in blocks or [])


def build_head(kind: str, in_channels: list[int], num_classes: int, head_settings: dict[str, Any],
               pixels: bool = False) -> HeadBase:
    """A fresh head of `kind` on maps of `in_channels`, and on the tile's pixels as one more input when `pixels`
    (a pixel kind takes them anyway). Settings a record lacks take HeadConfig's defaults: a run saved before a
    key existed did not use it (old runs are all `conv`, whose keys they all have)."""
    builder = HEADS[check_kind(kind)]
    if kind in PIXEL_ONLY_KINDS and in_channels:
        raise PathsegError(f"head.kind {kind} trains on the tile's pixels alone; set head.blocks to rgb")
    settings = {**HeadConfig().model_dump(), **head_settings}
    if not pixels or kind in PIXEL_KINDS:
        return builder(list(in_channels), num_classes, settings)
    head = builder([*in_channels, PIXEL_CHANNELS], num_classes, settings)
    head.needs_image = True  # the pixels come last, as the loaders append them
    return head


# The head settings each kind reads. A run's key holds the others at their defaults, so sweeping a setting a
# kind ignores (head.ensemble for a conv head) reuses that kind's runs instead of training identical heads.
KIND_SETTINGS: dict[str, set[str]] = {
    "conv": {"width", "depth", "dropout", "projection_width"},
    "linear": set(),
    "pixel-mlp": {"mlp_hidden", "ensemble", "pixels_per_tile"},
    "conv-image": {"width", "depth", "dropout", "projection_width"},
    "unet-resnet18": {"imagenet_weights"},
    "fcn8-vgg16": {"imagenet_weights"},
}


# What the training target reads, for every kind. A semantic head leaves them out of its key entirely, so the
# runs made before `head.target` existed keep their keys (and ablate reuses them); a contour head keys both.
TARGET_SETTINGS = ("target", "contour_width")


def keyed_settings(head: HeadConfig) -> dict[str, Any]:
    """`head` as a run key sees it: what the kind reads as set, everything else at HeadConfig's defaults."""
    defaults = HeadConfig().model_dump(mode="json")
    settings = head.model_dump(mode="json")
    ignored = set().union(*KIND_SETTINGS.values()) - KIND_SETTINGS.get(head.kind, set())
    keyed = {key: defaults[key] if key in ignored else value for key, value in settings.items()}
    if head.target == "semantic":
        for key in TARGET_SETTINGS:
            keyed.pop(key)
    weights = keyed.pop("imagenet_weights", None)
    if weights is not None:  # a file's bytes decide the head, not where it lies; None stays out (older keys)
        keyed["imagenet_weights_sha256"] = file_sha256(Path(weights))
    return keyed


def file_sha256(path: Path) -> str:
    if not path.is_file():
        raise PathsegError(f"head.imagenet_weights {path} does not exist; pass a local torchvision-layout file")
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
