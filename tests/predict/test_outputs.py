"""predict's per-input outputs from a label map: whole regions across polygonising windows, and area tables
whose fractions are of the tissue (slides) or of the image (plain images)."""

from __future__ import annotations

import csv
from types import SimpleNamespace

import numpy as np
import pytest
import shapely
import zarr
from pathseg.predict import slide_outputs
from pathseg.predict.geojson import label_features
from pathseg.predict.slide_outputs import slide_features
from rasterio.features import rasterize
from shapely.affinity import scale as scale_geometry
from shapely.geometry import mapping, shape

SCALE = 2.7183  # level-0 px per label px: not an integer, so window offsets are not exact in level-0 px


def _long_regions() -> np.ndarray:
    """A gland running down the whole map with a hole, a stroma band beside it (a staircase shared edge)."""
    labels = np.zeros((300, 70), dtype=np.uint8)
    labels[3:297, 10:40] = 1
    for row in range(3, 297):
        labels[row, 40 + (row // 3) % 4 : 60] = 2  # stroma touches the gland along a jagged edge
        labels[row, 40 : 40 + (row // 3) % 4] = 1
    labels[100:140, 20:30] = 0  # a hole in the gland, spanning window edges too
    return labels


def _as_zarr(values: np.ndarray) -> zarr.Array:
    array = zarr.create_array(store={}, shape=values.shape, dtype="uint8", chunks=(64, values.shape[1]))
    array[:] = values
    return array


def _features(labels: np.ndarray, simplify: float = 0.0) -> list[dict]:
    return slide_features(_as_zarr(labels), ["background", "gland", "stroma"], slide_id="s", skip={0},
                          level0_per_px=SCALE, object_type="annotation", simplify=simplify, mpp=0.5)


def _of(features: list[dict], name: str) -> list:
    return [shape(f["geometry"]) for f in features if f["properties"]["classification"]["name"] == name]


@pytest.mark.parametrize("window", [7, 16, 64, 2048])
def test_a_region_across_many_windows_is_one_feature_with_its_hole(monkeypatch, window):
    monkeypatch.setattr(slide_outputs, "WINDOW_ROWS", window)
    labels = _long_regions()
    features = _features(labels)
    glands, stromas = _of(features, "gland"), _of(features, "stroma")
    assert (len(glands), len(stromas)) == (1, 1), f"window {window}: {len(glands)} gland, {len(stromas)} stroma"
    (gland,) = glands
    assert gland.geom_type == "Polygon" and len(gland.interiors) == 1  # the hole kept
    assert gland.area == pytest.approx((labels == 1).sum() * SCALE**2, rel=1e-12)
    back = rasterize([(mapping(scale_geometry(gland, 1 / SCALE, 1 / SCALE, origin=(0, 0))), 1)],
                     out_shape=labels.shape, fill=0, dtype="uint8")
    np.testing.assert_array_equal(back == 1, labels == 1)
    area = features[0]["properties"]["measurements"]["Area µm^2"]
    assert area == pytest.approx((labels == 1).sum() * 0.5**2, abs=1e-3)


@pytest.mark.parametrize("window", [7, 64, 2048])
def test_simplified_regions_stay_whole_and_keep_their_shared_edges(monkeypatch, window):
    monkeypatch.setattr(slide_outputs, "WINDOW_ROWS", window)
    features = _features(_long_regions(), simplify=3.0)
    glands, stromas = _of(features, "gland"), _of(features, "stroma")
    assert (len(glands), len(stromas)) == (1, 1)
    assert len(glands[0].interiors) == 1
    exact = _features(_long_regions())
    assert sum(len(str(f["geometry"])) for f in features) < sum(len(str(f["geometry"])) for f in exact)
    assert glands[0].intersection(stromas[0]).area == pytest.approx(0.0, abs=1e-6)  # no overlap
    if hasattr(shapely, "coverage_is_valid"):
        assert shapely.coverage_is_valid(np.array([glands[0], stromas[0]]))  # the shared edge is one edge: no gap


def test_image_regions_share_their_simplified_edges():
    labels = _long_regions()
    features = label_features(labels, ["background", "gland", "stroma"], image_id="i", skip={0}, scale=SCALE,
                              offset=(10.0, 20.0), simplify=3.0)
    glands, stromas = _of(features, "gland"), _of(features, "stroma")
    assert (len(glands), len(stromas)) == (1, 1) and len(glands[0].interiors) == 1
    assert glands[0].intersection(stromas[0]).area == pytest.approx(0.0, abs=1e-6)
    if hasattr(shapely, "coverage_is_valid"):
        assert shapely.coverage_is_valid(np.array([glands[0], stromas[0]]))


def _read_rows(path) -> list[dict]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_slide_area_fractions_are_of_the_tissue_and_glass_is_kept_apart(tmp_path):
    """A 100 x 100 gland in a 400 x 400 map whose tissue mask is the central 200 x 200: a quarter of the tissue."""
    from pathseg.predict import slide_command

    values = np.zeros((400, 400), dtype=np.uint8)
    values[150:250, 150:250] = 1
    mask = np.zeros((40, 40), dtype=bool)  # the thumbnail's tissue mask, a tenth of the label map's size
    mask[10:30, 10:30] = True
    plan = SimpleNamespace(mpp=0.5, thumbnail=np.full((40, 40, 3), 230, dtype=np.uint8), mask=mask)
    predictor = SimpleNamespace(class_names=["background", "gland"], run=SimpleNamespace(record={}))
    slide_command._write_outputs(tmp_path, tmp_path / "s.tif", SimpleNamespace(mpp=0.25), plan, _as_zarr(values),
                                 predictor, 0, "annotation", 0.0)
    rows = {row["class"]: row for row in _read_rows(tmp_path / "areas.csv")}
    gland, background = rows["gland"], rows["background"]
    assert float(gland.get("fraction_of_tissue", gland.get("fraction"))) == pytest.approx(0.25)
    assert int(gland["pixels"]) == 100 * 100
    assert float(gland["area_mm2"]) == pytest.approx(100 * 100 * (0.5 / 1000) ** 2)
    assert int(background["pixels"]) == 200 * 200 - 100 * 100  # background inside the tissue
    assert int(background["outside_tissue_pixels"]) == 400 * 400 - 200 * 200  # the glass, kept apart
    assert int(gland["outside_tissue_pixels"]) == 0


def test_image_area_fractions_say_they_are_of_the_image(tmp_path):
    from pathseg.predict.outputs import area_rows, write_area_table

    labels = np.zeros((40, 50), dtype=np.uint8)
    labels[:10, :20] = 1
    write_area_table(tmp_path / "areas.csv", area_rows(labels, ["background", "gland"], 0.5))
    rows = _read_rows(tmp_path / "areas.csv")
    assert list(rows[0]) == ["class", "pixels", "area_mm2", "fraction_of_image"]
    assert float(rows[1]["fraction_of_image"]) == pytest.approx(200 / 2000)
