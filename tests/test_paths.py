"""Paths as people have them: spaces, non-ASCII names and symlinks in data roots, stores, runs and configs work end
to end; a dataset file that names a path outside its folder is refused."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pathseg.store import FeatureStore, list_stores
from pathseg.store.integrity import store_info
from tests.conftest import run_cli, write_glas_fixture

SMALL = ["--set", "tiling.tile_size=64", "--set", "tiling.stride=64", "--timesteps", "50", "--blocks", "up1",
         "--epochs", "1", "--set", "train.batch_size=2", "--set", "evaluate.overlays=1", "--quiet"]


@pytest.fixture
def here(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(os, "fsync", lambda descriptor: None)  # durability is not what these tests are about
    return tmp_path


def test_spaces_unicode_and_symlinks_work_end_to_end(here, monkeypatch, capsys):
    real = write_glas_fixture(here / "données partagées" / "GlaS ✓ Warwick", "png", {"train": 3, "testA": 1},
                              size=(48, 64))
    outside = here / "elsewhere" / "train_3 copy.png"  # a dataset assembled from symlinks
    outside.parent.mkdir()
    shutil.move(real / "train_3.png", outside)
    (real / "train_3.png").symlink_to(outside)
    root = here / "link to glas"
    root.symlink_to(real, target_is_directory=True)
    runs_target = here / "résultats" / "runs ü"
    runs_target.mkdir(parents=True)
    (here / "runs link").symlink_to(runs_target, target_is_directory=True)
    config = here / "my config ü.yaml"
    config.write_text(f"cache_dir: {json.dumps(str(here / 'cache dir é'))}\nruns_dir: {json.dumps('runs link')}\n")

    code, out, err = run_cli(monkeypatch, capsys, "run", "--config", str(config), "--dataset", "glas", "--data-root",
                             str(root), *SMALL)
    assert code == 0, err
    (store,) = list_stores(here / "cache dir é")
    assert store_info(FeatureStore.open(store))["complete"]
    (record,) = runs_target.rglob("run.json")
    assert (record.parent / "eval" / "metrics.json").is_file()
    code, out, err = run_cli(monkeypatch, capsys, "cache", "verify", str(store), "--quiet")
    assert code == 0 and "OK" in out, out + err

    image = here / "nouvelles images" / "lame n°1 ✓.png"
    image.parent.mkdir()
    Image.open(real / "testA_1.png").save(image)
    predictions = here / "prédictions avec espaces"
    code, _, err = run_cli(monkeypatch, capsys, "predict", str(record.parent), str(image), "--out", str(predictions),
                           "--quiet")
    assert code == 0, err
    assert all((predictions / image.stem / name).is_file() for name in ("labels.png", "regions.geojson"))


@pytest.mark.parametrize("stem", ["../images/a", "../../etc/passwd", "sub/a", "..\\a", ".."])
def test_a_splits_file_that_points_outside_its_folder_is_refused(here, monkeypatch, capsys, stem):
    root = here / "mine"
    for folder in ("images", "masks"):
        (root / folder).mkdir(parents=True)
    (root / "classes.yaml").write_text("classes: [background, tumor]\n")
    for name in ("a", "b"):
        Image.fromarray(np.full((40, 50, 3), 200, np.uint8)).save(root / "images" / f"{name}.png")
        Image.fromarray(np.zeros((40, 50), np.uint8)).save(root / "masks" / f"{name}.png")
    (root / "splits.csv").write_text(f"stem,split\n{stem},train\nb,test\n")
    code, _, err = run_cli(monkeypatch, capsys, "extract", "--dataset", "folder", "--data-root", str(root),
                           "--set", "tiling.tile_size=64", "--set", "tiling.stride=64", "--quiet")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "splits.csv:2" in lines[0] and "not an image stem" in lines[0]
    assert not list_stores(here / "cache")
