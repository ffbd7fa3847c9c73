"""Label maps as QuPath GeoJSON: one Feature per connected region per class, holes kept.

rasterio's `shapes` traces pixel edges, so a polygon covers exactly its pixels (areas are exact, and a
rasterised polygon gives the label map back) and a region's holes become interior rings; a popular
toolkit that traces with OpenCV without its hierarchy fills them. Coordinates are level-0 pixels of the
source, origin at the top-left corner, as QuPath expects; `properties.classification` carries the class
name and colour, so QuPath shows the classes as they appear in pathseg's overlays.

Polygons are traced, merged and simplified in integer label pixels, where every shared edge is exact, and
scaled to level-0 pixels once at the end: a float scale applied per piece would leave pieces whose shared
edges differ by an ulp, which a union cannot join.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import shapely
from pathseg.predict.outputs import class_colour
from rasterio.features import shapes
from shapely.geometry import mapping, shape

from pathseg.files import atomic_write_bytes

NAMESPACE = uuid.UUID("5f1d3a52-8a53-4c3e-9d0c-6b0f4f2b7a11")  # ids are UUIDs (QuPath keeps only those), stable


def simplify_coverage(polygons: list, tolerance: float) -> list:
    """Polygons of pixel edges simplified together, so that two regions that share an edge still share it,
    simplified once (no gaps, no overlaps); `tolerance` in the polygons' pixels.

    GEOS's coverage simplification (shapely >= 2.1; Visvalingam-Whyatt, `tolerance` about the square root
    of the triangle areas it removes) matches shared edges by their vertices; pixel-edge tracing leaves out
    the corner where a third region meets a straight edge, so those are put in first. Older shapely
    simplifies each polygon on its own.
    """
    if tolerance <= 0 or not polygons:
        return polygons
    if not hasattr(shapely, "coverage_simplify") or shapely.geos_version < (3, 12, 0):
        return [polygon.simplify(tolerance, preserve_topology=True) for polygon in polygons]
    return list(shapely.coverage_simplify(node_pixel_polygons(polygons), tolerance))


def node_pixel_polygons(polygons: list) -> np.ndarray:
    """The same polygons (integer, axis-aligned edges) with every vertex of any of them that lies inside an
    edge of another inserted into that edge, so that shared edges have the same vertices on both sides."""
    rings, owner = shapely.get_rings(np.asarray(polygons, dtype=object), return_index=True)
    coords, ring_of = shapely.get_coordinates(rings, return_index=True)
    xy = np.rint(coords).astype(np.int64)
    span = int(xy.max()) + 2
    along = {True: np.unique(xy[:, 1] * span + xy[:, 0]), False: np.unique(xy[:, 0] * span + xy[:, 1])}
    p, q = xy[:-1], xy[1:]
    same = ring_of[:-1] == ring_of[1:]
    horizontal = same & (p[:, 1] == q[:, 1])
    low, high = np.zeros(len(p), dtype=np.int64), np.zeros(len(p), dtype=np.int64)
    for is_row, chosen in ((True, horizontal), (False, same & (p[:, 0] == q[:, 0]) & ~horizontal)):
        fixed, moving = (1, 0) if is_row else (0, 1)  # a row edge keeps y and runs along x
        base = p[chosen, fixed] * span
        ends = np.sort(np.stack([p[chosen, moving], q[chosen, moving]]), axis=0)
        low[chosen] = np.searchsorted(along[is_row], base + ends[0], "right")  # vertices strictly inside
        high[chosen] = np.searchsorted(along[is_row], base + ends[1], "left")
    count = high - low
    starts = np.arange(len(xy)) + np.concatenate([[0], np.cumsum(count)])
    out = np.empty((len(xy) + int(count.sum()), 2), dtype=np.int64)
    out_ring = np.empty(len(out), dtype=np.int64)
    out[starts], out_ring[starts] = xy, ring_of
    segment = np.repeat(np.arange(len(p)), count)
    rank = np.arange(len(segment)) - np.repeat(np.cumsum(count) - count, count)
    is_row = horizontal[segment]
    forward = np.where(is_row, p[segment, 0] < q[segment, 0], p[segment, 1] < q[segment, 1])
    pick = np.where(forward, low[segment] + rank, high[segment] - 1 - rank)
    key = np.where(is_row, along[True][np.minimum(pick, len(along[True]) - 1)],
                   along[False][np.minimum(pick, len(along[False]) - 1)])
    first, second = key % span, key // span
    slots = np.repeat(starts[:-1], count) + 1 + rank
    out[slots] = np.where(is_row[:, None], np.stack([first, second], 1), np.stack([second, first], 1))
    out_ring[slots] = ring_of[segment]
    return shapely.polygons(shapely.linearrings(out.astype(np.float64), indices=out_ring), indices=owner)


def region_features(regions: list[tuple[int, object]], class_names: list[str], *, image_id: str, scale: float,
                    offset: tuple[float, float], object_type: str, simplify: float,
                    um_per_px: float | None) -> list[dict]:
    """Features of (class index, polygon in label pixels) regions: simplified together, then scaled to level-0.

    `scale` is level-0 pixels per label pixel, `offset` the label map's corner in level-0 pixels, `simplify` a
    tolerance in level-0 pixels and `um_per_px` the microns per label pixel (None: no area measurement).
    """
    polygons = simplify_coverage([polygon for _, polygon in regions], simplify / scale)
    placed = shapely.transform(np.asarray(polygons, dtype=object),
                               lambda xy: xy * scale + np.asarray(offset)) if polygons else []
    features = []
    counts: dict[int, int] = {}
    for (index, _), polygon, level0 in zip(regions, polygons, placed, strict=True):
        if polygon.is_empty:
            continue
        counts[index] = counts.get(index, 0) + 1
        properties: dict = {
            "objectType": object_type,
            "classification": {"name": class_names[index], "color": list(class_colour(index))},
        }
        if um_per_px is not None:
            properties["measurements"] = {"Area µm^2": round(polygon.area * um_per_px * um_per_px, 3)}
        features.append({
            "type": "Feature",
            "id": str(uuid.uuid5(NAMESPACE, f"{image_id}:{index}:{counts[index]}")),
            "geometry": mapping(level0),
            "properties": properties,
        })
    return features


def label_features(labels: np.ndarray, class_names: list[str], *, image_id: str, skip: set[int] = frozenset(),
                   scale: float = 1.0, offset: tuple[float, float] = (0.0, 0.0), object_type: str = "annotation",
                   simplify: float = 0.0, mpp: float | None = None) -> list[dict]:
    """Features of every connected region of each class not in `skip`.

    `scale` is level-0 pixels per label pixel and `offset` the (x, y) of the label map's corner in level-0
    pixels; `simplify` a tolerance in level-0 pixels (0 keeps the exact pixel edges); `mpp` microns per
    level-0 pixel.
    """
    regions = [(int(value), shape(geometry)) for geometry, value in shapes(labels.astype(np.uint8), connectivity=4)
               if int(value) not in skip and int(value) < len(class_names)]
    return region_features(regions, class_names, image_id=image_id, scale=scale, offset=offset,
                           object_type=object_type, simplify=simplify,
                           um_per_px=None if mpp is None else mpp * scale)


def write_geojson(path: Path, features: list[dict]) -> None:
    atomic_write_bytes(Path(path), json.dumps({"type": "FeatureCollection", "features": features}).encode())
