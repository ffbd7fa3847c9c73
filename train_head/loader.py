"""Batches of cached features and tile labels, read shard by shard or served from RAM.

Speed. Every tile is its own zstd chunk inside 16-tile shards (`extract.tiles_per_shard`), so reading
tiles one at a time pays per-chunk overhead on every tile. The loader instead decodes whole shards, in
threads (`train.loader_threads`; zstd releases the GIL), with pathseg's own shard reader
(`pathseg.store.shard_reads`), a window ahead of the batches that need them, and converts rows to float32
into a ring of reused batch buffers (pinned on CUDA, copied with non_blocking). When the selected
arrays fit `train.memory_budget`, they are read once into RAM in the store's dtype and every epoch is
served from there (`InMemoryFeatures`).

Randomness. A shuffled epoch permutes the shards that hold the tiles, cuts that sequence into windows
of `window_shards` shards (`train.shuffle_window` tiles), and permutes the tiles within each window;
batches are consecutive runs of that order. Every tile appears once per epoch, every shard order and
every within-window order is equally likely, and a batch's tiles come from up to `window_shards`
shards drawn at random from the whole split (one shard holds neighbouring tiles of one or two images).
What is lost against a full permutation is only that two tiles from shards far apart in the shard
order never share a batch. The order depends on (seed, epoch, window) alone, never on whether the
tiles are streamed or in RAM, so `train.memory_budget` does not change a result.

Memory. Streaming holds at most three windows of decoded shards (the batch's, when a batch straddles two,
and the next being decoded) plus prefetch + 2 batch buffers, whatever the store's size. A batch's
tensors are those buffers: they hold until the next batch is drawn (`.clone()` what you keep).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from pathseg.train_head.contours import TileContours
from pathseg.train_head.tile_images import TileImages, normalise_pixels
from pathseg.train_head.tile_sources import DecodedShard, InMemoryFeatures, ShardSource, decode_threads

from pathseg.store import FeatureStore


@dataclass
class Batch:
    tiles: np.ndarray  # global tile indices, in the order of the batch
    features: list[torch.Tensor]  # one (B, C, h, w) float32 tensor per (timestep, block)
    labels: torch.Tensor  # (B, T, T) int64


@dataclass
class Slot:
    """One reusable batch buffer; `copied` is the CUDA event after which its host memory may be refilled."""

    features: list[torch.Tensor]
    labels: torch.Tensor
    copied: object | None = field(default=None)


def dihedral(array: np.ndarray, k: int, flip: bool) -> np.ndarray:
    """One of the 8 rotations/reflections of the last two axes; the same op for features and labels."""
    out = np.rot90(array, k, axes=(-2, -1))
    return out[..., ::-1] if flip else out


def epoch_windows(tiles: np.ndarray, rows_per_shard: int, window_shards: int, shuffle: bool,
                  rng: np.random.Generator | None) -> list[np.ndarray]:
    """The epoch's tile order, as windows whose concatenation it is (see the module docstring)."""
    tiles = np.asarray(tiles, dtype=np.int64)
    if len(tiles) == 0:
        return []
    shard = tiles // rows_per_shard
    if not shuffle:  # the order given, cut where `window_shards` runs of shards have gone by
        runs = np.concatenate([[0], np.cumsum(shard[1:] != shard[:-1])])
        window = runs // window_shards
        cuts = np.flatnonzero(np.diff(window)) + 1
        return np.split(tiles, cuts)
    by_shard = np.argsort(shard, kind="stable")
    shards, starts, counts = np.unique(shard[by_shard], return_index=True, return_counts=True)
    order = rng.permutation(len(shards))
    windows = []
    for start in range(0, len(order), window_shards):
        members = np.concatenate([tiles[by_shard[starts[i] : starts[i] + counts[i]]]
                                  for i in order[start : start + window_shards]])
        windows.append(members[rng.permutation(len(members))])
    return windows


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
        window_tiles: int = 128,
        threads: int = 0,
        memory: InMemoryFeatures | None = None,
        device: torch.device | None = None,
        contours: TileContours | None = None,
        images: TileImages | None = None,
    ) -> None:
        self.store = store
        self.images = images  # an image-skip head's tile pixels, a last input after the features
        self.contours = contours  # head.target=contour: the band marked into each tile's labels, rotated with them
        self.pairs = pairs
        self.tiles = np.asarray(tiles, dtype=np.int64)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.seed = seed
        self.prefetch = max(0, prefetch)
        self.with_labels = with_labels
        self.rows_per_shard = store.tiles_per_shard
        self.window_shards = max(1, window_tiles // self.rows_per_shard)
        self.threads = decode_threads(threads)
        if memory is not None and (not memory.covers(self.tiles) or (with_labels and not memory.with_labels)):
            raise ValueError("the in-memory features do not hold every tile (or the labels) this loader serves")
        self.memory = memory
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.epoch = 0
        shapes = [store.feature_array(t, b).shape[1:] for t, b in pairs]
        self._shapes = [tuple(int(s) for s in shape) for shape in shapes]
        if images is not None:
            self._shapes.append((3, store.tile_size, store.tile_size))
        self._ring: list[Slot] | None = None
        self.max_tiles_in_memory = 0  # batches handed out or waiting, high-water mark (tests, benchmarks)
        self.max_decoded_tiles = 0  # tiles of decoded shards held at once, high-water mark

    def __len__(self) -> int:
        return -(-len(self.tiles) // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Each epoch gets its own, reproducible order."""
        self.epoch = epoch

    def windows(self) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, self.epoch]) if self.shuffle else None
        return epoch_windows(self.tiles, self.rows_per_shard, self.window_shards, self.shuffle, rng)

    # ---- buffers -----------------------------------------------------------------------------------

    def _slots(self) -> list[Slot]:
        """The ring of batch buffers, made once and reused by every epoch (one iteration at a time)."""
        if self._ring is None:
            pin = self.device.type == "cuda"
            size = self.store.tile_size
            self._ring = [
                Slot([torch.empty((self.batch_size, *shape), dtype=torch.float32, pin_memory=pin)
                      for shape in self._shapes],
                     torch.zeros((self.batch_size, size, size), dtype=torch.int64, pin_memory=pin))
                for _ in range(self.prefetch + 2)
            ]
        return self._ring

    def _fill(self, slot: Slot, tiles: np.ndarray, batch_index: int, rows_of, pool=None) -> Batch:
        """Rows into the slot's float32 buffers, one job per array, in `pool` when given: numpy's casting
        copies release the GIL."""
        if slot.copied is not None:
            slot.copied.synchronize()  # its last copy to the GPU has finished reading the host buffer
            slot.copied = None
        n = len(tiles)
        features = [f.numpy() for f in slot.features]
        labels = slot.labels.numpy()
        ops = None
        if self.augment:
            rng = np.random.default_rng([self.seed, self.epoch, batch_index, 1])
            ops = [(int(rng.integers(4)), bool(rng.integers(2))) for _ in tiles]
        stored = len(self.pairs)  # the store's arrays; an image, when asked, is the buffer after them
        if ops is None and self.memory is not None:  # whole-batch gathers, as a raw-array cache would do them
            rows = self.memory.row_of[tiles]
            for out, array in zip(features[:stored], self.memory.features, strict=True):
                out[:n] = array[rows]
            if self.images is not None:
                for i, (tile, row) in enumerate(zip(tiles.tolist(), rows.tolist(), strict=True)):
                    features[stored][i] = normalise_pixels(self._pixels(self.memory, row, tile))
            if self.with_labels:
                labels[:n] = self.memory.labels[rows]
                if self.contours is not None:
                    for i, tile in enumerate(tiles.tolist()):
                        self.contours.mark(labels[i], self.contours.band(tile))
            return Batch(tiles.copy(), [f[:n] for f in slot.features], slot.labels[:n])
        found = [rows_of(tile) for tile in tiles.tolist()]  # (shard or RAM rows, row) of each tile
        transforms = ops if ops is not None else [(0, False)] * n

        def fill(j: int) -> None:  # array j of every tile; j == len(features): the labels
            if j == len(features):
                for i, ((part, row), (k, flip)) in enumerate(zip(found, transforms, strict=True)):
                    labels[i] = dihedral(part.labels[row], k, flip)
                    if self.contours is not None:
                        self.contours.mark(labels[i], dihedral(self.contours.band(int(tiles[i])), k, flip))
                return
            out = features[j]
            if j == stored:  # the tile's pixels, turned with its features and labels
                for i, (tile, (part, row), (k, flip)) in enumerate(zip(tiles.tolist(), found, transforms, strict=True)):
                    out[i] = dihedral(normalise_pixels(self._pixels(part, row, tile)), k, flip)
                return
            for i, ((part, row), (k, flip)) in enumerate(zip(found, transforms, strict=True)):
                out[i] = dihedral(part.feature(j)[row], k, flip)

        jobs = range(len(features) + (1 if self.with_labels else 0))
        if pool is not None:
            list(pool.map(fill, jobs))
        else:
            for j in jobs:
                fill(j)
        return Batch(tiles.copy(), [f[:n] for f in slot.features], slot.labels[:n])

    def _pixels(self, part: object, row: int, tile: int) -> np.ndarray:
        """A tile's uint8 pixels: from RAM when the in-RAM plan holds them, else cut from the store's image."""
        held = getattr(part, "images", None)
        return held[row] if held is not None else self.images.pixels(tile)

    def _to_device(self, batch: Batch, slot: Slot) -> Batch:
        if self.device.type == "cpu":
            return batch
        moved = Batch(batch.tiles, [f.to(self.device, non_blocking=True) for f in batch.features],
                      batch.labels.to(self.device, non_blocking=True))
        if self.device.type == "cuda":
            slot.copied = torch.cuda.Event()
            slot.copied.record()
        return moved

    # ---- producing batches ---------------------------------------------------------------------------

    def _batches(self, slots: list[Slot]) -> Iterator[tuple[Batch, Slot]]:
        windows = self.windows()
        order = np.concatenate(windows) if windows else np.zeros(0, dtype=np.int64)
        window_of = np.repeat(np.arange(len(windows)), [len(w) for w in windows])
        if self.memory is not None:
            def rows_of(tile: int):
                return self.memory, int(self.memory.row_of[tile])

            for index, start in enumerate(range(0, len(order), self.batch_size)):
                tiles = np.sort(order[start : start + self.batch_size])
                slot = slots[index % len(slots)]
                yield self._fill(slot, tiles, index, rows_of), slot
            return

        source = ShardSource(self.store, self.pairs, self.with_labels, self.threads)
        # its own threads: in decode's pool, a batch's copies would queue behind the next window's decoding
        copying = ThreadPoolExecutor(self.threads, thread_name_prefix="pathseg-copy") if self.threads > 1 else None
        decoded: dict[int, dict[int, DecodedShard]] = {}

        def start(window: int) -> None:
            if window < len(windows) and window not in decoded:
                decoded[window] = source.submit(np.unique(windows[window] // self.rows_per_shard).tolist())
                held = sum(min(self.rows_per_shard, self.store.n_tiles - part.first)
                           for parts in decoded.values() for part in parts.values())
                self.max_decoded_tiles = max(self.max_decoded_tiles, held)

        try:
            for index, first in enumerate(range(0, len(order), self.batch_size)):
                tiles = np.sort(order[first : first + self.batch_size])
                low, high = int(window_of[first]), int(window_of[min(first + self.batch_size, len(order)) - 1])
                for old in [w for w in decoded if w < low]:
                    del decoded[old]
                shards: dict[int, DecodedShard] = {}
                for window in range(low, high + 1):
                    start(window)
                    shards.update(decoded[window])
                start(high + 1)  # decode ahead while this batch is used

                def rows_of(tile: int, shards=shards):
                    part = shards[tile // self.rows_per_shard]
                    return part, tile - part.first

                slot = slots[index % len(slots)]
                yield self._fill(slot, tiles, index, rows_of, copying), slot
        finally:
            source.close()
            if copying is not None:
                copying.shutdown(wait=True)

    def __iter__(self) -> Iterator[Batch]:
        slots = self._slots()
        if self.prefetch == 0:
            for batch, slot in self._batches(slots):
                self.max_tiles_in_memory = max(self.max_tiles_in_memory, len(batch.tiles))
                yield self._to_device(batch, slot)
            return
        yield from self._prefetched(slots)

    def _prefetched(self, slots: list[Slot]) -> Iterator[Batch]:
        """A reader thread stays `prefetch` batches ahead, in the ring's other buffers."""
        items: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        in_flight = [0]
        lock = threading.Lock()

        def produce() -> None:
            try:
                for batch, slot in self._batches(slots):
                    if stop.is_set():
                        return
                    with lock:
                        in_flight[0] += len(batch.tiles)
                        self.max_tiles_in_memory = max(self.max_tiles_in_memory, in_flight[0])
                    items.put((batch, slot))
                items.put(None)
            except BaseException as error:  # noqa: BLE001 - re-raised in the consumer
                items.put(error)

        thread = threading.Thread(target=produce, name="pathseg-loader", daemon=True)
        thread.start()
        try:
            while True:
                item = items.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                batch, slot = item
                yield self._to_device(batch, slot)
                with lock:
                    in_flight[0] -= len(batch.tiles)
        finally:
            stop.set()
            while thread.is_alive():
                try:
                    items.get_nowait()
                except queue.Empty:
                    thread.join(timeout=0.05)
