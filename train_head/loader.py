"""Batches of cached features and tile labels, streamed from the store.

Memory is bounded by the batch size and the prefetch depth, never by the store's size: each batch
reads just its tiles' chunks. This is what lets one extraction serve many head ablations without
the RAM wall that holding every feature map in memory runs into.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from pathseg.store import FeatureStore, read_rows


@dataclass
class Batch:
    tiles: np.ndarray  # global tile indices, in the order of the batch
    features: list[torch.Tensor]  # one (B, C, h, w) float32 tensor per (timestep, block)
    labels: torch.Tensor  # (B, T, T) int64


def dihedral(array: np.ndarray, k: int, flip: bool) -> np.ndarray:
    """One of the 8 rotations/reflections of the last two axes; the same op for features and labels."""
    out = np.rot90(array, k, axes=(-2, -1))
    return out[..., ::-1] if flip else out


class StoreLoader:
    """Iterates over `tiles` of a store in batches; shuffled by a seeded generator when asked."""

    def __init__(
        self,
        store: FeatureStore,
        pairs: list[tuple[int, str]],
        tiles: np.ndarray,
        batch_size: int,
        *,
        shuffle: bool = False,
        augment: bool = False,
        seed: int = 0,
        prefetch: int = 2,
        with_labels: bool = True,
    ) -> None:
        self.store = store
        self.pairs = pairs
        self.tiles = np.asarray(tiles, dtype=np.int64)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.seed = seed
        self.prefetch = max(0, prefetch)
        self.with_labels = with_labels
        self.epoch = 0
        self.arrays = [store.feature_array(t, b) for t, b in pairs]
        self.labels = store.group["tiles/labels"] if with_labels else None
        self.max_tiles_in_memory = 0  # observed high-water mark, for tests and benchmarks

    def __len__(self) -> int:
        return -(-len(self.tiles) // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Each epoch gets its own, reproducible order."""
        self.epoch = epoch

    def _order(self) -> np.ndarray:
        if not self.shuffle:
            return self.tiles
        rng = np.random.default_rng([self.seed, self.epoch])
        return self.tiles[rng.permutation(len(self.tiles))]

    def _read(self, tiles: np.ndarray, batch_index: int) -> Batch:
        # Sorted reads touch each shard once; the batch keeps the sorted order (order within a batch is irrelevant).
        tiles = np.sort(tiles)
        features = [read_rows(array, tiles).astype(np.float32) for array in self.arrays]
        if self.with_labels:
            labels = read_rows(self.labels, tiles).astype(np.int64)
        else:
            size = self.store.tile_size
            labels = np.zeros((len(tiles), size, size), dtype=np.int64)
        if self.augment:
            rng = np.random.default_rng([self.seed, self.epoch, batch_index, 1])
            ops = [(int(rng.integers(4)), bool(rng.integers(2))) for _ in tiles]
            for i, (k, flip) in enumerate(ops):
                for f in features:
                    f[i] = dihedral(f[i], k, flip)
                labels[i] = dihedral(labels[i], k, flip)
        return Batch(
            tiles=tiles,
            features=[torch.from_numpy(np.ascontiguousarray(f)) for f in features],
            labels=torch.from_numpy(np.ascontiguousarray(labels)),
        )

    def __iter__(self) -> Iterator[Batch]:
        order = self._order()
        groups = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.prefetch == 0:
            for index, group in enumerate(groups):
                batch = self._read(group, index)
                self.max_tiles_in_memory = max(self.max_tiles_in_memory, len(group))
                yield batch
            return
        yield from self._prefetched(groups)

    def _prefetched(self, groups: list[np.ndarray]) -> Iterator[Batch]:
        """A reader thread stays `prefetch` batches ahead; zstd and zarr release the GIL for the heavy part."""
        slots: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        in_flight = [0]
        lock = threading.Lock()

        def produce() -> None:
            try:
                for index, group in enumerate(groups):
                    if stop.is_set():
                        return
                    batch = self._read(group, index)
                    with lock:
                        in_flight[0] += len(group)
                        self.max_tiles_in_memory = max(self.max_tiles_in_memory, in_flight[0])
                    slots.put(batch)
                slots.put(None)
            except BaseException as error:  # noqa: BLE001 - re-raised in the consumer
                slots.put(error)

        thread = threading.Thread(target=produce, name="pathseg-loader", daemon=True)
        thread.start()
        try:
            while True:
                item = slots.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
                with lock:
                    in_flight[0] -= len(item.tiles)
        finally:
            stop.set()
            while thread.is_alive():
                try:
                    slots.get_nowait()
                except queue.Empty:
                    thread.join(timeout=0.05)
