"""`pathseg ablate`: the grid, refusals before compute, selection on validation, reuse, and z0 as a feature."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
from pathseg.train_head.ablate import run_ablation
from pathseg.train_head.ablation_grid import feature_cells, plan_ablation, split_sweep_overrides
from pathseg.train_head.evaluate import evaluate_run
from pathseg.train_head.fit import fit_head
from pathseg.train_head.leaderboard import metric_value
from pathseg.train_head.runs import load_run
from PIL import Image

from pathseg.errors import PathsegError
from pathseg.store import Z0_PAIR, FeatureStore
from tests.conftest import run_cli


@pytest.fixture
def ablation_config(extracted_small, tmp_path):
    config, store_path = extracted_small
    config = config.model_copy(update={"runs_dir": tmp_path / "runs"}, deep=True)
    config.train.epochs = 1
    config.evaluate.overlays = 0
    config.ablate.timesteps = [50, 150]
    config.ablate.blocks = ["up3.2"]
    config.ablate.seeds = 2
    return config, store_path


def test_grid_shapes():
    maps = [(50, "up1"), (150, "up1"), (50, "up3.2")]
    assert feature_cells(maps, "each", baseline=False) == [(m,) for m in maps]
    assert feature_cells(maps, "each", baseline=True)[-1] == (Z0_PAIR,)
    assert len(feature_cells(maps, "pairs", baseline=False)) == 3
    assert feature_cells(maps, "all", baseline=True) == [tuple(maps), (Z0_PAIR,)]


def test_list_valued_set_items_become_sweeps():
    plain, swept = split_sweep_overrides({"head.kind": "conv,linear", "train.lr": [0.001, 0.002],
                                          "head.mlp_hidden": [64, 32], "train.epochs": 3, "evaluate.blend": "mean"})
    assert swept == {"head.kind": ["conv", "linear"], "train.lr": [0.001, 0.002]}
    assert plain == {"head.mlp_hidden": [64, 32], "train.epochs": 3, "evaluate.blend": "mean"}
    with pytest.raises(PathsegError, match="--timesteps"):
        split_sweep_overrides({"head.timesteps": [50]})


def test_plan_crosses_cells_sweeps_and_seeds(ablation_config):
    config, store_path = ablation_config
    plan = plan_ablation(config, FeatureStore.open(store_path), {"head.kind": ["conv", "linear"]})
    assert len(plan.cells) == (2 + 1) * 2 and plan.seeds == [0, 1] and plan.runs == 12
    with pytest.raises(PathsegError, match="not one of"):
        plan_ablation(config, FeatureStore.open(store_path), {"head.kind": ["conv", "mlp"]})
    with pytest.raises(PathsegError, match="train.lr"):
        plan_ablation(config, FeatureStore.open(store_path), {"train.lr": [-1.0]})


def test_missing_array_is_refused_before_any_run(ablation_config):
    config, store_path = ablation_config
    config.ablate.timesteps = [50, 999]
    with pytest.raises(PathsegError) as error:
        run_ablation(config, store_path=store_path, show_progress=False)
    message = str(error.value)
    assert "\n" not in message and "pathseg extract --timesteps 999 --blocks up3.2" in message
    assert not (config.runs_dir).exists()


def test_sweep_selects_on_validation_and_a_rerun_computes_nothing(ablation_config, capsys):
    config, store_path = ablation_config
    first = run_ablation(config, store_path=store_path, show_progress=False)
    assert first.computed_runs == 6 and len(first.plan.cells) == 3
    out = first.directory
    for name in ("leaderboard.csv", "leaderboard.md", "test_all_cells.csv", "ablation.json",
                 "heatmap_val_miou.png", "metrics_vs_timestep_val.png"):
        assert (out / name).stat().st_size > 0, name
    assert Image.open(out / "heatmap_val_miou.png").size[0] > 100

    # the leaderboard's figures are the means over seeds of each run's own evaluate report
    rows = list(csv.DictReader(open(out / "leaderboard.csv")))
    assert [r["selected"] for r in rows] == ["True", "False", "False"]
    val_means = [float(r["val_miou_mean"]) for r in rows]
    assert val_means == sorted(val_means, reverse=True)  # chosen on validation
    for row in rows:
        runs = [s for s in first.scores if s.cell.name == row["cell"]]
        values = [metric_value(s.splits["val"], "miou") for s in runs]
        assert float(row["val_miou_mean"]) == pytest.approx(np.mean(values), abs=1e-6)
        assert float(row["val_miou_std"]) == pytest.approx(np.std(values, ddof=1), abs=1e-6)
        report = json.loads((runs[0].run_dir / "eval" / "metrics.json").read_text())
        assert report["splits"]["val"]["miou"] == runs[0].splits["val"]["miou"]
    markdown = (out / "leaderboard.md").read_text()
    assert "not for selection" in markdown and "Chosen on val mIoU" in markdown

    second = run_ablation(config, store_path=store_path, show_progress=False)
    assert second.computed_runs == 0 and second.directory == out
    assert second.selected.cell == first.selected.cell

    # an interrupted sweep resumes: a run without its record is fitted again, and only that one
    victim = first.scores[1].run_dir
    (victim / "run.json").unlink()
    third = run_ablation(config, store_path=store_path, show_progress=False)
    assert third.computed_runs == 1
    assert [s.run_dir for s in third.scores if s.computed] == [victim]


def test_scores_of_an_older_metric_definition_are_recomputed_without_refitting(ablation_config):
    config, store_path = ablation_config
    config.ablate.seeds = 1
    config.ablate.timesteps = [50]
    first = run_ablation(config, store_path=store_path, show_progress=False)
    run_dir = first.scores[0].run_dir
    metrics_path = run_dir / "eval" / "metrics.json"
    report = json.loads(metrics_path.read_text())
    report["metrics_version"] = 1
    metrics_path.write_text(json.dumps(report))
    head_time = os.stat(run_dir / "head.safetensors").st_mtime_ns
    again = run_ablation(config, store_path=store_path, show_progress=False)
    assert again.computed_runs == 1
    assert os.stat(run_dir / "head.safetensors").st_mtime_ns == head_time  # scored again, not refitted
    assert json.loads(metrics_path.read_text())["metrics_version"] != 1


def test_z0_is_a_feature_like_a_block(extracted_small, tmp_path):
    config, store_path = extracted_small
    config = config.model_copy(update={"runs_dir": tmp_path / "runs"}, deep=True)
    config.head.blocks = ["z0"]
    config.train.epochs = 1
    config.evaluate.overlays = 0
    result = fit_head(config, show_progress=False)
    run = load_run(result.run_dir)
    assert run.pairs == [Z0_PAIR] and run.record["timesteps"] == [] and result.run_dir.name.startswith("z0_")
    store = FeatureStore.open(store_path)
    assert run.record["in_channels"] == [store.group["latents/z0"].shape[1]]
    report = evaluate_run(config, result.run_dir, show_progress=False, echo=False).metrics
    assert report["splits"]["test"]["miou"] is not None


def test_cli_ablate_prints_the_leaderboard(ablation_config, monkeypatch, capsys):
    config, store_path = ablation_config
    runs = str(config.runs_dir)
    code, out, err = run_cli(monkeypatch, capsys, "ablate", "--store", str(store_path), "--set", f"runs_dir={runs}",
                             "--set", "dataset.synthetic.train=4", "--epochs", "1", "--seeds", "1", "--timesteps", "50",
                             "--blocks", "up3.2", "--set", "head.kind=conv,linear", "-q")
    assert code == 0, err
    assert "rank" in out and "Chosen on val mIoU" in out and "head.kind=linear" in out
    code, out, err = run_cli(monkeypatch, capsys, "ablate", "--store", str(store_path), "--set", f"runs_dir={runs}",
                             "--timesteps", "50", "--blocks", "up3.2", "--set", "head.timesteps=[50]", "-q")
    assert code == 2 and "--timesteps" in err and "Traceback" not in err


def test_a_setting_the_head_kind_ignores_does_not_make_a_new_run(extracted_small):
    from pathseg.train_head.runs import default_run_dir

    config, store_path = extracted_small
    store = FeatureStore.open(store_path)
    pairs = [(50, "up1")]

    def run_dir(**head):
        changed = config.model_copy(deep=True)
        for key, value in head.items():
            setattr(changed.head, key, value)
        return default_run_dir(changed, store, pairs)

    assert run_dir(ensemble=3) == run_dir()  # conv reads no ensemble size
    assert run_dir(width=16) != run_dir()
    assert run_dir(kind="pixel-mlp", ensemble=3) != run_dir(kind="pixel-mlp")
    assert run_dir(kind="pixel-mlp", width=16) == run_dir(kind="pixel-mlp")
    assert run_dir(kind="linear", width=16, ensemble=3) == run_dir(kind="linear")


def test_decoding_sweeps_share_heads_keep_their_own_scores_and_both_f1s_are_listed(ablation_config):
    """instances.* cells differ in decoding only: one head per seed, one report per setting, both F1s shown."""
    config, store_path = ablation_config
    config.ablate.seeds = 1
    config.ablate.timesteps = [50]
    config.ablate.baseline = False
    config.instances.tune = False
    first = run_ablation(config, swept={"instances.min_area": [0, 10**7]}, store_path=store_path, show_progress=False)
    assert len(first.plan.cells) == 2 and first.computed_runs == 2
    run_dirs = {score.run_dir for score in first.scores}
    assert len(run_dirs) == 1  # the same head, fitted once
    reports = sorted((next(iter(run_dirs))).glob("eval-*/metrics.json"))
    assert len(reports) == 2
    assert {json.loads(path.read_text())["instances"]["min_area"] for path in reports} == {0, 10**7}
    keep_all, keep_none = sorted(first.scores, key=lambda s: dict(s.cell.settings)["instances.min_area"])
    assert metric_value(keep_none.splits["val"], "inst_f1") == 0.0  # every object dropped
    assert metric_value(keep_all.splits["val"], "object_f1") == metric_value(keep_none.splits["val"], "object_f1")
    header = next(csv.reader(open(first.directory / "leaderboard.csv")))
    assert "val_inst_f1_mean" in header and "val_object_f1_mean" in header
    assert run_ablation(config, swept={"instances.min_area": [0, 10**7]}, store_path=store_path,
                        show_progress=False).computed_runs == 0
