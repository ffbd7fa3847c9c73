"""Where tiles sit in an image, so both stages agree on how to cut and how to stitch back.

Padding goes on every side (half the overlap before, the rest after), so border pixels get reflected
context like interior pixels do instead of always sitting at a tile edge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TileGrid:
    height: int
    width: int
    tile_size: int
    stride: int
    pad_top: int
    pad_left: int
    rows: int
    cols: int

    @property
    def padded_height(self) -> int:
        return (self.rows - 1) * self.stride + self.tile_size

    @property
    def padded_width(self) -> int:
        return (self.cols - 1) * self.stride + self.tile_size

    @property
    def pad_bottom(self) -> int:
        return self.padded_height - self.height - self.pad_top

    @property
    def pad_right(self) -> int:
        return self.padded_width - self.width - self.pad_left

    def __len__(self) -> int:
        return self.rows * self.cols

    def origins(self) -> list[tuple[int, int]]:
        """Top-left corners in padded coordinates, row-major: the order tiles are stored in."""
        return [(r * self.stride, c * self.stride) for r in range(self.rows) for c in range(self.cols)]


def _count(length: int, pad_before: int, tile_size: int, stride: int) -> int:
    needed = length + 2 * pad_before
    return max(1, math.ceil(max(needed - tile_size, 0) / stride) + 1)


def tile_grid(height: int, width: int, tile_size: int, stride: int) -> TileGrid:
    if stride > tile_size:
        raise ValueError(f"stride {stride} is larger than tile_size {tile_size}: pixels would be skipped")
    pad = (tile_size - stride) // 2
    return TileGrid(
        height=height,
        width=width,
        tile_size=tile_size,
        stride=stride,
        pad_top=pad,
        pad_left=pad,
        rows=_count(height, pad, tile_size, stride),
        cols=_count(width, pad, tile_size, stride),
    )


def pad_to_grid(array: np.ndarray, grid: TileGrid, mode: str = "reflect") -> np.ndarray:
    """Pad an (H, W, ...) array to the grid's padded size; numpy repeats reflections for large pads."""
    widths = [(grid.pad_top, grid.pad_bottom), (grid.pad_left, grid.pad_right)]
    widths += [(0, 0)] * (array.ndim - 2)
    if mode == "reflect" and min(array.shape[:2]) < 2:
        mode = "edge"
    return np.pad(array, widths, mode=mode)


def cut_tile(padded: np.ndarray, origin: tuple[int, int], tile_size: int) -> np.ndarray:
    y, x = origin
    return padded[y : y + tile_size, x : x + tile_size]


BLENDS = ("mean", "gaussian")
GAUSSIAN_SIGMA = 0.125  # of the tile side, as MONAI's sliding-window inference
WEIGHT_FLOOR = 1e-3  # so a pixel only one tile covers (an image corner) is still defined


def tile_weights(tile_size: int, blend: str) -> np.ndarray:
    """(T, T) weight of each tile pixel when overlapping tiles are blended.

    mean: every pixel counts the same. gaussian: centre pixels, which saw context on every side, count
    more than pixels near a tile edge, whose receptive field ran into the tile border.
    """
    if blend == "mean":
        return np.ones((tile_size, tile_size), dtype=np.float32)
    if blend == "gaussian":
        centre = (tile_size - 1) / 2
        axis = np.exp(-0.5 * ((np.arange(tile_size) - centre) / (GAUSSIAN_SIGMA * tile_size)) ** 2)
        weights = np.outer(axis, axis)
        return np.maximum(weights / weights.max(), WEIGHT_FLOOR).astype(np.float32)
    raise ValueError(f"blend {blend!r} is not one of {', '.join(BLENDS)}")


class Stitcher:
    """Blends overlapping (C, T, T) tile outputs into one (C, H, W) image (weights: `tile_weights`), cropping
    the padding."""

    def __init__(self, grid: TileGrid, channels: int, blend: str = "mean") -> None:
        self.grid = grid
        self.weights = tile_weights(grid.tile_size, blend)
        self.total = np.zeros((channels, grid.padded_height, grid.padded_width), dtype=np.float32)
        self.count = np.zeros((grid.padded_height, grid.padded_width), dtype=np.float32)
        self.tiles_added = 0

    def add(self, origin: tuple[int, int], tile: np.ndarray) -> None:
        y, x = origin
        size = self.grid.tile_size
        self.total[:, y : y + size, x : x + size] += tile * self.weights
        self.count[y : y + size, x : x + size] += self.weights
        self.tiles_added += 1

    @property
    def complete(self) -> bool:
        return self.tiles_added >= len(self.grid)

    def result(self) -> np.ndarray:
        g = self.grid
        if np.any(self.count[g.pad_top : g.pad_top + g.height, g.pad_left : g.pad_left + g.width] == 0):
            raise ValueError("some pixels of the image were not covered by any tile")
        blended = self.total / np.where(self.count > 0, self.count, 1.0)
        return blended[:, g.pad_top : g.pad_top + g.height, g.pad_left : g.pad_left + g.width]
