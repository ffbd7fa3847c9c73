"""Issue 21, stage 2: the run key holds every setting that changes the kept head, a run's record and head never
disagree (a killed re-fit, a swapped file), and an ablation's outputs keep test scores out of the choice."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import tempfile
import typing
from pathlib import Path
from typing import Any

import pytest
import torch
from pathseg.train_head import fit as fit_module
from pathseg.train_head.ablate import run_ablation
from pathseg.train_head.ablation_grid import plan_ablation
from pathseg.train_head.evaluate import evaluate_run
from pathseg.train_head.fit import fit_head
from pathseg.train_head.heads import KIND_SETTINGS, TARGET_SETTINGS
from pathseg.train_head.runs import default_run_dir, load_run
from pydantic import BaseModel

from pathseg.errors import PathsegError
from pathseg.store import FeatureStore
from tests.conftest import run_cli

# Settings that never change which head fit-head keeps: how fast features are read (tested bit for bit in
# test_loader.py) and what evaluate reports. Everything else of head/train/evaluate must move the run key.
NOT_IN_KEY = {
    "train": {"prefetch", "memory_budget", "loader_threads"},
    "evaluate": {"splits", "overlays", "min_object_area"},
}
OTHER_STRINGS = {"device": "cpu", "memory_budget": "1GB"}


def _other_value(section: type[BaseModel], name: str, value: Any) -> Any:
    """A valid value of `section.name` that differs from `value`."""
    annotation = section.model_fields[name].annotation
    if typing.get_origin(annotation) is typing.Literal:
        return next(option for option in typing.get_args(annotation) if option != value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 2 if value else 0.25
    if isinstance(value, str):
        return OTHER_STRINGS.get(name, value + "2")
    if name == "timesteps":
        return [50]
    if name == "blocks":
        return ["up1"]
    if name == "splits":
        return ["test"]
    if name == "imagenet_weights":  # keyed by the file's bytes, so it has to be a file
        handle, path = tempfile.mkstemp(suffix=".pth")
        os.write(handle, b"weights")
        os.close(handle)
        return Path(path)
    if isinstance(value, list):
        return value[:1] if len(value) > 1 else [*value, *value]
    raise AssertionError(f"no other value for {section.__name__}.{name} = {value!r}; teach _other_value")


def test_every_setting_that_changes_the_kept_head_is_in_the_run_key(extracted_small):
    """Epoch selection stitches val images with evaluate.blend, so blend is part of the key like lr or seed;
    each new head/train/evaluate setting must either move the key or be declared here as not changing the head.
    A semantic head never reads the contour settings (head.contour_width), a contour head does, whatever its kind."""
    config, store_path = extracted_small
    store = FeatureStore.open(store_path)
    pairs = [(50, "up1")]
    for (kind, reads), target in [(kind, t) for kind in KIND_SETTINGS.items() for t in ("semantic", "contour")]:
        base = config.model_copy(deep=True)
        base.head.kind, base.head.target = kind, target
        unread = set(TARGET_SETTINGS) - {"target"} if target == "semantic" else set()
        reference = default_run_dir(base, store, pairs)
        ignored = set().union(*KIND_SETTINGS.values()) - reads  # settings this kind never reads
        for section_name in ("head", "train", "evaluate"):
            section = getattr(base, section_name)
            for name in type(section).model_fields:
                if section_name == "head" and name == "kind":
                    continue
                changed = base.model_copy(deep=True)
                setattr(getattr(changed, section_name), name,
                        _other_value(type(section), name, getattr(section, name)))
                moved = default_run_dir(changed, store, pairs) != reference
                keyed = name not in NOT_IN_KEY.get(section_name, set()) and not (
                    section_name == "head" and name in ignored | unread)
                assert moved == keyed, (f"{kind} {target} head: {section_name}.{name} "
                                        f"{'is not' if keyed else 'is'} in the key")


def test_ablate_with_the_other_blend_trains_its_own_heads(extracted_small, tmp_path):
    """Before: the second sweep re-scored the first sweep's heads, kept under the other blend's epoch rule."""
    config, store_path = extracted_small
    config = config.model_copy(update={"runs_dir": tmp_path / "runs"}, deep=True)
    config.train.epochs, config.evaluate.overlays = 1, 0
    config.ablate.timesteps, config.ablate.blocks, config.ablate.seeds, config.ablate.baseline = [50], ["up1"], 1, False
    gaussian = run_ablation(config, store_path=store_path, show_progress=False)
    config.evaluate.blend = "mean"
    mean = run_ablation(config, store_path=store_path, show_progress=False)
    assert {s.run_dir for s in gaussian.scores}.isdisjoint({s.run_dir for s in mean.scores})
    assert all(load_run(s.run_dir).record["blend"] == "mean" for s in mean.scores)


def _fast(config, tmp_path: Path):
    config = config.model_copy(update={"runs_dir": tmp_path / "runs"}, deep=True)
    config.train.epochs, config.evaluate.overlays = 2, 0
    config.head.timesteps, config.head.blocks = [50], ["up1"]
    return config


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_run(run_dir).load_head().state_dict()


class Killed(Exception):
    """Stands in for SIGKILL: nothing after the raise runs in fit_head's training loop."""


def test_a_killed_refit_never_leaves_a_record_with_another_head(extracted_small, tmp_path, monkeypatch):
    config = _fast(extracted_small[0], tmp_path)
    run_dir = tmp_path / "mine"
    fit_head(config, run_dir=run_dir, show_progress=False)
    old_record = json.loads((run_dir / "run.json").read_text())
    old_weights = _weights(run_dir)

    real_save = fit_module.save_head

    def save_then_die(head, path):
        real_save(head, path)
        raise Killed

    monkeypatch.setattr(fit_module, "save_head", save_then_die)
    refit = config.model_copy(deep=True)
    refit.train.lr = 0.05  # another head, written to the same directory (--run-dir)
    with pytest.raises(Killed):
        fit_head(refit, run_dir=run_dir, show_progress=False)
    monkeypatch.undo()
    assert not list(tmp_path.glob(".mine.*")), "a stopped fit leaves its staging folder behind"

    try:
        run = load_run(run_dir)
        weights = run.load_head().state_dict()
    except PathsegError as error:  # refusing is fine, as long as it says what to do
        assert "\n" not in str(error) and "fit-head" in str(error)
        return
    assert run.record == old_record
    assert weights.keys() == old_weights.keys()
    assert all(torch.equal(weights[k], old_weights[k]) for k in weights), "old record, new head"
    evaluation = evaluate_run(config, run_dir, splits=["val"], show_progress=False, echo=False)
    assert evaluation.metrics["splits"]["val"]["miou"] == pytest.approx(old_record_val_miou(run_dir), abs=1e-9)


def test_a_fit_stopped_between_the_two_renames_leaves_no_half_run(extracted_small, tmp_path, monkeypatch):
    """Publishing moves the old run aside, then the new one in: stopped in between, there is no run to misuse."""
    from pathseg.train_head import runs

    config = _fast(extracted_small[0], tmp_path)
    config.train.epochs = 1
    run_dir = tmp_path / "mine"
    fit_head(config, run_dir=run_dir, show_progress=False)
    real_replace, calls = runs.os.replace, []

    def replace_then_die(source, target):  # os.replace is the os module's: files are replaced too, let them be
        if Path(source).is_dir():
            calls.append(target)
            if len(calls) == 2:
                raise Killed
        real_replace(source, target)

    monkeypatch.setattr(runs.os, "replace", replace_then_die)
    with pytest.raises(Killed):
        fit_head(config, run_dir=run_dir, show_progress=False)
    monkeypatch.undo()
    assert not run_dir.exists()
    with pytest.raises(PathsegError, match="not a finished run"):
        load_run(run_dir)
    fit_head(config, run_dir=run_dir, show_progress=False)  # the next fit publishes normally
    load_run(run_dir).load_head()


def old_record_val_miou(run_dir: Path) -> float:
    history = json.loads((run_dir / "history.json").read_text())
    return history[load_run(run_dir).record["best_epoch"]]["val_miou"]


def test_a_head_its_record_does_not_describe_is_refused_in_one_line(extracted_small, tmp_path, monkeypatch, capsys):
    config = _fast(extracted_small[0], tmp_path)
    config.train.epochs = 1
    mine, other = tmp_path / "mine", tmp_path / "other"
    fit_head(config, run_dir=mine, show_progress=False)
    config.train.seed = 5
    fit_head(config, run_dir=other, show_progress=False)
    record = json.loads((mine / "run.json").read_text())
    assert record["head_sha256"] == hashlib.sha256((mine / "head.safetensors").read_bytes()).hexdigest()

    shutil.copyfile(other / "head.safetensors", mine / "head.safetensors")  # a valid head, of another run
    with pytest.raises(PathsegError) as error:
        load_run(mine).load_head()
    message = str(error.value)
    assert "\n" not in message and str(mine) in message and "fit-head" in message
    with pytest.raises(PathsegError, match="fit-head"):
        evaluate_run(config, mine, show_progress=False, echo=False)
    capsys.readouterr()
    code, _, err = run_cli(monkeypatch, capsys, "evaluate", str(mine), "--quiet")
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (mine / "eval" / "metrics.json").exists()


def test_a_record_without_a_head_digest_is_refused(extracted_small, tmp_path):
    """A record written before digests cannot show that its head is the one it describes."""
    config = _fast(extracted_small[0], tmp_path)
    config.train.epochs = 1
    result = fit_head(config, run_dir=tmp_path / "mine", show_progress=False)
    record = json.loads((result.run_dir / "run.json").read_text())
    record.pop("head_sha256", None)
    record["schema"] = 1
    (result.run_dir / "run.json").write_text(json.dumps(record))
    with pytest.raises(PathsegError) as error:
        load_run(result.run_dir)
    assert "\n" not in str(error.value) and "fit-head" in str(error.value)


def test_fit_head_refuses_to_replace_a_folder_that_is_not_a_run(extracted_small, tmp_path):
    """A re-fit replaces its run directory whole, so a --run-dir holding other files is refused, not emptied."""
    config = _fast(extracted_small[0], tmp_path)
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(PathsegError, match="not a fit-head run"):
        fit_head(config, run_dir=folder, show_progress=False)
    assert (folder / "notes.txt").read_text() == "mine"


@pytest.fixture
def one_cell(extracted_small, tmp_path):
    config, store_path = extracted_small
    config = config.model_copy(update={"runs_dir": tmp_path / "runs"}, deep=True)
    config.train.epochs, config.evaluate.overlays = 1, 0
    config.ablate.timesteps, config.ablate.blocks, config.ablate.seeds = [50], ["up3.2"], 1
    return config, store_path


def test_leaderboard_csv_holds_no_test_scores(one_cell):
    config, store_path = one_cell
    result = run_ablation(config, store_path=store_path, show_progress=False)
    with open(result.directory / "leaderboard.csv") as handle:
        headers = next(csv.reader(handle))
    assert "val_miou_mean" in headers and not [h for h in headers if h.startswith("test")], headers
    with open(result.directory / "test_all_cells.csv") as handle:
        rows = [row for row in csv.reader(handle) if not row[0].startswith("#")]
    assert "test mIoU" in rows[0] and len(rows) == 1 + len(result.plan.cells)
    markdown = (result.directory / "leaderboard.md").read_text()
    assert "| test mIoU" in markdown  # the chosen cell's test scores are still reported


def test_an_object_metric_on_a_store_without_objects_is_refused_before_training(one_cell, monkeypatch):
    config, store_path = one_cell
    config.ablate.select_on = "object_f1"
    monkeypatch.setattr(FeatureStore, "has_instances", property(lambda self: False))
    with pytest.raises(PathsegError) as error:
        run_ablation(config, store_path=store_path, show_progress=False)
    message = str(error.value)
    assert "\n" not in message and "object_f1" in message and "miou" in message
    assert not Path(config.runs_dir).exists()


@pytest.mark.parametrize("key", ["train.val_split", "train.train_split"])
def test_splits_cannot_be_swept(one_cell, key, monkeypatch, capsys):
    """A cell must never choose on, or train on, a test split."""
    config, store_path = one_cell
    store = FeatureStore.open(store_path)
    with pytest.raises(PathsegError) as error:
        plan_ablation(config, store, {key: ["val", "test"]})
    assert "\n" not in str(error.value) and key in str(error.value)
    config.ablate.sweep = {key: ["val", "test"]}
    with pytest.raises(PathsegError, match=key.replace(".", r"\.")):
        plan_ablation(config, store, {})
    code, _, err = run_cli(monkeypatch, capsys, "ablate", "--store", str(store_path), "--set",
                           f"runs_dir={config.runs_dir}", "--timesteps", "50", "--blocks", "up3.2", "--seeds", "1",
                           "--set", f"{key}=val,test", "-q")
    assert code == 2 and key in err and len(err.strip().splitlines()) == 1
    assert not Path(config.runs_dir).exists()
