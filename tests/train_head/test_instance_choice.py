"""The instance decoding chosen on val: the search, its record in the run, and its reuse on test and by predict."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pathseg.train_head.instance_choice import CHOICE_FILE, decoding_settings, read_choice
from pathseg.train_head.instance_tuning import DecodingSearch, _area_filtered

from pathseg.config import InstancesConfig
from pathseg.metrics.instances import decode_instances
from pathseg.store import FeatureStore
from tests.conftest import small_config, write_glas_fixture


def _disk(shape, centre, radius):
    y, x = np.ogrid[: shape[0], : shape[1]]
    return (y - centre[0]) ** 2 + (x - centre[1]) ** 2 <= radius**2


def _probabilities(gland: np.ndarray, contour: np.ndarray) -> np.ndarray:
    """Sharp 3-class probabilities (background, gland, contour) from masks."""
    p = np.full((3, *gland.shape), 0.02, dtype=np.float32)
    p[0, ~(gland | contour)] = 0.96
    p[1, gland & ~contour] = 0.96
    p[2, contour] = 0.96
    return p


def test_area_filter_equals_decoding_with_that_minimum_area():
    """The search relabels one decode per threshold instead of decoding per area: the same maps, by construction."""
    rng = np.random.default_rng(0)
    gland = np.zeros((64, 64), dtype=bool)
    for _ in range(12):
        gland |= _disk(gland.shape, rng.integers(0, 64, 2), rng.integers(1, 9))
    contour = gland & ~np.pad(gland[1:-1, 1:-1], 1) | (rng.random(gland.shape) < 0.02) & gland
    probabilities = _probabilities(gland, contour)
    names = ["background", "gland", "contour"]
    unfiltered = decode_instances(probabilities, names, InstancesConfig(min_area=0))
    for area, filtered in _area_filtered(unfiltered, [0, 10, 40, 150]):
        assert np.array_equal(filtered, decode_instances(probabilities, names, InstancesConfig(min_area=area)))


def test_search_drops_specks_and_reads_thresholds_only_for_contour_heads():
    truth = np.zeros((80, 80), dtype=np.int32)
    truth[_disk(truth.shape, (25, 25), 12)] = 1
    truth[_disk(truth.shape, (55, 55), 12)] = 2
    specks = np.zeros(truth.shape, dtype=bool)
    specks[5, 70] = specks[70, 5] = specks[75, 40] = True
    gland = (truth > 0) | specks
    settings = InstancesConfig(min_areas=[0, 20, 5000], marker_thresholds=[0.3, 0.6])
    search = DecodingSearch(settings)
    probabilities = _probabilities(gland, np.zeros_like(gland))
    search.update(probabilities, ["background", "gland", "contour"], gland.astype(np.uint8), truth)
    chosen, scores = search.choice()
    assert chosen["min_area"] == 20 and chosen["baseline_min_area"] == 20  # specks gone, glands kept
    assert chosen["decoded_val_f1"] == 1.0 and chosen["marker_threshold"] in (0.3, 0.6)
    assert {s["marker_threshold"] for s in scores if s["decoding"] == "decoded"} == {0.3, 0.6}
    semantic = DecodingSearch(settings)
    semantic.update(probabilities[:2] / probabilities[:2].sum(0), ["background", "gland"], gland.astype(np.uint8),
                    truth)
    assert {t for t, _ in semantic.decoded} == {settings.marker_threshold}  # a semantic head has no markers


@pytest.fixture(scope="module")
def contour_run(tmp_path_factory):
    from pathseg.extract.runner import run_extraction
    from pathseg.train_head.fit import fit_head

    tmp = tmp_path_factory.mktemp("choice")
    root = write_glas_fixture(tmp / "glas", ext="png", per_split={"train": 4, "testA": 1}, patients=4)
    config = small_config(tmp, **{"dataset.name": "glas", "dataset.root": str(root), "dataset.glas.val_fraction": 0.25,
                                  "extract.timesteps": [50], "extract.blocks": ["up1"], "train.epochs": 1,
                                  "evaluate.overlays": 0, "head.target": "contour", "head.contour_width": 2,
                                  "instances.min_areas": [0, 30], "instances.marker_thresholds": [0.4, 0.6]})
    store = FeatureStore.open(run_extraction(config, show_progress=False).store)
    return config, store, fit_head(config, store=store, show_progress=False)


def test_evaluate_chooses_on_val_records_it_and_reuses_it(contour_run, monkeypatch):
    from pathseg.train_head import evaluate as evaluate_module
    from pathseg.train_head.runs import load_run

    config, store, fitted = contour_run
    report = evaluate_module.evaluate_run(config, fitted.run_dir, store=store, show_progress=False, echo=False).metrics
    run = load_run(fitted.run_dir)
    record = json.loads((fitted.run_dir / CHOICE_FILE).read_text())
    assert record["head_sha256"] == run.record["head_sha256"]
    chosen = record["chosen"]
    assert chosen["min_area"] in (0, 30) and chosen["marker_threshold"] in (0.4, 0.6) and chosen["val_images"] == 1
    assert len(record["val_scores"]) == 2 * 2 + 2  # thresholds x areas, and the baseline's areas
    assert report["instances_source"] == "chosen on val"
    assert report["instances"]["min_area"] == chosen["min_area"]
    assert report["min_object_area"] == chosen["baseline_min_area"]
    settings, baseline, source = decoding_settings(run, config)  # what predict decodes with
    assert (settings.marker_threshold, settings.min_area, baseline) == (
        chosen["marker_threshold"], chosen["min_area"], chosen["baseline_min_area"])

    def searched_again(*args, **kwargs):
        raise AssertionError("the recorded choice should have been reused")

    monkeypatch.setattr(evaluate_module.DecodingSearch, "update", searched_again)
    evaluate_module.evaluate_run(config, fitted.run_dir, store=store, show_progress=False, echo=False)
    other_grid = config.model_copy(deep=True)
    other_grid.instances.min_areas = [0, 31]
    assert read_choice(run, other_grid) is None  # chosen under other grids: not used
    assert decoding_settings(run, other_grid)[2].startswith("configured")
    run.record["head_sha256"] = "0" * 64
    assert read_choice(run, config) is None  # a refit head does not inherit the old head's choice


def test_tune_off_uses_the_configured_values(contour_run, tmp_path):
    from pathseg.train_head.evaluate import evaluate_run

    config, store, fitted = contour_run
    config = config.model_copy(deep=True)
    config.instances.tune = False
    config.instances.min_area = 7
    config.evaluate.min_object_area = 9
    report = evaluate_run(config, fitted.run_dir, store=store, show_progress=False, echo=False,
                          out_name="eval-untuned").metrics
    assert report["instances"]["min_area"] == 7 and report["min_object_area"] == 9
    assert report["instances_source"].startswith("configured")
