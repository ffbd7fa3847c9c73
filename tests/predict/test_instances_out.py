"""Glands as objects through predict's own image and slide paths, with a stand-in predictor.

The logits come from the pixels' red value (each class has one), so the test draws the glands it expects and
no backbone or training is needed; everything after the logits (blending, folding, decoding, measuring,
writing) is predict's own code.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from pathseg.predict import glands, slide_command
from pathseg.predict.one_input import _predict_image
from pathseg.predict.outputs import class_colour
from PIL import Image
from rasterio.features import rasterize
from shapely.affinity import scale as scale_geometry
from shapely.geometry import shape
from skimage.measure import regionprops

from tests.conftest import small_config
from tests.imaging.test_slides import write_pyramid

tifffile = pytest.importorskip("tifffile")
RED = {"background": 250, "gland": 40, "contour": 140, "tumor": 250, "stroma": 40, "other": 140}
MPP = 0.5


class StandIn:
    """What predict asks of a Predictor; a pixel's logits say which class's red value it is nearest."""

    def __init__(self, tmp: Path, class_names: list[str], contour: bool = False, tile: int = 64, stride: int = 48):
        self.config = small_config(tmp, **{"tiling.tile_size": tile, "tiling.stride": stride,
                                           "instances.min_area": 20})
        record = {"class_names": class_names, "head_sha256": "stand-in"}
        if contour:
            record |= {"head": {"target": "contour"}, "contour_fold_class": class_names.index("gland")}
        self.run = SimpleNamespace(directory=tmp / "run", record=record)
        self.class_names, self.mpp, self.tile_size, self.batch_size = class_names, MPP, tile, 4

    def _logits(self, rgb: np.ndarray) -> np.ndarray:
        red = rgb[..., 0].astype(np.float32)
        return np.stack([-np.abs(red - RED[name]) / 10 for name in self.class_names], axis=-3)

    def image_logits(self, rgb: np.ndarray, image_id: str, progress=None) -> np.ndarray:
        return self._logits(rgb)

    def tile_logits(self, tiles: np.ndarray, keys: list[str], output_size: int | None = None) -> np.ndarray:
        return self._logits(tiles)

    def logits_size(self) -> int:
        return self.tile_size


def _canvas(height: int, width: int) -> np.ndarray:
    return np.full((height, width, 3), RED["background"], dtype=np.uint8)


def _disk(shape_: tuple[int, int], centre: tuple[float, float], radii: tuple[float, float]) -> np.ndarray:
    y, x = np.ogrid[: shape_[0], : shape_[1]]
    return ((y - centre[0]) / radii[0]) ** 2 + ((x - centre[1]) / radii[1]) ** 2 <= 1


def _outputs(folder: Path, map_name: str) -> tuple[np.ndarray, list[dict], list[dict], dict[str, dict]]:
    with tifffile.TiffFile(folder / map_name) as tif:
        ids = tif.series[0].levels[0].asarray()
    rows = list(csv.DictReader((folder / "instances.csv").open()))
    features = json.loads((folder / "instances.geojson").read_text())["features"]
    areas = {row["class"]: row for row in csv.DictReader((folder / "areas.csv").open())}
    return ids, rows, features, areas


def _predict(tmp_path: Path, rgb: np.ndarray, predictor: StandIn) -> Path:
    Image.fromarray(rgb).save(tmp_path / "image.png")
    folder = tmp_path / "out"
    folder.mkdir()
    _predict_image(tmp_path / "image.png", folder, predictor, None, "detection", 0.0, False)
    return folder


def test_image_glands_share_ids_and_are_measured_as_drawn(tmp_path):
    rgb = _canvas(120, 160)
    disk = _disk((120, 160), (40, 40), (20, 20))
    rgb[disk] = RED["gland"]
    rgb[80:90, 60:100] = RED["gland"]  # a 10 x 40 px bar
    folder = _predict(tmp_path, rgb, StandIn(tmp_path, ["background", "gland"]))
    ids, rows, features, areas = _outputs(folder, "instances.tif")

    assert ids.dtype == np.uint32 and ids.shape == (120, 160)
    assert set(np.unique(ids)) == {0, 1, 2} and (ids[disk] == 1).all() and (ids[80:90, 60:100] == 2).all()
    assert [int(r["id"]) for r in rows] == [1, 2]
    assert [r["feature_id"] for r in rows] == [f["id"] for f in features]
    regions = json.loads((folder / "regions.geojson").read_text())["features"]
    for row, feature in zip(rows, features, strict=True):
        properties = feature["properties"]
        assert properties["name"] == f"gland {row['id']}" and properties["objectType"] == "detection"
        assert properties["classification"] == regions[0]["properties"]["classification"]
        assert properties["classification"]["color"] == list(class_colour(1))
        back = rasterize([(feature["geometry"], 1)], out_shape=ids.shape, fill=0, dtype="uint8")
        assert np.array_equal(back == 1, ids == int(row["id"]))  # the polygon is the gland's pixels
        assert properties["measurements"]["Area µm^2"] == float(row["area_um2"])

    disk_row, bar = rows
    region = regionprops(ids.astype(np.int64))[0]
    assert float(disk_row["area_um2"]) == pytest.approx(region.area * MPP**2)
    assert float(disk_row["perimeter_um"]) == pytest.approx(2 * math.pi * 20 * MPP, rel=0.03)
    assert float(disk_row["eccentricity"]) == pytest.approx(region.eccentricity, abs=2e-3)
    assert float(disk_row["solidity"]) == pytest.approx(region.solidity, abs=0.03)
    assert float(bar["area_um2"]) == 400 * MPP**2
    assert float(bar["perimeter_um"]) == 2 * (10 + 40) * MPP
    assert float(bar["equivalent_diameter_um"]) == pytest.approx(math.sqrt(4 * 400 / math.pi) * MPP, abs=1e-3)
    assert float(bar["solidity"]) == 1.0
    # pixel centres: variances (n^2 - 1) / 12 along each side
    assert float(bar["eccentricity"]) == pytest.approx(math.sqrt(1 - (10**2 - 1) / (40**2 - 1)), abs=1e-4)
    assert (float(bar["centroid_x_px"]), float(bar["centroid_y_px"])) == (80.0, 85.0)
    assert areas["gland"]["objects"] == "2" and areas["background"]["objects"] == ""


def test_a_contour_head_separates_touching_glands_but_labels_and_areas_stay_on_the_store_classes(tmp_path):
    rgb = _canvas(80, 120)
    rgb[10:70, 10:110] = RED["contour"]  # two glands side by side, a 4 px contour band round and between them
    rgb[14:66, 14:58] = RED["gland"]
    rgb[14:66, 62:106] = RED["gland"]
    names = ["background", "gland", "contour"]
    folder = _predict(tmp_path, rgb, StandIn(tmp_path, names, contour=True))
    ids, rows, features, areas = _outputs(folder, "instances.tif")

    assert len(rows) == len(features) == 2 and set(np.unique(ids)) == {0, 1, 2}
    labels = np.asarray(Image.open(folder / "labels.png"))
    assert set(np.unique(labels)) == {0, 1} and (labels[10:70, 10:110] == 1).all()  # contour folded into gland
    assert list(areas) == ["background", "gland"] and int(areas["gland"]["pixels"]) == 60 * 100
    assert areas["gland"]["objects"] == "2"
    assert all(f["properties"]["classification"]["name"] != "contour"
               for f in json.loads((folder / "regions.geojson").read_text())["features"])


def test_a_run_without_a_gland_class_writes_no_instance_outputs(tmp_path):
    rgb = _canvas(60, 60)
    rgb[10:40, 10:40] = RED["stroma"]
    folder = _predict(tmp_path, rgb, StandIn(tmp_path, ["tumor", "stroma", "other"]))
    assert not list(folder.glob("instances*"))
    header = (folder / "areas.csv").read_text().splitlines()[0]
    assert "objects" not in header.split(",")


def test_a_slide_gland_taller_than_many_tiles_and_strips_is_one_object(tmp_path, monkeypatch):
    """A gland over ~8 tile rows, ~9 blend strips and ~10 decoding strips: one id, one row, one feature."""
    monkeypatch.setattr(glands, "STRIP_ROWS", 40)
    monkeypatch.setattr(glands, "HALO_ROWS", 12)
    monkeypatch.setattr(slide_command, "run_identity", lambda run, config: {"stand-in": True})
    height, width = 420, 160  # at the prediction mpp; the slide is scanned at half of it
    gland = _disk((2 * height, 2 * width), (2 * 210, 2 * 80), (2 * 190, 2 * 30))
    rgb = _canvas(2 * height, 2 * width)
    rgb[gland] = RED["gland"]
    write_pyramid(tmp_path / "slide.tif", rgb, mpp=MPP / 2, levels=3, tile=64)
    predictor = StandIn(tmp_path, ["background", "gland"])
    folder = tmp_path / "out"
    slide_command.predict_slide(tmp_path / "slide.tif", folder, predictor, slide_mpp=None, use_tissue_mask=False,
                                tissue_threshold=None, object_type="annotation", simplify=0.0, show_progress=False)
    ids, rows, features, areas = _outputs(folder, "instances.ome.tif")

    assert ids.dtype == np.uint32 and ids.shape == (height, width)
    assert set(np.unique(ids)) == {0, 1} and len(rows) == len(features) == 1
    assert rows[0]["id"] == "1" and rows[0]["feature_id"] == features[0]["id"]
    assert features[0]["properties"]["name"] == "gland 1" and areas["gland"]["objects"] == "1"
    drawn = gland[::2, ::2]
    assert (ids[drawn] == 1).mean() > 0.98 and (drawn[ids == 1]).mean() > 0.98
    assert float(rows[0]["area_um2"]) == pytest.approx((ids == 1).sum() * MPP**2)
    assert float(rows[0]["centroid_y_px"]) == pytest.approx(2 * 210.5, abs=1.0)  # level-0 pixels
    outline = scale_geometry(shape(features[0]["geometry"]), 0.5, 0.5, origin=(0, 0))
    back = rasterize([(outline, 1)], out_shape=ids.shape, fill=0, dtype="uint8")
    assert np.array_equal(back == 1, ids == 1)  # one polygon over every seam, in level-0 pixels
    assert not (folder / ".work.zarr").exists()
