"""Per-gland outputs: measurements, `instances.csv` and one QuPath GeoJSON feature per gland, with shared ids.

Measurements are gathered strip by strip, so a slide's glands are measured whole without the slide in memory:
pixel moments (area, centroid, eccentricity) are sums over the object's pixels, and the outline is the union
of the pixel-edge polygons of its pieces, which meet exactly at a strip edge (integer coordinates). The
perimeter is taken on that outline simplified by one pixel, because the raw pixel staircase overstates a
round gland's perimeter by about 4/pi. Solidity is area over the area of the outline's convex hull, and
eccentricity is the one of the ellipse with the same second moments (as scikit-image defines both).
"""

from __future__ import annotations

import csv
import io
import math
import uuid
from pathlib import Path

import numpy as np
import shapely
from pathseg.predict.geojson import NAMESPACE, simplify_coverage
from pathseg.predict.outputs import class_colour
from rasterio.features import shapes
from rasterio.transform import Affine
from shapely.geometry import mapping, shape
from shapely.ops import unary_union

from pathseg.files import atomic_write_bytes

PERIMETER_TOLERANCE = 1.0  # px: removes the pixel staircase (within 2% of 2 pi r for r = 8-60 px), keeps the shape


class GlandMeasures:
    """Running sums per gland id over the strips of an instance map, and the pieces of each outline."""

    def __init__(self) -> None:
        self.sums = np.zeros((6, 1), dtype=np.float64)  # n, sum x, sum y, sum xx, sum yy, sum xy (pixel centres)
        self.pieces: dict[int, list] = {}

    def add(self, block: np.ndarray, top: int) -> None:
        """One strip of the final instance map, whose first row is row `top` of the whole map."""
        block = np.asarray(block)
        if not block.any():
            return
        ids = block.astype(np.int64).ravel()
        size = int(ids.max()) + 1
        if size > self.sums.shape[1]:
            self.sums = np.pad(self.sums, ((0, 0), (0, size - self.sums.shape[1])))
        y, x = np.indices(block.shape, dtype=np.float64)
        x, y = (x + 0.5).ravel(), (y + top + 0.5).ravel()
        for row, weights in enumerate((None, x, y, x * x, y * y, x * y)):
            self.sums[row, :size] += np.bincount(ids, weights=weights, minlength=size)
        for geometry, value in shapes(block.astype(np.int32), mask=block > 0, connectivity=4,
                                      transform=Affine(1, 0, 0, 0, 1, top)):
            self.pieces.setdefault(int(value), []).append(shape(geometry))

    def outlines(self) -> dict[int, object]:
        return {gland: unary_union(pieces) for gland, pieces in sorted(self.pieces.items())}

    def rows(self, outlines: dict[int, object], um_per_px: float | None) -> list[dict]:
        """One row per gland, by id; lengths and areas in µm when the resolution is known, else in px."""
        unit = "um" if um_per_px else "px"
        scale = um_per_px or 1.0
        rows = []
        for gland, outline in outlines.items():
            n, sx, sy, sxx, syy, sxy = self.sums[:, gland]
            cx, cy = sx / n, sy / n
            cov = np.array([[sxx / n - cx * cx, sxy / n - cx * cy], [sxy / n - cx * cy, syy / n - cy * cy]])
            small, large = np.linalg.eigvalsh(cov)
            eccentricity = math.sqrt(max(0.0, 1 - small / large)) if large > 0 else 0.0
            hull = outline.convex_hull.area
            rows.append({
                "id": gland, "centroid_x_px": round(cx, 2), "centroid_y_px": round(cy, 2),
                f"area_{unit}2": round(n * scale * scale, 3),
                f"perimeter_{unit}": round(outline.simplify(PERIMETER_TOLERANCE).length * scale, 3),
                f"equivalent_diameter_{unit}": round(math.sqrt(4 * n / math.pi) * scale, 3),
                "solidity": round(n / hull, 4) if hull else 1.0, "eccentricity": round(eccentricity, 4),
            })
        return rows


def measure(instances: np.ndarray, um_per_px: float | None) -> tuple[dict[int, object], list[dict]]:
    """Outlines and rows of a whole (image) instance map."""
    measures = GlandMeasures()
    measures.add(instances, 0)
    outlines = measures.outlines()
    return outlines, measures.rows(outlines, um_per_px)


def gland_features(outlines: dict[int, object], rows: list[dict], *, image_id: str, class_name: str,
                   class_index: int, scale: float, object_type: str, simplify: float) -> list[dict]:
    """One Feature per gland (level-0 pixels: `scale` level-0 px per instance-map px), measurements attached;
    each row gets the feature's id, so the table and the GeoJSON can be joined."""
    ids = list(outlines)
    parts, owners = [], []  # a gland whose pixels touch only at a corner is a MultiPolygon: simplified by parts
    for position, gland in enumerate(ids):
        for part in getattr(outlines[gland], "geoms", [outlines[gland]]):
            parts.append(part)
            owners.append(position)
    simplified = simplify_coverage(parts, simplify / scale)
    grouped: list[list] = [[] for _ in ids]
    for owner, part in zip(owners, simplified, strict=True):
        if not part.is_empty:
            grouped[owner].append(part)
    polygons = [unary_union(group) for group in grouped]
    features = []
    for gland, polygon, row in zip(ids, polygons, rows, strict=True):
        feature_id = str(uuid.uuid5(NAMESPACE, f"{image_id}:gland:{gland}"))
        row["feature_id"] = feature_id
        placed = shapely.transform(polygon, lambda xy: xy * scale)
        measurements = {_label(key): value for key, value in row.items()
                        if key not in ("id", "feature_id", "centroid_x_px", "centroid_y_px")}
        features.append({
            "type": "Feature", "id": feature_id, "geometry": mapping(placed),
            "properties": {"objectType": object_type, "name": f"gland {gland}",
                           "classification": {"name": class_name, "color": list(class_colour(class_index))},
                           "measurements": measurements},
        })
    return features


def _label(key: str) -> str:
    """QuPath's measurement names: words and a unit, e.g. 'Area µm^2'."""
    words, _, unit = key.rpartition("_")
    name = words.replace("_", " ").capitalize()
    unit = {"um2": "µm^2", "px2": "px^2", "um": "µm", "px": "px"}.get(unit)
    return f"{name} {unit}" if unit else key.capitalize()


def write_gland_table(path: Path, rows: list[dict], um_per_px: float | None) -> None:
    unit = "um" if um_per_px else "px"
    columns = ["id", "feature_id", "centroid_x_px", "centroid_y_px", f"area_{unit}2", f"perimeter_{unit}",
               f"equivalent_diameter_{unit}", "solidity", "eccentricity"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, buffer.getvalue().encode())


def write_instance_tiff(path: Path, instances: np.ndarray) -> None:
    """The instance map of an image as uint32 TIFF: 0 = no gland, ids as in instances.csv."""
    import tifffile

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, instances.astype(np.uint32), compression="zlib")
    atomic_write_bytes(path, buffer.getvalue())
