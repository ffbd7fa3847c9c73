"""Label maps as QuPath GeoJSON: one Feature per connected region per class, holes kept.

rasterio's `shapes` traces pixel edges, so a polygon covers exactly its pixels (areas are exact, and a
rasterised polygon gives the label map back) and a region's holes become interior rings; a popular
toolkit that traces with OpenCV without its hierarchy fills them. Coordinates are level-0 pixels of the
source, origin at the top-left corner, as QuPath expects; `properties.classification` carries the class
name and colour, so QuPath shows the classes as they appear in pathseg's overlays.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
from pathseg.predict.outputs import class_colour
from rasterio.features import shapes
from rasterio.transform import Affine
from shapely.geometry import mapping, shape

from pathseg.files import atomic_write_bytes

NAMESPACE = uuid.UUID("5f1d3a52-8a53-4c3e-9d0c-6b0f4f2b7a11")  # ids are UUIDs (QuPath keeps only those), stable


def label_features(labels: np.ndarray, class_names: list[str], *, image_id: str, skip: set[int] = frozenset(),
                   scale: float = 1.0, offset: tuple[float, float] = (0.0, 0.0), object_type: str = "annotation",
                   simplify: float = 0.0, mpp: float | None = None) -> list[dict]:
    """Features of every connected region of each class not in `skip`.

    `scale` is level-0 pixels per label pixel and `offset` the (x, y) of the label map's corner in level-0
    pixels; `simplify` a tolerance in level-0 pixels (0 keeps the exact pixel edges).
    """
    transform = Affine(scale, 0.0, offset[0], 0.0, scale, offset[1])
    features = []
    counts: dict[int, int] = {}
    for geometry, value in shapes(labels.astype(np.uint8), connectivity=4, transform=transform):
        index = int(value)
        if index in skip or index >= len(class_names):
            continue
        polygon = shape(geometry)
        if simplify > 0:
            polygon = polygon.simplify(simplify, preserve_topology=True)
        if polygon.is_empty:
            continue
        counts[index] = counts.get(index, 0) + 1
        properties: dict = {
            "objectType": object_type,
            "classification": {"name": class_names[index], "color": list(class_colour(index))},
        }
        if mpp is not None:
            properties["measurements"] = {"Area µm^2": round(polygon.area * mpp * mpp, 3)}
        features.append({
            "type": "Feature",
            "id": str(uuid.uuid5(NAMESPACE, f"{image_id}:{index}:{counts[index]}")),
            "geometry": mapping(polygon),
            "properties": properties,
        })
    return features


def write_geojson(path: Path, features: list[dict]) -> None:
    atomic_write_bytes(Path(path), json.dumps({"type": "FeatureCollection", "features": features}).encode())
