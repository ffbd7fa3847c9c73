"""A slide's label map out of the working store: pyramidal OME-TIFF, QuPath GeoJSON, overlay, area table.

Everything is read strip by strip from the label array, so no output needs the whole slide in memory.
"""

from __future__ import annotations

import math
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import zarr
from pathseg.predict.geojson import NAMESPACE, write_geojson
from rasterio.features import shapes
from rasterio.transform import Affine
from shapely.geometry import mapping, shape
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
            tile = np.zeros((OME_TILE, OME_TILE), dtype=np.uint8)
            part = rows[:, left : left + OME_TILE]
            tile[: part.shape[0], : part.shape[1]] = part
            yield tile


def write_label_ome_tiff(path: Path, labels: zarr.Array, mpp: float, class_names: list[str]) -> None:
    """Tiled, pyramidal OME-TIFF of class indices, physical pixel size recorded: QuPath and napari open it."""
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
                    "PhysicalSizeYUnit": "µm", "Name": "labels: " + ", ".join(
                        f"{i}={name}" for i, name in enumerate(class_names))}} if level == 0 else {"subfiletype": 1}
                tif.write(_tiles(labels, step), shape=shape_, dtype=np.uint8, tile=(OME_TILE, OME_TILE),
                          compression="zlib", resolution=(per_cm, per_cm), resolutionunit="CENTIMETER", **extra)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def slide_features(labels: zarr.Array, class_names: list[str], *, slide_id: str, skip: set[int],
                   level0_per_px: float, object_type: str, simplify: float, mpp: float) -> list[dict]:
    """One Feature per connected region per class over the whole slide, in level-0 pixels.

    Polygonised a window of rows at a time (pixel edges, holes kept); the pieces of a region cut by a window
    edge share that edge exactly, so their union is the region.
    """
    from pathseg.predict.outputs import class_colour

    pieces: dict[int, list] = {}
    for top in range(0, labels.shape[0], WINDOW_ROWS):
        window = np.asarray(labels[top : top + WINDOW_ROWS])
        transform = Affine(level0_per_px, 0.0, 0.0, 0.0, level0_per_px, top * level0_per_px)
        for geometry, value in shapes(window, connectivity=4, transform=transform):
            if int(value) not in skip and int(value) < len(class_names):
                pieces.setdefault(int(value), []).append(shape(geometry))
    features = []
    for index in sorted(pieces):
        merged = unary_union(pieces[index])
        polygons = list(getattr(merged, "geoms", [merged]))
        for number, polygon in enumerate(polygons, start=1):
            if simplify > 0:
                polygon = polygon.simplify(simplify, preserve_topology=True)
            if polygon.is_empty:
                continue
            area_um2 = polygon.area * (mpp / level0_per_px) ** 2
            features.append({
                "type": "Feature",
                "id": str(uuid.uuid5(NAMESPACE, f"{slide_id}:{index}:{number}")),
                "geometry": mapping(polygon),
                "properties": {"objectType": object_type,
                               "classification": {"name": class_names[index], "color": list(class_colour(index))},
                               "measurements": {"Area µm^2": round(area_um2, 3)}},
            })
    return features


def write_slide_geojson(path: Path, labels: zarr.Array, class_names: list[str], **options) -> int:
    features = slide_features(labels, class_names, **options)
    write_geojson(path, features)
    return len(features)


def label_counts(labels: zarr.Array, rows: int = WINDOW_ROWS) -> np.ndarray:
    """Pixels of every label value 0..255, strip by strip."""
    counts = np.zeros(256, dtype=np.int64)
    for top in range(0, labels.shape[0], rows):
        counts += np.bincount(np.asarray(labels[top : top + rows]).ravel(), minlength=256)
    return counts


def labels_at(labels: zarr.Array, shape_: tuple[int, int]) -> np.ndarray:
    """The label map resampled (nearest) to `shape_`, e.g. the thumbnail's, without reading all of it."""
    rows = np.minimum((np.arange(shape_[0]) + 0.5) * labels.shape[0] / shape_[0], labels.shape[0] - 1).astype(int)
    cols = np.minimum((np.arange(shape_[1]) + 0.5) * labels.shape[1] / shape_[1], labels.shape[1] - 1).astype(int)
    return np.asarray(labels.get_orthogonal_selection((rows, cols)))
