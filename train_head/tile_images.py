"""The tiles' own pixels, from the whole images the store holds: what an image-skip head (`conv-image`) sees.

Cut exactly as extraction cut them (the same grid and padding mode), so the pixels line up with the features
and labels of each tile; read from the store, never from a source file, so a run needs nothing but its cache.
Whole images are padded once and kept in a small least-recently-used cache: the loader visits a window of
shards at a time, so consecutive tiles mostly share an image. The cache is bounded in bytes as well as in images
(as extraction's TileSource is), since a BCSS ROI padded is some 75 MB; when `train.memory_budget` lets a split's
tiles into RAM, their pixels go there too (tile_sources.py counts them) and this cache only serves streaming.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

from pathseg.imaging.tiling import cut_tile, pad_to_grid
from pathseg.store import FeatureStore

CACHED_IMAGES = 64
MAX_CACHED_BYTES = 512 * 2**20


def normalise_pixels(pixels: np.ndarray) -> np.ndarray:
    """uint8 (..., T, T, 3) -> float32 (..., 3, T, T) in [-1, 1]: the range the diffusion backbone was fed, and
    centred, so the head's BatchNorm starts from comparable scales for features and pixels."""
    array = np.asarray(pixels, dtype=np.float32) / 127.5 - 1.0
    return np.moveaxis(array, -1, -3)


class TileImages:
    def __init__(self, store: FeatureStore, cached_images: int = CACHED_IMAGES,
                 max_cached_bytes: int = MAX_CACHED_BYTES) -> None:
        self.store = store
        self.size = store.tile_size
        self.mode = (store.attrs.get("identity", {}).get("tiling") or {}).get("pad_mode", "reflect")
        self.origins = store.tile_origins()
        self.image_of = store.tile_images()
        self.cached_images = max(1, cached_images)
        self.max_cached_bytes = max_cached_bytes
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def _padded(self, index: int) -> np.ndarray:
        with self._lock:
            if index in self._cache:
                self._cache.move_to_end(index)
                return self._cache[index]
        padded = pad_to_grid(self.store.image_rgb(index), self.store.image_grid(index), self.mode)
        with self._lock:
            self._cache[index] = padded
            while len(self._cache) > 1 and (len(self._cache) > self.cached_images or
                                            sum(a.nbytes for a in self._cache.values()) > self.max_cached_bytes):
                self._cache.popitem(last=False)
        return padded

    def pixels(self, tile: int) -> np.ndarray:
        """(T, T, 3) uint8 of one tile, as extraction fed it to the backbone."""
        origin = tuple(int(v) for v in self.origins[tile])
        return cut_tile(self._padded(int(self.image_of[tile])), origin, self.size)

    def pixels_of(self, tiles: np.ndarray) -> np.ndarray:
        """(k, T, T, 3) uint8 of `tiles`: what the in-RAM plan holds (tile_sources.InMemoryFeatures)."""
        out = np.empty((len(tiles), self.size, self.size, 3), dtype=np.uint8)
        for k, tile in enumerate(np.asarray(tiles).tolist()):
            out[k] = self.pixels(tile)
        return out

    def tile(self, tile: int) -> np.ndarray:
        """(3, T, T) float32, normalised as the head takes it."""
        return normalise_pixels(self.pixels(tile))
