"""Unlabelled training tiles: from any dataset (cut exactly as extraction cuts them) or a folder of slides.

Memory follows the batch, not the data: only an index of (image, tile) pairs is held, and pixels are
read when a batch asks for them. The order is shuffled in windows of a few images (`cached_images`):
each epoch visits the images in a seeded random order, and the tiles of every window of images are
shuffled together, so an image decodes about once per epoch and a BCSS ROI is not decoded once per
tile. The order is a pure function of (seed, step), which is what makes a resumed run draw the same
batches as an uninterrupted one without saving any iterator state.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from pathseg.extract.tiles import TileSource, plan_tiles

from pathseg.config import PipelineConfig, PretrainConfig
from pathseg.datasets import build_dataset
from pathseg.datasets.base import digest_files
from pathseg.errors import PathsegError
from pathseg.imaging.slides import SLIDE_ONLY_SUFFIXES, Slide, tissue_mask
from pathseg.imaging.tiling import TileGrid

SLIDE_SUFFIXES = SLIDE_ONLY_SUFFIXES | {".tif", ".tiff"}


class TileReader(Protocol):
    image_of: np.ndarray  # image (or slide) index of every tile
    tile_size: int

    def read(self, indices: np.ndarray) -> np.ndarray:
        """(k, T, T, 3) uint8 tiles, in the order asked."""

    def identity(self) -> dict:
        """What data this is, for the record and for refusing to resume on other data."""


class DatasetTiles:
    """A dataset's images of the chosen splits, cut by extraction's own `TileSource`; labels never loaded."""

    def __init__(self, config: PipelineConfig) -> None:
        settings, t = config.pretrain, config.tiling
        self.dataset = build_dataset(config.dataset.model_copy(update={"splits": list(settings.splits)}))
        self.records = self.dataset.records()
        if not self.records:
            raise PathsegError(
                f"dataset {config.dataset.name!r} has no images in splits {settings.splits}; set pretrain.splits "
                "to splits it has"
            )
        entries, _ = plan_tiles(self.records, t.tile_size, t.stride)
        self.source = TileSource(self.records, entries, t.tile_size, t.stride, t.pad_mode,
                                 cached_images=settings.cached_images)
        self.image_of = self.source.tile_image
        self.tile_size = t.tile_size
        self.config = config

    def read(self, indices: np.ndarray) -> np.ndarray:
        out = np.empty((len(indices), self.tile_size, self.tile_size, 3), dtype=np.uint8)
        for k, index in enumerate(indices):
            out[k] = self.source.tiles(int(index), int(index) + 1)[0]
        return out

    def identity(self) -> dict:
        d = self.config.dataset
        return {
            "source": "dataset",
            "dataset": d.name,
            "root": str(Path(d.root).resolve()) if d.root else None,
            "splits": list(self.config.pretrain.splits),
            "identity": self.dataset.identity(),
            "images": len(self.records),
            "tiles": int(len(self.image_of)),
        }


def slide_files(folder: Path) -> list[Path]:
    if not Path(folder).is_dir():
        raise PathsegError(f"slide folder {folder} does not exist; pass --slides with a folder of slides")
    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES)
    if not files:
        raise PathsegError(
            f"{folder} holds no slides ({', '.join(sorted(SLIDE_SUFFIXES))}); pass --slides with a folder of slides"
        )
    return files


def tissue_origins(grid: TileGrid, mask: np.ndarray, min_tissue: float) -> np.ndarray:
    """(y, x) origins of the grid's tiles with at least `min_tissue` of their area on tissue (mask at any scale)."""
    scale_y, scale_x = mask.shape[0] / grid.height, mask.shape[1] / grid.width
    summed = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
    summed[1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1)
    keep = []
    for y, x in grid.origins():
        r0 = min(int(np.floor(y * scale_y)), mask.shape[0] - 1)
        c0 = min(int(np.floor(x * scale_x)), mask.shape[1] - 1)
        r1 = min(max(int(np.ceil((y + grid.tile_size) * scale_y)), r0 + 1), mask.shape[0])
        c1 = min(max(int(np.ceil((x + grid.tile_size) * scale_x)), c0 + 1), mask.shape[1])
        area = (r1 - r0) * (c1 - c0)
        if (summed[r1, c1] - summed[r0, c1] - summed[r1, c0] + summed[r0, c0]) / area >= min_tissue:
            keep.append((y, x))
    return np.asarray(keep, dtype=np.int64).reshape(-1, 2)


class SlideTiles:
    """Tissue tiles of every slide in a folder, read at `pretrain.mpp` on a grid of whole tiles.

    The grid is `tiling.tile_size` with `tiling.stride`, without padding: pretraining wants whole tissue
    tiles, not the reflected borders extraction needs to cover every pixel. A few slides stay open.
    """

    def __init__(self, config: PipelineConfig) -> None:
        settings = config.pretrain
        self.settings = settings
        self.tile_size = config.tiling.tile_size
        self.files = slide_files(Path(settings.slides))
        origins, owners = [], []
        for index, path in enumerate(self.files):
            with Slide(path, mpp=settings.level0_mpp, force_mpp=settings.force_level0_mpp) as slide:
                width, height = slide.size_at(settings.mpp)
                mask = tissue_mask(slide.thumbnail(), settings.tissue_threshold)
            grid = whole_tile_grid(height, width, self.tile_size, config.tiling.stride)
            kept = tissue_origins(grid, mask, settings.min_tissue) if len(grid) else np.zeros((0, 2), np.int64)
            origins.append(kept)
            owners.append(np.full(len(kept), index, dtype=np.int64))
        self.origins = np.concatenate(origins)
        self.image_of = np.concatenate(owners)
        if not len(self.origins):
            raise PathsegError(
                f"no tissue tiles in the slides of {settings.slides} at {settings.mpp} µm/px (tiles with at least "
                f"{settings.min_tissue:.0%} tissue); lower pretrain.min_tissue or set pretrain.tissue_threshold"
            )
        self._open: OrderedDict[int, Slide] = OrderedDict()

    def _slide(self, index: int) -> Slide:
        if index in self._open:
            self._open.move_to_end(index)
            return self._open[index]
        slide = Slide(self.files[index], mpp=self.settings.level0_mpp, force_mpp=self.settings.force_level0_mpp)
        self._open[index] = slide
        while len(self._open) > self.settings.cached_images:
            self._open.popitem(last=False)[1].close()
        return slide

    def read(self, indices: np.ndarray) -> np.ndarray:
        size = self.tile_size
        out = np.empty((len(indices), size, size, 3), dtype=np.uint8)
        for k, index in enumerate(indices):
            y, x = (int(v) for v in self.origins[index])
            out[k] = self._slide(int(self.image_of[index])).read(x, y, size, size, self.settings.mpp)
        return out

    def identity(self) -> dict:
        s = self.settings
        forced = {"force_level0_mpp": True} if s.force_level0_mpp else {}  # absent when off: older runs resume
        return {
            **forced,
            "source": "slides",
            "folder": str(Path(s.slides).resolve()),
            "files_digest": digest_files(self.files, Path(s.slides)),
            "slides": len(self.files),
            "mpp": s.mpp,
            "level0_mpp": s.level0_mpp,
            "tissue_threshold": s.tissue_threshold,
            "min_tissue": s.min_tissue,
            "tiles": int(len(self.image_of)),
        }


def whole_tile_grid(height: int, width: int, tile_size: int, stride: int) -> TileGrid:
    rows = (height - tile_size) // stride + 1 if height >= tile_size else 0
    cols = (width - tile_size) // stride + 1 if width >= tile_size else 0
    return TileGrid(height, width, tile_size, stride, 0, 0, rows, cols)


def build_reader(config: PipelineConfig) -> TileReader:
    return SlideTiles(config) if config.pretrain.slides is not None else DatasetTiles(config)


@dataclass(frozen=True)
class BatchPart:
    """The slice [start, stop) of a global batch of `total` tiles that one process computes.

    Random draws are made for the whole batch and sliced, so N processes draw exactly what one process
    would: the crops, flips, noise and timesteps of a tile do not depend on the number of processes.
    """

    start: int
    stop: int
    total: int

    @classmethod
    def whole(cls, size: int) -> BatchPart:
        return cls(0, size, size)

    @classmethod
    def of_process(cls, size: int, rank: int, world: int) -> BatchPart:
        share = size // world
        return cls(rank * share, (rank + 1) * share, size)

    def take(self, drawn: torch.Tensor) -> torch.Tensor:
        return drawn[self.start : self.stop]


@dataclass
class TileStream:
    """Batch `step` of the seeded, windowed-shuffle order: the same tiles whenever it is asked for."""

    reader: TileReader
    batch_size: int
    seed: int
    window: int

    def __post_init__(self) -> None:
        self.n_tiles = int(len(self.reader.image_of))
        order = np.argsort(self.reader.image_of, kind="stable")
        bounds = np.searchsorted(self.reader.image_of[order], np.arange(int(self.reader.image_of.max()) + 2))
        self._tiles_of = [order[bounds[i] : bounds[i + 1]] for i in range(len(bounds) - 1)]
        self._orders: OrderedDict[int, np.ndarray] = OrderedDict()

    def epoch_order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            rng = np.random.default_rng([self.seed, epoch])
            images = rng.permutation(len(self._tiles_of))
            parts = [
                rng.permutation(np.concatenate([self._tiles_of[i] for i in images[start : start + self.window]]))
                for start in range(0, len(images), self.window)
            ]
            self._orders[epoch] = np.concatenate(parts)
            while len(self._orders) > 2:
                self._orders.popitem(last=False)
        return self._orders[epoch]

    def indices(self, step: int) -> np.ndarray:
        positions = np.arange(step * self.batch_size, (step + 1) * self.batch_size)
        return np.asarray([self.epoch_order(int(p // self.n_tiles))[p % self.n_tiles] for p in positions])

    def batch(self, step: int, part: BatchPart | None = None) -> np.ndarray:
        """(B, T, T, 3) uint8: the whole batch, or only this process's `part` of it (the only tiles it reads)."""
        indices = self.indices(step)
        return self.reader.read(indices if part is None else indices[part.start : part.stop])

    def spread(self, count: int) -> np.ndarray:
        """`count` tiles spread over the data, in index order: the fixed set shown in reconstructions."""
        count = min(count, self.n_tiles)
        return self.reader.read(np.linspace(0, self.n_tiles - 1, count).round().astype(np.int64))


def build_stream(config: PipelineConfig) -> TileStream:
    s: PretrainConfig = config.pretrain
    return TileStream(build_reader(config), s.batch_size, s.seed, s.cached_images)


def to_unit_tensor(tiles: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 (B, T, T, 3) -> float (B, 3, T, T) in [0, 1] on the device."""
    return torch.from_numpy(np.ascontiguousarray(tiles)).to(device).permute(0, 3, 1, 2).float().div_(255.0)


def augment(images: torch.Tensor, generator: torch.Generator, flips: bool, jitter: float,
            part: BatchPart | None = None) -> torch.Tensor:
    """Random flips and quarter turns (histology has no up), and a light brightness/contrast/saturation jitter.

    Parameters are drawn on the CPU from the step's generator, for the whole batch of which `images` are
    `part`, so the same step augments the same way on any device, after a resume and over any number of processes.
    """
    out = []
    part = part or BatchPart.whole(images.shape[0])
    n = part.total
    flip_h = part.take(torch.rand(n, generator=generator) < 0.5)
    flip_v = part.take(torch.rand(n, generator=generator) < 0.5)
    turns = part.take(torch.randint(0, 4, (n,), generator=generator))
    factors = part.take(1.0 + jitter * (2.0 * torch.rand(n, 3, generator=generator) - 1.0))
    for k in range(images.shape[0]):
        image = images[k]
        if flips:
            if flip_h[k]:
                image = image.flip(-1)
            if flip_v[k]:
                image = image.flip(-2)
            image = torch.rot90(image, int(turns[k]), dims=(-2, -1))
        if jitter > 0:
            brightness, contrast, saturation = (float(f) for f in factors[k])
            image = image * brightness
            image = (image - image.mean()) * contrast + image.mean()
            grey = (0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2]).unsqueeze(0)
            image = (image - grey) * saturation + grey
        out.append(image.clamp(0.0, 1.0))
    return torch.stack(out)


def crop_size(crop: int | None, tile_size: int) -> int | None:
    """The first stage's training crop for these tiles: None (whole tiles) when unset or not smaller than a tile."""
    return crop if crop is not None and crop < tile_size else None


def random_crops(images: torch.Tensor, size: int | None, generator: torch.Generator,
                 part: BatchPart | None = None) -> torch.Tensor:
    """One square `size` crop of each image at a uniform random position (drawn on the CPU from the step's
    generator for the whole batch, like the augmentation, so a resumed run cuts the same crops); `size` None:
    the images as they are."""
    if size is None:
        return images
    part = part or BatchPart.whole(images.shape[0])
    n, height, width = part.total, images.shape[-2], images.shape[-1]
    tops = part.take(torch.randint(0, height - size + 1, (n,), generator=generator))
    lefts = part.take(torch.randint(0, width - size + 1, (n,), generator=generator))
    return torch.stack([images[k, :, int(t) : int(t) + size, int(x) : int(x) + size]
                        for k, (t, x) in enumerate(zip(tops, lefts, strict=True))])
