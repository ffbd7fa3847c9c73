"""Datasets by name; `build_dataset` is the one way stages get one from the config."""

from __future__ import annotations

from collections.abc import Callable

from pathseg.config import DatasetConfig
from pathseg.datasets.base import ImageRecord, SegmentationDataset
from pathseg.datasets.bcss import build_bcss
from pathseg.datasets.folder import build_folder
from pathseg.datasets.glas import build_glas
from pathseg.datasets.synthetic import build_synthetic
from pathseg.registry import Registry

DATASETS: Registry[Callable[[DatasetConfig], SegmentationDataset]] = Registry("dataset")
DATASETS.register("glas")(build_glas)
DATASETS.register("synthetic")(build_synthetic)
DATASETS.register("bcss")(build_bcss)
DATASETS.register("folder")(build_folder)


def build_dataset(config: DatasetConfig) -> SegmentationDataset:
    return DATASETS.get(config.name)(config)


__all__ = ["DATASETS", "ImageRecord", "SegmentationDataset", "build_dataset"]
