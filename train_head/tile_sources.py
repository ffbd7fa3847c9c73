"""Where the loader's tile rows come from: shards decoded on demand, or every selected tile held in RAM.

Both hand out a tile's rows in the store's own dtype (float16 features, float32 z0, uint8 labels), so a
head trained from RAM sees exactly the numbers a streamed one sees, and the choice between them
(`train.memory_budget`) never changes a result, only how long it takes. An image-skip head's tile pixels
(`conv-image`) are counted and held with them as uint8, the same bytes tile_images.py cuts when streaming.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from pathseg.train_head.tile_images import TileImages

from pathseg.store import FeatureStore
from pathseg.store.shard_reads import ShardRows

LABELS = "tiles/labels"


def decode_threads(setting: int) -> int:
    """`train.loader_threads`; 0 = up to 4, one per core. zstd releases the GIL, so threads decode in parallel."""
    return setting if setting > 0 else max(1, min(4, os.cpu_count() or 1))


class DecodedShard:
    """A shard's arrays, each ready when its decoding job is: a batch's copy of array j waits for array j only,
    so copying overlaps with decoding the rest."""

    def __init__(self, first: int, parts: list[Future | np.ndarray], with_labels: bool) -> None:
        self.first = first  # global index of the shard's first tile
        self._parts = parts  # one (rows, C, h, w) array per (timestep, block), then the (rows, T, T) labels
        self._with_labels = with_labels

    def _part(self, index: int) -> np.ndarray:
        part = self._parts[index]
        if isinstance(part, Future):
            part = self._parts[index] = part.result()
        return part

    def feature(self, j: int) -> np.ndarray:
        return self._part(j)

    @property
    def n_features(self) -> int:
        return len(self._parts) - (1 if self._with_labels else 0)

    @property
    def features(self) -> list[np.ndarray]:
        return [self._part(j) for j in range(self.n_features)]

    @property
    def labels(self) -> np.ndarray | None:
        return self._part(len(self._parts) - 1) if self._with_labels else None


class ShardSource:
    """Whole shards of the selected arrays (and the labels), decoded in a thread pool."""

    def __init__(self, store: FeatureStore, pairs: list[tuple[int, str]], with_labels: bool, threads: int) -> None:
        self.features = [ShardRows(store.feature_array(t, b), store.path) for t, b in pairs]
        self.labels = ShardRows(store.group[LABELS], store.path) if with_labels else None
        self.rows_per_shard = store.tiles_per_shard
        self.n_tiles = store.n_tiles
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="pathseg-decode") if threads > 1 else None

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None

    def shard_of(self, tiles: np.ndarray) -> np.ndarray:
        return np.asarray(tiles) // self.rows_per_shard

    def _labels_of(self, shard: int) -> np.ndarray:
        first = shard * self.rows_per_shard
        stop = min(first + self.rows_per_shard, self.n_tiles)
        out = np.empty((stop - first, *self.labels.row_shape), dtype=self.labels.dtype)
        for row in range(first, stop):  # labels are stored one tile per chunk, unsharded
            self.labels.read(row, out[row - first : row - first + 1])
        return out

    def submit(self, shards: list[int]) -> dict[int, DecodedShard]:
        """Start decoding `shards`, array by array across them (the first array of all shards first, so a
        batch can start copying it); without a pool, decode them now."""
        readers = [lambda shard, rows=rows: rows.read(shard) for rows in self.features]
        if self.labels is not None:
            readers.append(self._labels_of)
        parts: dict[int, list] = {shard: [] for shard in shards}
        for reader in readers:
            for shard in shards:
                parts[shard].append(self.pool.submit(reader, shard) if self.pool is not None else reader(shard))
        return {shard: DecodedShard(shard * self.rows_per_shard, parts[shard], self.labels is not None)
                for shard in shards}


def footprint(store: FeatureStore, pairs: list[tuple[int, str]], n_tiles: int, with_labels: bool,
              with_images: bool = False) -> int:
    """Bytes that `n_tiles` tiles of these arrays take in RAM, in the store's dtypes (pixels: uint8 RGB)."""
    per_tile = 0
    for t, b in pairs:
        array = store.feature_array(t, b)
        per_tile += int(np.prod(array.shape[1:])) * np.dtype(array.dtype).itemsize
    if with_labels:
        per_tile += store.tile_size * store.tile_size
    if with_images:
        per_tile += 3 * store.tile_size * store.tile_size
    return per_tile * int(n_tiles)


class InMemoryFeatures:
    """Every selected tile's rows, read once (shard by shard, in parallel) and served from RAM after."""

    def __init__(self, tiles: np.ndarray, features: list[np.ndarray], labels: np.ndarray | None,
                 n_store_tiles: int, images: np.ndarray | None = None) -> None:
        self.tiles = np.asarray(tiles, dtype=np.int64)
        self.features = features
        self.labels = labels
        self.images = images  # (n, T, T, 3) uint8 tile pixels, for a head that takes them; else None
        self.row_of = np.full(n_store_tiles, -1, dtype=np.int64)
        self.row_of[self.tiles] = np.arange(len(self.tiles))

    def feature(self, j: int) -> np.ndarray:
        return self.features[j]

    @property
    def nbytes(self) -> int:
        held = [*self.features, *(a for a in (self.labels, self.images) if a is not None)]
        return sum(a.nbytes for a in held)

    @property
    def with_labels(self) -> bool:
        return self.labels is not None

    def covers(self, tiles: np.ndarray) -> bool:
        tiles = np.asarray(tiles)
        return bool(len(tiles) == 0 or (tiles.max() < len(self.row_of) and (self.row_of[tiles] >= 0).all()))

    @classmethod
    def load(cls, source: ShardSource, tiles: np.ndarray, window_shards: int = 8,
             images: TileImages | None = None) -> InMemoryFeatures:
        """Decode the shards that hold `tiles`, `window_shards` at a time, keeping only the selected rows (and,
        with `images`, cut their pixels once)."""
        tiles = np.unique(np.asarray(tiles, dtype=np.int64))
        features = [np.empty((len(tiles), *rows.row_shape), dtype=rows.dtype) for rows in source.features]
        labels = (np.empty((len(tiles), *source.labels.row_shape), dtype=source.labels.dtype)
                  if source.labels is not None else None)
        shards = np.unique(source.shard_of(tiles)).tolist()
        position = 0
        for start in range(0, len(shards), window_shards):
            decoded = source.submit(shards[start : start + window_shards])
            for shard in shards[start : start + window_shards]:
                part = decoded[shard]
                low, high = np.searchsorted(tiles, [part.first, part.first + source.rows_per_shard])
                mine = tiles[low:high]  # tiles are sorted: the shard's share is one run of them
                rows = mine - part.first
                span = slice(position, position + len(mine))
                for out, array in zip(features, part.features, strict=True):
                    out[span] = array[rows]
                if labels is not None:
                    labels[span] = part.labels[rows]
                position += len(mine)
        pixels = images.pixels_of(tiles) if images is not None else None
        return cls(tiles, features, labels, source.n_tiles, pixels)


@dataclass
class MemoryPlan:
    """Which splits a fit-head run serves from RAM, and why: recorded in run.json."""

    budget: int
    train: InMemoryFeatures | None
    val: InMemoryFeatures | None
    train_bytes: int
    val_bytes: int

    def record(self) -> dict:
        return {
            "memory_budget_bytes": self.budget,
            "train": "memory" if self.train is not None else "stream",
            "val": "memory" if self.val is not None else "stream",
            "train_bytes": self.train_bytes,
            "val_bytes": self.val_bytes,
            "bytes_in_memory": sum(m.nbytes for m in (self.train, self.val) if m is not None),
        }


def plan_memory(store: FeatureStore, pairs: list[tuple[int, str]], train_tiles: np.ndarray, val_tiles: np.ndarray,
                budget: int, threads: int, images: TileImages | None = None) -> MemoryPlan:
    """Train tiles (with labels) into RAM if they fit the budget, then validation tiles in what is left.

    Validation is read once per epoch, training once per epoch too, so each split held in RAM saves
    `epochs - 1` decodes of it; the train split comes first because augmentation reads it tile by tile.
    With `images` (a head that takes the tile pixels) each split's pixels are counted and held with it.
    """
    with_images = images is not None
    train_bytes = footprint(store, pairs, len(train_tiles), with_labels=True, with_images=with_images)
    val_bytes = footprint(store, pairs, len(val_tiles), with_labels=False, with_images=with_images)
    plan = MemoryPlan(budget, None, None, train_bytes, val_bytes)

    def load(tiles: np.ndarray, with_labels: bool) -> InMemoryFeatures:
        source = ShardSource(store, pairs, with_labels, threads)
        try:
            return InMemoryFeatures.load(source, tiles, images=images)
        finally:
            source.close()

    left = budget
    if len(train_tiles) and train_bytes <= left:
        plan.train = load(train_tiles, True)
        left -= train_bytes
    if len(val_tiles) and val_bytes <= left:
        plan.val = load(val_tiles, False)
    return plan
