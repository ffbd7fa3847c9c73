"""Cutting dataset images into the stored tile order, and the per-tile noise that makes extraction reproducible."""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np
import torch

from pathseg.datasets.base import ImageRecord
from pathseg.errors import PathsegError
from pathseg.store import ImageEntry
from pathseg.tiling import TileGrid, cut_tile, pad_to_grid, tile_grid


def plan_tiles(records: list[ImageRecord], tile_size: int, stride: int) -> tuple[list[ImageEntry], np.ndarray]:
    """The image table and every tile's origin, in storage order (image by image, row-major)."""
    entries, origins, first = [], [], 0
    for record in records:
        grid = tile_grid(record.height, record.width, tile_size, stride)
        entries.append(
            ImageEntry(
                record.id,
                record.split,
                record.height,
                record.width,
                grid.pad_top,
                grid.pad_left,
                grid.rows,
                grid.cols,
                first,
            )
        )
        origins.extend(grid.origins())
        first += len(grid)
    return entries, np.asarray(origins, dtype=np.int32).reshape(-1, 2)


def grid_of(entry: ImageEntry, tile_size: int, stride: int) -> TileGrid:
    return TileGrid(entry.height, entry.width, tile_size, stride, entry.pad_top, entry.pad_left, entry.rows, entry.cols)


class TileSource:
    """Tiles by global index; keeps a few padded images decoded, since consecutive tiles share an image."""

    def __init__(
        self,
        records: list[ImageRecord],
        entries: list[ImageEntry],
        tile_size: int,
        stride: int,
        pad_mode: str,
        cached_images: int = 2,
    ) -> None:
        self.records = records
        self.entries = entries
        self.tile_size = tile_size
        self.stride = stride
        self.pad_mode = pad_mode
        self.cached_images = cached_images
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self.tile_image = np.concatenate([np.full(e.n_tiles, i) for i, e in enumerate(entries)]).astype(np.int64)
        self.origins = np.concatenate(
            [np.asarray(grid_of(e, tile_size, stride).origins()).reshape(-1, 2) for e in entries]
        ).astype(np.int64)

    def _padded(self, index: int) -> np.ndarray:
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        record = self.records[index]
        rgb = record.load_rgb()
        padded = pad_to_grid(rgb, grid_of(self.entries[index], self.tile_size, self.stride), self.pad_mode)
        self._cache[index] = padded
        while len(self._cache) > self.cached_images:
            self._cache.popitem(last=False)
        return padded

    def tiles(self, start: int, stop: int) -> np.ndarray:
        """(k, T, T, 3) uint8 tiles start..stop-1."""
        out = np.empty((stop - start, self.tile_size, self.tile_size, 3), dtype=np.uint8)
        for k, tile in enumerate(range(start, stop)):
            padded = self._padded(int(self.tile_image[tile]))
            out[k] = cut_tile(padded, tuple(self.origins[tile]), self.tile_size)
        return out

    def noise_keys(self, start: int, stop: int) -> list[str]:
        return [
            f"{self.records[int(self.tile_image[t])].id}:{self.origins[t][0]}:{self.origins[t][1]}"
            for t in range(start, stop)
        ]


def tile_noise(seed: int, keys: list[str], shape: tuple[int, ...]) -> torch.Tensor:
    """One Gaussian noise per tile, from (seed, image id, position): the same whatever the batch,
    order or device, and shared by all timesteps as in ddpm-segmentation."""
    noises = []
    for key in keys:
        material = hashlib.sha256(f"{seed}:{key}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(material[:8], "little") & ((1 << 63) - 1))
        noises.append(torch.randn(shape, generator=generator))
    return torch.stack(noises)


def labels_for_tiles(
    record: ImageRecord, entry: ImageEntry, tile_size: int, stride: int, pad_mode: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
    """(rgb, labels, instances, per-tile labels) of one image; labels are padded like the pixels they label."""
    rgb = record.load_rgb()
    labels = record.load_labels()
    instances = record.load_instances() if record.load_instances is not None else None
    if labels.shape != rgb.shape[:2]:
        raise PathsegError(
            f"image {record.id!r}: its mask is {labels.shape[1]}x{labels.shape[0]} but the image is "
            f"{rgb.shape[1]}x{rgb.shape[0]}; fix or remove the pair"
        )
    grid = grid_of(entry, tile_size, stride)
    padded = pad_to_grid(labels, grid, pad_mode)
    tiles = np.stack([cut_tile(padded, origin, tile_size) for origin in grid.origins()])
    return rgb, labels, instances, tiles
