"""Glands as objects in predict: strip decoding equals whole decoding, measurements, and the three outputs' ids."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import zarr
from pathseg.predict import glands
from pathseg.predict.gland_outputs import measure
from pathseg.predict.slide_glands import decode_slide, write_slide_glands
from skimage.measure import regionprops

from pathseg.config import InstancesConfig
from pathseg.metrics.instances import decode_instances

tifffile = pytest.importorskip("tifffile")
NAMES = ["background", "gland", "contour"]


def _ellipse(shape, centre, radii):
    y, x = np.ogrid[: shape[0], : shape[1]]
    return ((y - centre[0]) / radii[0]) ** 2 + ((x - centre[1]) / radii[1]) ** 2 <= 1


def _probabilities(objects: list[np.ndarray], band: int = 2) -> np.ndarray:
    """Sharp background / gland / contour probabilities of drawn objects, a contour band inside each rim."""
    from scipy import ndimage

    p = np.full((3, *objects[0].shape), 0.02, dtype=np.float32)
    p[0] = 0.96
    for mask in objects:
        rim = mask & ~ndimage.binary_erosion(mask, iterations=band)
        p[:, mask] = 0.02
        p[1, mask & ~rim] = 0.96
        p[2, rim] = 0.96
    return p


def _same_partition(first: np.ndarray, second: np.ndarray) -> bool:
    """Equal up to a renumbering of the ids."""
    if not np.array_equal(first > 0, second > 0):
        return False
    pairs = np.unique(np.stack([first[first > 0], second[first > 0]]), axis=1)
    return len(set(pairs[0])) == pairs.shape[1] == len(set(pairs[1]))


def test_strip_decoding_equals_whole_decoding_across_many_seams():
    """Tall glands, two of them touching, crossing several strips: the same objects as one whole decode."""
    shape = (400, 160)
    objects = [_ellipse(shape, (200, 40), (180, 30)),  # crosses every seam
               _ellipse(shape, (120, 112), (60, 38)), _ellipse(shape, (250, 112), (70, 38)),  # touching pair
               _ellipse(shape, (380, 140), (8, 8))]  # small, at a seam
    objects[2] &= ~objects[1]
    probabilities = _probabilities(objects)
    settings = InstancesConfig(min_area=0)
    whole = decode_instances(probabilities, NAMES, settings)
    out = np.zeros(shape, dtype=np.uint32)
    count = glands.decode_in_strips(probabilities, lambda b: decode_instances(b, NAMES, settings), out, 0,
                                    strip_rows=48, halo=16)
    assert count == int(whole.max()) == 4
    assert _same_partition(whole, out.astype(np.int64))
    assert np.array_equal(np.unique(out), np.arange(5))  # ids 1..n, consecutive


def test_minimum_area_is_applied_to_whole_objects_not_strip_pieces():
    shape = (200, 40)
    tall = _ellipse(shape, (100, 20), (90, 6))  # ~1,700 px, ~10 px wide: each 16-row piece is ~150 px
    probabilities = _probabilities([tall], band=1)
    settings = InstancesConfig(min_area=0)
    out = np.zeros(shape, dtype=np.uint32)
    decode = lambda b: decode_instances(b, NAMES, settings)  # noqa: E731
    assert glands.decode_in_strips(probabilities, decode, out, 1000, strip_rows=16, halo=8) == 1
    assert glands.decode_in_strips(probabilities, decode, out, 5000, strip_rows=16, halo=8) == 0
    assert not out.any()


def test_measurements_match_scikit_image():
    instances = np.zeros((120, 160), dtype=np.uint32)
    instances[_ellipse(instances.shape, (40, 40), (20, 20))] = 1
    instances[80:90, 60:100] = 2
    instances[_ellipse(instances.shape, (60, 130), (25, 10))] = 3
    _, rows = measure(instances, 0.5)
    for row, region in zip(rows, regionprops(instances.astype(np.int64)), strict=True):
        assert row["id"] == region.label
        assert row["area_um2"] == pytest.approx(region.area * 0.25)
        assert row["equivalent_diameter_um"] == pytest.approx(region.equivalent_diameter_area * 0.5, rel=1e-4)
        assert row["eccentricity"] == pytest.approx(region.eccentricity, abs=2e-3)
        assert row["solidity"] == pytest.approx(region.solidity, abs=0.03)
        assert (row["centroid_y_px"], row["centroid_x_px"]) == pytest.approx(
            (region.centroid[0] + 0.5, region.centroid[1] + 0.5), abs=0.01)
    disk, bar, _ = rows
    assert disk["perimeter_um"] == pytest.approx(2 * np.pi * 20 * 0.5, rel=0.05)  # not the 4/pi staircase
    assert bar["solidity"] == 1.0 and bar["perimeter_um"] == pytest.approx(2 * (10 + 40) * 0.5)
    _, in_px = measure(instances, None)
    assert "area_px2" in in_px[0] and in_px[0]["area_px2"] == disk["area_um2"] * 4


def test_a_slide_gland_across_several_strips_is_one_object_with_one_id(tmp_path, monkeypatch):
    """decode_slide + write_slide_glands, strips of 32 rows: one row, one feature, one id in the OME-TIFF."""
    monkeypatch.setattr(glands, "STRIP_ROWS", 32)
    monkeypatch.setattr(glands, "HALO_ROWS", 12)
    shape = (200, 90)
    gland = _ellipse(shape, (100, 45), (85, 25))
    probabilities = zarr.create_array(str(tmp_path / "p.zarr"), data=_probabilities([gland]).astype(np.float16),
                                      chunks=(3, 32, 90))
    probabilities[:, :, 80:] = 0  # where no tissue tile reached: no probabilities at all
    instances = zarr.create_array(str(tmp_path / "i.zarr"), shape=shape, dtype="uint32", chunks=(32, 90))
    assert decode_slide(probabilities, NAMES, InstancesConfig(min_area=50), instances) == 1
    assert write_slide_glands(tmp_path, instances, NAMES[:2], slide_id="s", mpp=0.5, level0_per_px=2.0,
                              object_type="detection", simplify=0.0) == 1
    rows = list(csv.DictReader((tmp_path / "instances.csv").open()))
    features = json.loads((tmp_path / "instances.geojson").read_text())["features"]
    with tifffile.TiffFile(tmp_path / "instances.ome.tif") as tif:
        level0 = tif.series[0].levels[0].asarray()
    assert len(rows) == len(features) == 1 and set(np.unique(level0)) == {0, 1}
    assert rows[0]["id"] == "1" and rows[0]["feature_id"] == features[0]["id"]
    assert features[0]["properties"]["name"] == "gland 1" and features[0]["properties"]["objectType"] == "detection"
    assert float(rows[0]["area_um2"]) == pytest.approx((level0 == 1).sum() * 0.25)
    bounds = np.asarray(features[0]["geometry"]["coordinates"][0])
    ys, xs = np.nonzero(level0)
    assert bounds[:, 1].min() == ys.min() * 2 and bounds[:, 1].max() == (ys.max() + 1) * 2  # level-0 pixels


def test_only_runs_with_a_gland_class_get_instance_outputs():
    assert glands.has_glands(["background", "gland"]) and glands.has_glands(NAMES)
    assert not glands.has_glands(["tumor", "stroma", "inflammatory", "necrosis", "other"])  # BCSS


def check_gland_outputs(folder, scale: float = 1.0) -> int:
    """The three gland outputs of one predicted input agree: ids, rows, features, the count in areas.csv."""
    rows = list(csv.DictReader((folder / "instances.csv").open()))
    features = json.loads((folder / "instances.geojson").read_text())["features"]
    name = "instances.ome.tif" if (folder / "instances.ome.tif").exists() else "instances.tif"
    with tifffile.TiffFile(folder / name) as tif:
        ids = tif.series[0].levels[0].asarray()
    assert ids.dtype == np.uint32
    assert [int(r["id"]) for r in rows] == list(range(1, len(rows) + 1)) == sorted(set(np.unique(ids)) - {0})
    assert [r["feature_id"] for r in rows] == [f["id"] for f in features]
    assert [f["properties"]["name"] for f in features] == [f"gland {r['id']}" for r in rows]
    areas = {r["class"]: r for r in csv.DictReader((folder / "areas.csv").open())}
    assert areas["gland"]["objects"] == str(len(rows)) and areas["background"]["objects"] == ""
    for row in rows:
        assert int(round(float(row["area_um2"]) / (0.62005 ** 2))) == int((ids == int(row["id"])).sum())
    return len(rows)


def test_a_gland_crossing_a_seam_diagonally_stays_one():
    """Objects are 8-connected: a one-pixel diagonal through several seams is one gland, as in a whole decode."""
    shape = (40, 40)
    line = np.zeros(shape, dtype=np.int32)
    for k in range(40):
        line[k, k] = 1
    out = np.zeros(shape, dtype=np.uint32)
    first_rows = [max(0, top - 4) for top in range(0, 40, 10)]  # each strip's first row, halo included

    def decode(block: np.ndarray) -> np.ndarray:  # the block's rows of the line, labelled as a decoder would
        from scipy import ndimage

        low = first_rows.pop(0)
        return ndimage.label(line[low : low + block.shape[1]], structure=np.ones((3, 3)))[0]

    assert glands.decode_in_strips(np.zeros((1, *shape)), decode, out, 0, strip_rows=10, halo=4) == 1
    assert (out[line > 0] == 1).all()


def test_glands_touching_at_a_corner_simplify_without_failing():
    from pathseg.predict.gland_outputs import gland_features

    instances = np.zeros((20, 20), dtype=np.uint32)
    instances[2:8, 2:8] = 1
    instances[8:14, 8:14] = 1  # one gland whose two parts meet at a corner: a MultiPolygon outline
    outlines, rows = measure(instances, 0.5)
    features = gland_features(outlines, rows, image_id="x", class_name="gland", class_index=1, scale=1.0,
                              object_type="annotation", simplify=1.0)
    assert len(features) == 1 and features[0]["geometry"]["type"] == "MultiPolygon"
