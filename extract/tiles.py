"""Cutting dataset images into the stored tile order, and the per-tile noise that makes extraction reproducible."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Iterator

import numpy as np
import torch

from pathseg.datasets.base import ImageRecord
from pathseg.errors import PathsegError
from pathseg.imaging.tiling import TileGrid, tile_grid
from pathseg.store import ImageEntry


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


def source_indices(padded_length: int, before: int, length: int, mode: str) -> np.ndarray:
    """Where each padded coordinate reads from in the unpadded axis (-1: constant fill), as np.pad would.

    numpy repeats reflections for pads longer than the axis; those are periodic, so a modulo gives the same.
    """
    position = np.arange(padded_length, dtype=np.int64) - before
    if mode == "reflect":
        period = 2 * (length - 1)
        folded = np.mod(position, period)
        return np.where(folded < length, folded, period - folded)
    if mode == "symmetric":
        period = 2 * length
        folded = np.mod(position, period)
        return np.where(folded < length, folded, period - 1 - folded)
    if mode == "edge":
        return np.clip(position, 0, length - 1)
    if mode == "constant":
        return np.where((position >= 0) & (position < length), position, -1)
    raise PathsegError(f"tiling.pad_mode {mode!r} is not one of reflect, symmetric, edge, constant")


PADDING_IGNORE = 255  # the ignore value padded labels get when the dataset has none (classes stay below it)


def padding_label(pad_mode: str, ignore_index: int | None) -> int | None:
    """What a padded pixel's label is in tile labels: None keeps the padded (mirrored) labels themselves.

    reflect / symmetric: the padding is real tissue seen in a mirror, and the same mirror carries its
    labels, so the supervision is exact for what the features there show; it works as a flip augmentation
    of border context. Those pixels are never scored (stitching crops the padding) and the best epoch is
    chosen on stitched images, so they cannot inflate a reported figure. edge / constant: the padding is
    smeared or blank pixels that no label describes (a 0 there would say "class 0", tumour in BCSS), so
    it carries the ignore index, the dataset's own or `PADDING_IGNORE` when it has none.
    """
    if pad_mode in ("reflect", "symmetric"):
        return None
    return PADDING_IGNORE if ignore_index is None else ignore_index


def store_ignore_index(pad_mode: str, ignore_index: int | None) -> int | None:
    """The store's ignore index: the dataset's, or the padding's where padded labels need one."""
    padded = padding_label(pad_mode, ignore_index)
    return ignore_index if padded is None else padded


class PaddedView:
    """An (H, W, ...) array seen through its tile grid's padding, cut tile by tile.

    Equal to `cut_tile(pad_to_grid(array, grid, mode), origin, size)`, without ever building the padded
    copy: a large ROI then costs its decoded pixels once, not twice. With `outside` set, every pixel
    outside the image holds that value instead, whatever the mode (labels of padding that shows no tissue).
    """

    def __init__(self, array: np.ndarray, grid: TileGrid, mode: str, outside: int | None = None) -> None:
        if array.shape[:2] != (grid.height, grid.width):
            raise ValueError(f"array {array.shape[:2]} does not match its grid {(grid.height, grid.width)}")
        if mode == "reflect" and min(array.shape[:2]) < 2:
            mode = "edge"  # as pad_to_grid: nothing to reflect on a one-pixel axis
        self.array = array
        self.grid = grid
        self.mode = mode
        self.outside = 0 if mode == "constant" and outside is None else outside
        self._rows = source_indices(grid.padded_height, grid.pad_top, grid.height, mode)
        self._cols = source_indices(grid.padded_width, grid.pad_left, grid.width, mode)
        self._rows_inside = _inside(grid.padded_height, grid.pad_top, grid.height)
        self._cols_inside = _inside(grid.padded_width, grid.pad_left, grid.width)

    @property
    def nbytes(self) -> int:
        return int(self.array.nbytes)

    def tile(self, origin: tuple[int, int], size: int) -> np.ndarray:
        y, x = int(origin[0]), int(origin[1])
        rows, cols = self._rows[y : y + size], self._cols[x : x + size]
        g = self.grid
        if g.pad_top <= y and y + size <= g.pad_top + g.height and g.pad_left <= x and x + size <= g.pad_left + g.width:
            top, left = y - g.pad_top, x - g.pad_left
            return self.array[top : top + size, left : left + size]
        out = self.array[np.ix_(np.maximum(rows, 0), np.maximum(cols, 0))]
        if self.outside is not None:
            out[~self._rows_inside[y : y + size]] = self.outside
            out[:, ~self._cols_inside[x : x + size]] = self.outside
        return out


def _inside(padded_length: int, before: int, length: int) -> np.ndarray:
    position = np.arange(padded_length) - before
    return (position >= 0) & (position < length)


class TileSource:
    """Tiles by global index; keeps a few decoded images, since consecutive tiles share an image.

    Memory: at most `cached_images` decoded (unpadded) images, and no more than `max_cached_bytes` of them
    except the one being cut (a record decodes whole: ImageRecord has no region loader, and PNG, the
    format of the large BCSS ROIs, cannot be decoded by region anyway). A BCSS ROI at 0.5 mpp is at most
    some 5000 px a side, about 75 MB of RGB.
    """

    def __init__(
        self,
        records: list[ImageRecord],
        entries: list[ImageEntry],
        tile_size: int,
        stride: int,
        pad_mode: str,
        cached_images: int = 2,
        max_cached_bytes: int = 512 * 2**20,
    ) -> None:
        self.records = records
        self.entries = entries
        self.tile_size = tile_size
        self.stride = stride
        self.pad_mode = pad_mode
        self.cached_images = max(1, cached_images)
        self.max_cached_bytes = max_cached_bytes
        self._cache: OrderedDict[int, PaddedView] = OrderedDict()
        self._cache_lock = threading.Lock()  # a dask worker's threads share one source (extract/cluster.py)
        self.tile_image = np.concatenate([np.full(e.n_tiles, i) for i, e in enumerate(entries)]).astype(np.int64)
        self.origins = np.concatenate(
            [np.asarray(grid_of(e, tile_size, stride).origins()).reshape(-1, 2) for e in entries]
        ).astype(np.int64)

    def _view(self, index: int) -> PaddedView:
        with self._cache_lock:
            return self._cached_view(index)

    def _cached_view(self, index: int) -> PaddedView:
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        record = self.records[index]
        view = PaddedView(record.load_rgb(), grid_of(self.entries[index], self.tile_size, self.stride), self.pad_mode)
        self._cache[index] = view
        while len(self._cache) > 1 and (
            len(self._cache) > self.cached_images
            or sum(cached.nbytes for cached in self._cache.values()) > self.max_cached_bytes
        ):
            self._cache.popitem(last=False)
        return view

    def tiles(self, start: int, stop: int) -> np.ndarray:
        """(k, T, T, 3) uint8 tiles start..stop-1."""
        out = np.empty((stop - start, self.tile_size, self.tile_size, 3), dtype=np.uint8)
        for k, tile in enumerate(range(start, stop)):
            out[k] = self._view(int(self.tile_image[tile])).tile(tuple(self.origins[tile]), self.tile_size)
        return out

    def noise_keys(self, start: int, stop: int) -> list[str]:
        return [
            f"{self.records[int(self.tile_image[t])].id}:{self.origins[t][0]}:{self.origins[t][1]}"
            for t in range(start, stop)
        ]


class TileLabels:
    """One image's per-tile label maps, shaped (n, T, T) like their stack but cut only when indexed.

    Stacking every tile of a large ROI would hold its labels again, times the overlap of the grid
    ((T/stride)^2, 1.8x at 256/192). This stands in for that array: indexing, `len`, `shape`, `dtype`,
    `astype` and `np.asarray` work as on the stack, and `batches` yields it a bounded slab at a time.
    A zarr slice assignment (`array[a:b] = tile_labels`) pulls one chunk's tiles at a time.
    """

    def __init__(self, view: PaddedView, origins: list[tuple[int, int]], tile_size: int, dtype=None) -> None:
        self.view = view
        self.origins = origins
        self.tile_size = tile_size
        self.dtype = np.dtype(dtype if dtype is not None else view.array.dtype)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.origins), self.tile_size, self.tile_size)

    @property
    def ndim(self) -> int:
        return 3

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def __len__(self) -> int:
        return len(self.origins)

    def _tile(self, index: int) -> np.ndarray:
        return self.view.tile(self.origins[index], self.tile_size).astype(self.dtype)

    def __getitem__(self, key):
        if isinstance(key, tuple):
            out = self[key[0]] if key else self[:]
            return out[(slice(None), *key[1:])] if out.ndim == 3 else out[key[1:]]
        if isinstance(key, int | np.integer):
            index = int(key) + (len(self) if key < 0 else 0)
            if not 0 <= index < len(self):
                raise IndexError(f"tile {key} of {len(self)}")
            return self._tile(index)
        picked = range(*key.indices(len(self))) if isinstance(key, slice) else np.arange(len(self))[key].tolist()
        out = np.empty((len(picked), self.tile_size, self.tile_size), dtype=self.dtype)
        for k, index in enumerate(picked):
            out[k] = self._tile(int(index))
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        full = self[:]
        return full if dtype is None else full.astype(dtype, copy=False)

    def astype(self, dtype, order: str = "K", copy: bool = True) -> TileLabels:
        return TileLabels(self.view, self.origins, self.tile_size, dtype)

    def batches(self, max_tiles: int = 64) -> Iterator[tuple[int, np.ndarray]]:
        """(first tile, (k, T, T) array) slabs of at most `max_tiles` tiles, in order."""
        for start in range(0, len(self), max_tiles):
            yield start, self[start : start + max_tiles]


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
    record: ImageRecord, entry: ImageEntry, tile_size: int, stride: int, pad_mode: str, ignore_index: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, TileLabels]:
    """(rgb, labels, instances, per-tile labels) of one image; labels are padded like the pixels they label,
    or hold the ignore index where the padding shows no tissue (`padding_label`).

    The per-tile labels come lazily (`TileLabels`), so an image costs its decoded arrays, whatever its size.
    """
    rgb = record.load_rgb()
    labels = record.load_labels()
    instances = record.load_instances() if record.load_instances is not None else None
    if labels.shape != rgb.shape[:2]:
        raise PathsegError(
            f"image {record.id!r}: its mask is {labels.shape[1]}x{labels.shape[0]} but the image is "
            f"{rgb.shape[1]}x{rgb.shape[0]}; fix or remove the pair"
        )
    if labels.shape != (entry.height, entry.width):
        raise PathsegError(
            f"image {record.id!r}: it loads as {labels.shape[1]}x{labels.shape[0]} but was listed as "
            f"{entry.width}x{entry.height}; its dataset's listing and loaders disagree"
        )
    grid = grid_of(entry, tile_size, stride)
    view = PaddedView(labels, grid, pad_mode, outside=padding_label(pad_mode, ignore_index))
    return rgb, labels, instances, TileLabels(view, grid.origins(), tile_size)
