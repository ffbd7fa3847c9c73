"""The feature store: the only code that knows the on-disk layout shared by both stages.

One Zarr v3 group per (dataset, backbone weights, conditioning, tiling, noise seed):

    zarr.json                      attrs: schema, fingerprint, identity, config, versions, images table
    tiles/image   (n,)  int32      image index of every tile
    tiles/origin  (n,2) int32      top-left corner in padded image coordinates
    tiles/labels  (n,T,T) uint8    per-tile label maps
    images/{i}/rgb, labels, instances   whole images, for stitched evaluation and overlays
    images/done   (n_images,) uint8     1 once an image's arrays are written
    features/t{t:04d}/{block}  (n,C,h,w) float16 (or float32), one tile per chunk, shards of S tiles, zstd
    done/t{t:04d}/{block}      (n_shards,) uint8, 1 once that shard's features are written
    latents/z0    (n,c,h,w) float32     the first-stage latent of every tile (extensions skip the encoder)
    done/latents  (n_shards,) uint8

A flag is written only after the data it vouches for has been flushed to disk (fsync), so a killed
run, even by SIGKILL or a power cut, leaves at worst unflagged work, which the next run redoes. Every
chunk carries zstd's content checksum, so a flipped bit on disk fails its read (one line naming the array)
instead of decoding into different numbers; attrs are checked on opening (`schema.py`). A new
store is laid out in a side directory and renamed into place, so a half-created store never looks
like one. Blocks keep their native resolution: upsampling is the head's job.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pathseg.errors import PathsegError
from pathseg.imaging.tiling import TileGrid
from pathseg.store.disk import _fsync_dir, _fsync_file, _fsync_tree, error_reason, read_array, read_rows
from pathseg.store.feature_arrays import FeatureArrays, zstd
from pathseg.store.identity import (
    SCHEMA_VERSION,
    digest,
    software_versions,
)
from pathseg.store.names import feature_key
from pathseg.store.schema import check_store_attrs


@dataclass(frozen=True)
class ImageEntry:
    """A row of the image table: enough to stitch tiles back without opening the source image."""

    id: str
    split: str
    height: int
    width: int
    pad_top: int
    pad_left: int
    rows: int
    cols: int
    first_tile: int

    @property
    def n_tiles(self) -> int:
        return self.rows * self.cols

    def grid(self, tile_size: int, stride: int) -> TileGrid:
        return TileGrid(self.height, self.width, tile_size, stride, self.pad_top, self.pad_left, self.rows, self.cols)


class FeatureStore(FeatureArrays):
    def __init__(self, path: Path, group: zarr.Group) -> None:
        self.path = Path(path)
        self.group = group
        self._fixed: dict[str, Any] = {}  # parts that never change after creation, read once

    # ---- opening -------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: Path, mode: str = "r") -> FeatureStore:
        path = Path(path)
        if not (path / "zarr.json").exists():
            raise PathsegError(f"no feature store at {path}; run `pathseg extract` first (or pass the right --store)")
        try:
            group = zarr.open_group(str(path), mode=mode)
            attrs = dict(group.attrs)
        except Exception as error:  # zarr raises whatever its parsing of a damaged zarr.json meets
            raise PathsegError(f"{path} is not a readable feature store ({str(error).splitlines()[0]}); "
                               "re-extract it with --overwrite") from None
        store = cls(path, group)
        version = attrs.get("schema_version")
        if version != SCHEMA_VERSION:
            raise PathsegError(
                f"{path}: store schema {version} is not {SCHEMA_VERSION}; re-extract it with this pathseg version"
            )
        if "identity" not in attrs or digest(attrs["identity"]) != attrs.get("fingerprint"):
            raise PathsegError(
                f"{path}: its recorded identity does not match its fingerprint (edited or mixed stores?); "
                "run `pathseg cache verify` on it, or re-extract with --overwrite"
            )
        check_store_attrs(path, attrs, feature_key)
        try:
            tables = group.get("tiles/image")
        except Exception:  # its zarr.json is damaged: zarr raises whatever its parser meets
            tables = None
        planned = sum(row["rows"] * row["cols"] for row in attrs["images"])
        if not isinstance(tables, zarr.Array) or tables.ndim != 1 or tables.shape[0] != planned:
            raise PathsegError(f"{path}: tiles/image does not match the image table in its attrs (edited or "
                               "damaged); re-extract it with --overwrite")
        for key in ("tiles/origin", "tiles/labels", "images/done"):  # read by every stage: checked once, here
            store._array(key)
        return store

    @classmethod
    def create(
        cls,
        path: Path,
        *,
        fingerprint: str,
        identity: dict,
        config: dict,
        class_names: list[str],
        ignore_index: int | None,
        tile_size: int,
        stride: int,
        images: list[ImageEntry],
        origins: np.ndarray,
        has_instances: bool,
        compression_level: int = 3,
        tiles_per_shard: int = 16,
    ) -> FeatureStore:
        """Lay out a new store; features are added later, array by array, as extraction asks for them.

        Built in `<path>.creating` and renamed into place once its tables and attrs are written.
        """
        path = Path(path)
        building = path.with_name(path.name + ".creating")
        if building.exists():
            shutil.rmtree(building)
        path.parent.mkdir(parents=True, exist_ok=True)
        group = zarr.open_group(str(building), mode="w")
        n_tiles = int(sum(entry.n_tiles for entry in images))
        image_index = np.concatenate([np.full(e.n_tiles, i, dtype=np.int32) for i, e in enumerate(images)])
        compressor = zstd(compression_level)
        group.create_array("tiles/image", data=image_index, chunks=(max(n_tiles, 1),), compressors=compressor)
        group.create_array(
            "tiles/origin", data=origins.astype(np.int32), chunks=(max(n_tiles, 1), 2), compressors=compressor
        )
        group.create_array(
            "tiles/labels",
            shape=(n_tiles, tile_size, tile_size),
            dtype="uint8",
            chunks=(1, tile_size, tile_size),
            compressors=compressor,
            fill_value=0,
        )
        group.create_array("images/done", shape=(len(images),), dtype="uint8", chunks=(1,), fill_value=0,
                           compressors=compressor)
        group.attrs.update(
            {
                "schema_version": SCHEMA_VERSION,
                "fingerprint": fingerprint,
                "identity": identity,
                "config": config,
                "versions": software_versions(),
                "class_names": class_names,
                "ignore_index": ignore_index,
                "tile_size": tile_size,
                "stride": stride,
                "has_instances": has_instances,
                "compression_level": compression_level,
                "tiles_per_shard": max(1, min(tiles_per_shard, n_tiles)),
                "images": [entry.__dict__ for entry in images],
                "features": {},
            }
        )
        _fsync_tree(building)
        if path.exists():
            shutil.rmtree(path)
        building.rename(path)
        _fsync_dir(path.parent)
        return cls(path, zarr.open_group(str(path), mode="r+"))

    # ---- metadata ------------------------------------------------------------------------------

    @property
    def attrs(self) -> dict:
        return dict(self.group.attrs)

    @property
    def fingerprint(self) -> str:
        return self.attrs["fingerprint"]

    @property
    def class_names(self) -> list[str]:
        return list(self.attrs["class_names"])

    @property
    def ignore_index(self) -> int | None:
        return self.attrs["ignore_index"]

    @property
    def tile_size(self) -> int:
        return int(self.attrs["tile_size"])

    @property
    def stride(self) -> int:
        return int(self.attrs["stride"])

    @property
    def has_instances(self) -> bool:
        return bool(self.attrs["has_instances"])

    def image_grid(self, index: int) -> TileGrid:
        return self.images[index].grid(self.tile_size, self.stride)

    @property
    def images(self) -> list[ImageEntry]:
        if "images" not in self._fixed:
            self._fixed["images"] = [ImageEntry(**row) for row in self.attrs["images"]]
        return self._fixed["images"]

    @property
    def n_tiles(self) -> int:
        return int(self._array("tiles/image").shape[0])

    def tile_images(self) -> np.ndarray:
        if "tile_images" not in self._fixed:
            self._fixed["tile_images"] = read_array(self._array("tiles/image"))
        return self._fixed["tile_images"]

    def tile_origins(self) -> np.ndarray:
        if "tile_origins" not in self._fixed:
            self._fixed["tile_origins"] = read_array(self._array("tiles/origin"))
        return self._fixed["tile_origins"]

    def tiles_of_splits(self, splits: list[str]) -> np.ndarray:
        """Indices of all tiles whose image is in one of `splits`, in storage order."""
        wanted = [i for i, entry in enumerate(self.images) if entry.split in splits]
        return np.flatnonzero(np.isin(self.tile_images(), wanted))

    def splits(self) -> list[str]:
        return list(dict.fromkeys(entry.split for entry in self.images))

    def member(self, key: str) -> zarr.Array | zarr.Group | None:
        """The array or group at `key`, None when absent; metadata that does not parse is damage, in one line."""
        try:
            return self.group.get(key)
        except Exception as error:  # zarr raises whatever its JSON and metadata parsing meets
            raise PathsegError(f"{self.path}: {key} has unreadable metadata ({error_reason(error)}); the store is "
                               "damaged: run `pathseg cache verify`, then re-extract with --overwrite") from None

    def _array(self, key: str) -> zarr.Array:
        node = self.member(key)
        if not isinstance(node, zarr.Array):
            raise PathsegError(f"{self.path}: {key} is missing; the store is damaged: run `pathseg cache verify`, "
                               "then re-extract with --overwrite")
        return node

    # ---- images and labels ---------------------------------------------------------------------

    def image_done(self) -> np.ndarray:
        return self._flags("images/done")

    def write_image(
        self, index: int, rgb: np.ndarray, labels: np.ndarray, instances: np.ndarray | None, tile_labels: np.ndarray
    ) -> None:
        """An image's pixels, label maps and per-tile labels, then its done flag, in that order."""
        entry = self.images[index]
        if rgb.shape[:2] != (entry.height, entry.width) or labels.shape != (entry.height, entry.width):
            raise PathsegError(
                f"image {entry.id!r}: pixels {rgb.shape[:2]} or labels {labels.shape} differ from the recorded size "
                f"{(entry.height, entry.width)}"
            )
        compressor = zstd(int(self.attrs["compression_level"]))
        chunk = (min(entry.height, 1024), min(entry.width, 1024))
        base = f"images/{index}"
        self.group.create_array(f"{base}/rgb", data=rgb, chunks=(*chunk, 3), compressors=compressor, overwrite=True)
        self.group.create_array(
            f"{base}/labels", data=labels.astype(np.uint8), chunks=chunk, compressors=compressor, overwrite=True
        )
        if instances is not None:
            self.group.create_array(
                f"{base}/instances",
                data=instances.astype(np.int32),
                chunks=chunk,
                compressors=compressor,
                overwrite=True,
            )
        start = entry.first_tile
        target = self._array("tiles/labels")
        slabs = tile_labels.batches() if hasattr(tile_labels, "batches") else [(0, tile_labels)]
        for offset, slab in slabs:  # lazily cut tiles of a large ROI arrive a bounded slab at a time
            slab = np.asarray(slab, dtype=np.uint8)
            target[start + offset : start + offset + len(slab)] = slab
        _fsync_tree(self.path / base)
        for tile in range(start, start + entry.n_tiles):  # this image's label chunks only, not the whole array
            _fsync_file(self.path / "tiles" / "labels" / "c" / str(tile))
        self._array("images/done")[index] = 1
        _fsync_file(self.path / "images" / "done" / "c" / str(index))

    def image_rgb(self, index: int) -> np.ndarray:
        return read_array(self._image_array(index, "rgb"))

    def image_labels(self, index: int) -> np.ndarray:
        return read_array(self._image_array(index, "labels"))

    def image_instances(self, index: int) -> np.ndarray | None:
        key = f"images/{index}/instances"
        return read_array(self._image_array(index, "instances")) if self.member(key) is not None else None

    def _image_array(self, index: int, part: str) -> zarr.Array:
        key = f"images/{index}/{part}"
        array = self.member(key)
        entry = self.images[index]
        shape = (entry.height, entry.width, 3) if part == "rgb" else (entry.height, entry.width)
        if not isinstance(array, zarr.Array) or tuple(array.shape) != shape:
            raise PathsegError(f"{self.path}: {key} is missing or not {entry.height}x{entry.width} (image "
                               f"{entry.id!r} is flagged written); run `pathseg cache verify`, or rerun `pathseg "
                               "extract` with --overwrite")
        return array

    def _flags(self, key: str) -> np.ndarray:
        """A done-flag array as booleans; any value but 0 or 1 means the flags themselves are damaged."""
        flags = read_array(self._array(key), what="(done flags)")
        if flags.size and not np.isin(flags, (0, 1)).all():
            raise PathsegError(f"{self.path}: {key} holds values other than 0 and 1, so its done flags are "
                               "damaged; run `pathseg cache verify`, then re-extract with --overwrite")
        return flags.astype(bool)

    def tile_labels(self, tiles: np.ndarray | slice) -> np.ndarray:
        return read_rows(self._array("tiles/labels"), tiles)

    # ---- features ------------------------------------------------------------------------------
