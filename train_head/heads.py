"""Head kinds by name (`head.kind`): the one table fit-head, run loading and the CLI's choices come from.

Importing this module does not import torch (each builder imports its head when called), so the CLI can list
and check the kinds in its help and flag parsing without paying torch's start-up time.
"""

from __future__ import annotations

from collections.abc import Callable
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


HEADS: dict[str, HeadBuilder] = {"conv": _conv, "linear": _linear, "pixel-mlp": _pixel_mlp, "conv-image": _conv_image}


def head_kinds() -> list[str]:
    return list(HEADS)


def check_kind(kind: str) -> str:
    """pathseg/config.py cannot import train_head/, so `head.kind` is checked here, where the kinds live."""
    if kind not in HEADS:
        raise PathsegError(f"head.kind {kind!r} is not one of {', '.join(HEADS)}")
    return kind


def build_head(kind: str, in_channels: list[int], num_classes: int, head_settings: dict[str, Any]) -> HeadBase:
    """A fresh head of `kind`. Settings a record lacks take HeadConfig's defaults: a run saved before a key
    existed did not use it (old runs are all `conv`, whose keys they all have)."""
    builder = HEADS[check_kind(kind)]
    settings = {**HeadConfig().model_dump(), **head_settings}
    return builder(list(in_channels), num_classes, settings)


# The head settings each kind reads. A run's key holds the others at their defaults, so sweeping a setting a
# kind ignores (head.ensemble for a conv head) reuses that kind's runs instead of training identical heads.
KIND_SETTINGS: dict[str, set[str]] = {
    "conv": {"width", "depth", "dropout", "projection_width"},
    "linear": set(),
    "pixel-mlp": {"mlp_hidden", "ensemble", "pixels_per_tile"},
    "conv-image": {"width", "depth", "dropout", "projection_width"},
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
    return keyed
