"""A slide's label map out of the working store: pyramidal OME-TIFF, QuPath GeoJSON, overlay, area table.

Everything is read strip by strip from the label array, so no output needs the whole slide in memory.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import zarr
from pathseg.predict.geojson import region_features, write_geojson
from rasterio.features import shapes
from rasterio.transform import Affine
from shapely.geometry import shape
from shapely.ops import unary_union

OME_TILE = 256
WINDOW_ROWS = 2048  # rows polygonised at a time; regions cut by a window edge are merged afterwards


def _levels(height: int, width: int) -> int:
    """Halvings until the coarsest level fits in about 1024 px, as viewers expect of a pyramid."""
    return 1 + max(0, math.ceil(math.log2(max(height, width) / 1024)))


def _tiles(labels: zarr.Array, step: int) -> Iterator[np.ndarray]:
    """Row-major OME_TILE tiles of `labels` taken every `step` pixels (nearest: labels are not averaged)."""
    height, width = -(-labels.shape[0] // step), -(-labels.shape[1] // step)
    for top in range(0, height, OME_TILE):
        rows = np.asarray(labels[top * step : min(height, top + OME_TILE) * step : step, ::step])
        for left in range(0, width, OME_TILE):
            tile = np.zeros((OME_TILE, OME_TILE), dtype=labels.dtype)
            part = rows[:, left : left + OME_TILE]
            tile[: part.shape[0], : part.shape[1]] = part
            yield tile


def write_label_ome_tiff(path: Path, labels: zarr.Array, mpp: float, class_names: list[str] | None,
                        name: str | None = None) -> None:
    """Tiled, pyramidal OME-TIFF of class indices (or, with `name`, of gland ids, uint32), physical pixel size
    recorded: QuPath and napari open it."""
    import tifffile

    height, width = labels.shape
    levels = _levels(height, width)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        with tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tif:
            for level in range(levels):
                step = 2**level
                shape_ = (-(-height // step), -(-width // step))
                per_cm = 1e4 / (mpp * step)
                extra = {"subifds": levels - 1, "metadata": {
                    "axes": "YX", "PhysicalSizeX": mpp, "PhysicalSizeXUnit": "µm", "PhysicalSizeY": mpp,
                    "PhysicalSizeYUnit": "µm", "Name": name or "labels: " + ", ".join(
                        f"{i}={n}" for i, n in enumerate(class_names or []))}} if level == 0 else {"subfiletype": 1}
                tif.write(_tiles(labels, step), shape=shape_, dtype=labels.dtype, tile=(OME_TILE, OME_TILE),
                          compression="zlib", resolution=(per_cm, per_cm), resolutionunit="CENTIMETER", **extra)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def slide_features(labels: zarr.Array, class_names: list[str], *, slide_id: str, skip: set[int],
                   level0_per_px: float, object_type: str, simplify: float, mpp: float) -> list[dict]:
    """One Feature per connected region per class over the whole slide, in level-0 pixels.

    Polygonised a window of rows at a time (pixel edges, holes kept) in integer label pixels, each window
    placed by an integer offset: the pieces of a region cut by a window edge share that edge exactly, so
    their union is the region. Simplified and scaled to level-0 pixels only after the union (`mpp` is
    microns per label pixel).
    """
    pieces: dict[int, list] = {}
    for top in range(0, labels.shape[0], WINDOW_ROWS):
        window = np.asarray(labels[top : top + WINDOW_ROWS])
        for geometry, value in shapes(window, connectivity=4, transform=Affine(1, 0, 0, 0, 1, top)):
            if int(value) not in skip and int(value) < len(class_names):
                pieces.setdefault(int(value), []).append(shape(geometry))
    regions = []
    for index in sorted(pieces):
        merged = unary_union(pieces[index])
        regions += [(index, polygon) for polygon in getattr(merged, "geoms", [merged])]
    return region_features(regions, class_names, image_id=slide_id, scale=level0_per_px, offset=(0.0, 0.0),
                           object_type=object_type, simplify=simplify, um_per_px=mpp)


def write_slide_geojson(path: Path, labels: zarr.Array, class_names: list[str], **options) -> int:
    features = slide_features(labels, class_names, **options)
    write_geojson(path, features)
    return len(features)


def tissue_label_counts(labels: zarr.Array, mask: np.ndarray, rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pixels of every label value 0..255 inside and outside the tissue `mask`, strip by strip.

    The mask spans the slide at any scale (the thumbnail's); each label pixel takes the mask value at its
    centre, as the tiles on tissue were chosen.
    """
    height, width = labels.shape
    rows = rows or WINDOW_ROWS
    columns = np.minimum(((np.arange(width) + 0.5) * mask.shape[1] / width).astype(int), mask.shape[1] - 1)
    inside, outside = np.zeros(256, dtype=np.int64), np.zeros(256, dtype=np.int64)
    for top in range(0, height, rows):
        strip = np.asarray(labels[top : top + rows])
        mask_rows = np.minimum(((np.arange(top, top + strip.shape[0]) + 0.5) * mask.shape[0] / height).astype(int),
                               mask.shape[0] - 1)
        tissue = mask[np.ix_(mask_rows, columns)]
        inside += np.bincount(strip[tissue], minlength=256)
        outside += np.bincount(strip[~tissue], minlength=256)
    return inside, outside


def labels_at(labels: zarr.Array, shape_: tuple[int, int]) -> np.ndarray:
    """The label map resampled (nearest) to `shape_`, e.g. the thumbnail's, without reading all of it."""
    rows = np.minimum((np.arange(shape_[0]) + 0.5) * labels.shape[0] / shape_[0], labels.shape[0] - 1).astype(int)
    cols = np.minimum((np.arange(shape_[1]) + 0.5) * labels.shape[1] / shape_[1], labels.shape[1] - 1).astype(int)
    return np.asarray(labels.get_orthogonal_selection((rows, cols)))
