"""head.target=contour: the band, its padding, training on 3 classes, scoring on the store's 2, refusal, run keys."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from pathseg.train_head.contours import CONTOUR, TileContours, contour_band, fold_prediction
from scipy import ndimage

from pathseg.errors import PathsegError
from pathseg.imaging.tiling import cut_tile, pad_to_grid, tile_grid
from pathseg.store import FeatureStore
from tests.conftest import small_config, write_glas_fixture


def test_band_parts_touching_instances():
    instances = np.zeros((40, 60), dtype=np.int32)
    instances[5:35, 5:30] = 1
    instances[5:35, 30:55] = 2  # touches instance 1 along column 29|30
    instances[0:10, 55:60] = 3  # cut by the image border
    band = contour_band(instances, 3)
    assert not band[instances == 0].any()  # the instance side only
    assert band[20, 27:30].all() and band[20, 30:33].all() and not band[20, 26] and not band[20, 33]
    interiors, count = ndimage.label((instances > 0) & ~band)
    assert count == 3 and len(np.unique(interiors[instances == 1])) == 2  # 1 and 2 apart (3 keeps an interior)
    assert not band[2, 59] and band[9, 57]  # the image border is no boundary; the edge with background is
    assert contour_band(instances, 1).sum() < band.sum()


def _fake_store(pad_mode: str, ignore_index: int | None):
    """The few store reads TileContours.build makes, over one 20x26 image cut into 16 px tiles at stride 8."""
    instances = np.zeros((20, 26), dtype=np.int32)
    instances[2:12, 3:15] = 1
    instances[12:20, 3:15] = 2
    labels = (instances > 0).astype(np.uint8)
    grid = tile_grid(20, 26, 16, 8)
    origins = np.asarray(grid.origins())
    store = SimpleNamespace(
        tile_size=16, attrs={"identity": {"tiling": {"pad_mode": pad_mode}}}, class_names=["background", "gland"],
        n_tiles=len(origins), ignore_index=ignore_index, tile_images=lambda: np.zeros(len(origins), dtype=np.int64),
        tile_origins=lambda: origins, image_instances=lambda i: instances, image_labels=lambda i: labels,
        image_grid=lambda i: grid,
    )
    return store, labels, grid, origins


def test_padding_handled_as_labels():
    store, labels, grid, origins = _fake_store("reflect", None)
    contours = TileContours.build(store, np.arange(len(origins)), 2)
    assert contours.fold_class == 1 and contours.contour_class == 2
    padded_labels = pad_to_grid(labels, grid, "reflect")
    for tile, origin in enumerate(origins):  # mirrored padding: the band is mirrored with the labels it marks
        tile_labels = cut_tile(padded_labels, tuple(origin), 16).copy()
        band = contours.band(tile)
        assert (tile_labels[band] == 1).all()
        contours.mark(tile_labels, band)
        assert set(np.unique(tile_labels)) <= {0, 1, 2}
    assert contours.band(0)[:4].any()  # the top padding (4 rows) holds the mirrored band

    store, labels, grid, origins = _fake_store("constant", 255)
    contours = TileContours.build(store, np.arange(len(origins)), 2)
    tile_labels = cut_tile(np.pad(labels, 4, constant_values=255), (0, 0), 16).copy()  # padding: ignore
    band = contours.band(0)
    assert not band[:4].any() and not band[:, :4].any()
    contours.mark(tile_labels, np.ones_like(band))  # even a band over the padding leaves the ignore index there
    assert (tile_labels[:4] == 255).all() and (tile_labels[4:, 4:] == 2).all()


@pytest.fixture(scope="module")
def glas_store(tmp_path_factory):
    """A tiny GlaS-layout store (instances from the `_anno` maps), 1-epoch contour settings: (config, store)."""
    from pathseg.extract.runner import run_extraction

    tmp = tmp_path_factory.mktemp("glas_contour")
    root = write_glas_fixture(tmp / "glas", ext="png", per_split={"train": 4, "testA": 1}, patients=4)
    config = small_config(tmp, **{"dataset.name": "glas", "dataset.root": str(root), "dataset.glas.val_fraction": 0.25,
                                  "extract.timesteps": [50], "extract.blocks": ["up1"], "train.epochs": 1,
                                  "evaluate.overlays": 1, "head.target": "contour", "head.contour_width": 2})
    return config, FeatureStore.open(run_extraction(config, show_progress=False).store)


@pytest.fixture(scope="module")
def glas_contour_run(glas_store):
    from pathseg.train_head.fit import fit_head

    config, store = glas_store
    return config, store, fit_head(config, store=store, show_progress=False)


def test_run_key_keys_target_for_every_kind(glas_store):
    from pathseg.train_head.heads import head_kinds
    from pathseg.train_head.runs import resolve_features, run_key

    config, store = glas_store
    pairs = resolve_features(config, store)
    for kind in head_kinds():
        keys = {}
        for name, target, width in [("semantic", "semantic", 3), ("semantic-5", "semantic", 5),
                                    ("contour", "contour", 3), ("contour-5", "contour", 5)]:
            changed = config.model_copy(deep=True)
            changed.head.kind, changed.head.target, changed.head.contour_width = kind, target, width
            keys[name] = run_key(changed, store, pairs)
        assert keys["semantic"] == keys["semantic-5"]  # contour_width means nothing to a semantic head
        assert len({keys["semantic"], keys["contour"], keys["contour-5"]}) == 3


def test_store_without_instances_is_refused(glas_store, monkeypatch, tmp_path):
    from pathseg.train_head.fit import fit_head

    config, store = glas_store
    config = config.model_copy(update={"runs_dir": tmp_path}, deep=True)
    monkeypatch.setattr(FeatureStore, "has_instances", property(lambda self: False))
    with pytest.raises(PathsegError) as refused:
        fit_head(config, store=store, show_progress=False)
    message = str(refused.value)
    assert "\n" not in message and "head.target=contour" in message and str(store.path) in message
    assert not any(tmp_path.iterdir())  # refused before any run folder was made


def test_fold_prediction_maps_contour_into_gland():
    prediction = np.array([[0, 1, 2], [2, 2, 0]], dtype=np.uint8)
    assert fold_prediction(prediction.copy(), (2, 1)).tolist() == [[0, 1, 1], [1, 1, 0]]
    assert fold_prediction(prediction.copy(), None).tolist() == prediction.tolist()


def test_contour_head_trains_on_three_classes(glas_contour_run):
    from pathseg.train_head.loader import StoreLoader
    from pathseg.train_head.runs import load_run, resolve_features

    config, store, fitted = glas_contour_run
    run = load_run(fitted.run_dir)
    assert store.class_names == ["background", "gland"]
    assert run.record["class_names"] == ["background", "gland", CONTOUR] and run.record["contour_fold_class"] == 1
    assert run.load_head().num_classes == 3 and fitted.history[0]["val_miou"] is not None
    tiles = store.tiles_of_splits(["train"])
    contours = TileContours.build(store, tiles, config.head.contour_width)
    loader = StoreLoader(store, resolve_features(config, store), tiles, 4, prefetch=0, contours=contours)
    batch = next(iter(loader))
    plain = store.tile_labels(np.sort(batch.tiles))
    seen = batch.labels.numpy()
    assert (seen == 2).any() and (plain[seen == 2] == 1).all()  # the band, only on gland pixels
    assert (seen[seen != 2] == plain[seen != 2]).all()  # every other pixel: the store's labels


def test_contour_head_is_scored_on_store_classes(glas_contour_run):
    from pathseg.train_head.evaluate import evaluate_run

    config, store, fitted = glas_contour_run
    result = evaluate_run(config, fitted.run_dir, store=store, show_progress=False, echo=False)
    report = json.loads((result.directory / "metrics.json").read_text())
    assert report["class_names"] == ["background", "gland"]
    split = report["splits"]["testA"]
    assert set(split["per_class"]) == {"background", "gland"}
    assert split["miou"] is not None and "objects" in split


def test_evaluate_reports_decoded_instances_beside_connected_components(glas_contour_run):
    """Both decodings of one run, side by side: components of the map, and instances decoded from the contour."""
    from pathseg.train_head.evaluate import METRICS_VERSION, evaluate_run
    from pathseg.train_head.tables import metrics_text

    config, store, fitted = glas_contour_run
    result = evaluate_run(config, fitted.run_dir, store=store, show_progress=False, echo=False)
    report = json.loads((result.directory / "metrics.json").read_text())
    split = report["splits"]["testA"]
    assert report["instances"]["decoding"] == "auto" and report["metrics_version"] == METRICS_VERSION
    for kind in ("objects", "objects_decoded"):
        assert set(split[kind]) >= {"object_f1", "object_dice", "object_hausdorff"}
    text = metrics_text(report)
    assert "inst F1" in text and "obj F1" in text and "instances.decoding=auto" in text


def test_a_contour_decoding_of_a_semantic_head_is_refused_in_one_line(glas_store, tmp_path):
    from pathseg.train_head.evaluate import evaluate_run
    from pathseg.train_head.fit import fit_head

    config, store = glas_store
    config = config.model_copy(update={"runs_dir": tmp_path / "runs"}, deep=True)
    config.head.target = "semantic"
    fitted = fit_head(config, store=store, show_progress=False)
    config.instances.decoding = "contour"
    with pytest.raises(PathsegError, match="instances: instances.decoding is contour but the head's classes"):
        evaluate_run(config, fitted.run_dir, store=store, show_progress=False, echo=False)
