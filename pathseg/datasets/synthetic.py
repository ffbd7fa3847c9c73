"""H&E-like images with gland-like structures, generated from a seed: the pipeline runs with nothing downloaded.

Glands are ellipses with a dense, nucleated epithelial rim around a pale lumen, on a fibrous pink
stroma with scattered nuclei, so a head must learn texture and context, not one colour threshold.
"""

from __future__ import annotations

import functools

import numpy as np
from scipy import ndimage

from pathseg.config import DatasetConfig, SyntheticOptions
from pathseg.datasets.base import ImageRecord, SegmentationDataset

STROMA = np.array([232.0, 176.0, 204.0])
CYTOPLASM = np.array([196.0, 120.0, 178.0])
NUCLEUS = np.array([92.0, 52.0, 140.0])
LUMEN = np.array([246.0, 238.0, 246.0])
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


def _ellipses(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """An instance map of non-overlapping ellipses (later ones are dropped where they would touch)."""
    instances = np.zeros((height, width), dtype=np.int32)
    yy, xx = np.mgrid[0:height, 0:width]
    wanted = int(rng.integers(3, 7)) * height * width // (288 * 352) + 1
    label = 0
    for _ in range(wanted * 4):
        if label >= wanted:
            break
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        ry, rx = rng.uniform(18, 46), rng.uniform(18, 46)
        angle = rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u = (dy * np.cos(angle) + dx * np.sin(angle)) / ry
        v = (-dy * np.sin(angle) + dx * np.cos(angle)) / rx
        inside = u**2 + v**2 <= 1.0
        if not inside.any() or (ndimage.binary_dilation(inside, iterations=4) & (instances > 0)).any():
            continue
        label += 1
        instances[inside] = label
    return instances


def generate(seed: int, split: str, index: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(rgb uint8 HxWx3, instances int32 HxW), identical for identical arguments on any machine."""
    rng = np.random.default_rng([seed, SPLIT_CODES[split], index])
    instances = _ellipses(rng, height, width)
    gland = instances > 0
    lumen = ndimage.binary_erosion(gland, iterations=7) & gland
    rim = gland & ~lumen

    fibres = ndimage.gaussian_filter(rng.normal(size=(height, width)), sigma=(1.0, 6.0))
    fibres = fibres / (np.abs(fibres).max() + 1e-6)
    image = STROMA[None, None, :] + 18.0 * fibres[..., None]
    image[rim] = CYTOPLASM
    image[lumen] = LUMEN

    nuclei_density = np.where(rim, 0.05, np.where(lumen, 0.0, 0.004))
    seeds = rng.random((height, width)) < nuclei_density
    nuclei = ndimage.binary_dilation(seeds, iterations=2)
    image[nuclei] = 0.35 * image[nuclei] + 0.65 * NUCLEUS

    image = ndimage.gaussian_filter(image, sigma=(0.8, 0.8, 0))
    image += rng.normal(scale=6.0, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), instances


class Synthetic(SegmentationDataset):
    name = "synthetic"
    class_names = ["background", "gland"]
    splits = ("train", "val", "test")

    def __init__(self, options: SyntheticOptions, wanted: list[str] | None = None):
        self.options = options
        self.wanted = wanted

    @property
    def has_instances(self) -> bool:
        return True

    @functools.lru_cache(maxsize=4)  # noqa: B019 - a dataset lives for one command; the cache keeps a tile batch's image
    def _sample(self, split: str, index: int) -> tuple[np.ndarray, np.ndarray]:
        o = self.options
        return generate(o.seed, split, index, o.height, o.width)

    def records(self) -> list[ImageRecord]:
        o = self.options
        counts = {"train": o.train, "val": o.val, "test": o.test}
        records = []
        for split in self.splits:
            for index in range(counts[split]):
                records.append(
                    ImageRecord(
                        id=f"{split}_{index}",
                        split=split,
                        height=o.height,
                        width=o.width,
                        load_rgb=functools.partial(lambda s, i: self._sample(s, i)[0], split, index),
                        load_labels=functools.partial(
                            lambda s, i: (self._sample(s, i)[1] > 0).astype(np.uint8), split, index
                        ),
                        load_instances=functools.partial(lambda s, i: self._sample(s, i)[1], split, index),
                    )
                )
        return self.select(records, self.wanted)

    def identity(self) -> dict:
        return {"name": self.name, "options": self.options.model_dump(), "splits": self.wanted, "generator": 1}


def build_synthetic(config: DatasetConfig) -> Synthetic:
    return Synthetic(config.synthetic, config.splits)
