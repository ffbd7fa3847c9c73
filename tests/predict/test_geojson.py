"""QuPath GeoJSON from label maps: polygons rasterised back give the label map, holes stay holes."""

from __future__ import annotations

import json

import numpy as np
from pathseg.predict.geojson import label_features, write_geojson
from rasterio.features import rasterize
from shapely.geometry import shape


def _label_map() -> np.ndarray:
    rng = np.random.default_rng(3)
    labels = np.zeros((120, 160), dtype=np.uint8)
    labels[10:70, 10:90] = 1
    labels[30:50, 30:60] = 0  # a hole in class 1
    labels[35:45, 40:50] = 2  # an island of class 2 inside the hole
    labels[80:115, 100:150] = 2
    noise = rng.random(labels.shape) < 0.01
    labels[noise] = rng.integers(0, 3, size=noise.sum())
    return labels


def test_polygons_rasterise_back_to_the_label_map_with_holes(tmp_path):
    labels = _label_map()
    names = ["background", "gland", "stroma"]
    features = label_features(labels, names, image_id="img", skip={0}, mpp=0.5)
    write_geojson(tmp_path / "r.geojson", features)
    collection = json.loads((tmp_path / "r.geojson").read_text())
    assert collection["type"] == "FeatureCollection"
    for index in (1, 2):
        ours = [f for f in collection["features"] if f["properties"]["classification"]["name"] == names[index]]
        back = rasterize([(f["geometry"], 1) for f in ours], out_shape=labels.shape, fill=0, dtype="uint8")
        truth = labels == index
        iou = (truth & (back == 1)).sum() / (truth | (back == 1)).sum()
        assert iou >= 0.99, (names[index], iou)
        assert sum(shape(f["geometry"]).area for f in ours) == truth.sum()  # pixel-edge polygons: exact areas
    holed = [f for f in collection["features"] if f["properties"]["classification"]["name"] == "gland"
             and len(f["geometry"]["coordinates"]) > 1]
    assert holed, "the hole of the gland region was filled"
    first = collection["features"][0]
    assert first["properties"]["objectType"] == "annotation"
    assert len(first["properties"]["classification"]["color"]) == 3
    assert "Area µm^2" in first["properties"]["measurements"]
    assert all(f["properties"]["classification"]["name"] != "background" for f in collection["features"])


def test_coordinates_are_level_zero_pixels():
    labels = np.zeros((10, 10), dtype=np.uint8)
    labels[2:4, 5:8] = 1
    (feature,) = label_features(labels, ["bg", "x"], image_id="s", skip={0}, scale=4.0, offset=(1000.0, 2000.0),
                                object_type="detection")
    minx, miny, maxx, maxy = shape(feature["geometry"]).bounds
    assert (minx, miny, maxx, maxy) == (1000 + 4 * 5, 2000 + 4 * 2, 1000 + 4 * 8, 2000 + 4 * 4)
    assert feature["properties"]["objectType"] == "detection"
    simplified = label_features(_label_map(), ["bg", "a", "b"], image_id="s", skip={0}, simplify=2.0)
    exact = label_features(_label_map(), ["bg", "a", "b"], image_id="s", skip={0})
    assert sum(len(json.dumps(f["geometry"])) for f in simplified) < sum(len(json.dumps(f["geometry"])) for f in exact)
