"""Shared fixtures: small configs that run the real pipeline in seconds, and GlaS files in the official layout."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pathseg.config import PipelineConfig, load_config

REAL_GLAS = Path(__file__).resolve().parents[2] / "shared" / "data" / "glas"


def small_config(tmp: Path, **overrides) -> PipelineConfig:
    """Synthetic data and the tiny backbone at 128 px tiles: the whole pipeline in seconds on CPU."""
    values = {
        "cache_dir": str(tmp / "cache"),
        "runs_dir": str(tmp / "runs"),
        "dataset.synthetic.train": 4,
        "dataset.synthetic.val": 1,
        "dataset.synthetic.test": 2,
        "dataset.synthetic.height": 150,
        "dataset.synthetic.width": 170,
        "tiling.tile_size": 128,
        "tiling.stride": 96,
        "extract.timesteps": [50, 150],
        "extract.blocks": ["up1", "up3.2"],
        "extract.batch_size": 4,
        "extract.tiles_per_shard": 4,
        "train.epochs": 2,
        "train.batch_size": 4,
        "evaluate.overlays": 1,
    }
    values.update(overrides)
    return load_config(None, values)


@pytest.fixture(scope="session")
def extracted_small(tmp_path_factory):
    """One small extracted store shared by the stage-2 tests (they only read it)."""
    from pathseg.extract.runner import run_extraction

    tmp = tmp_path_factory.mktemp("small")
    config = small_config(tmp)
    summary = run_extraction(config, show_progress=False)
    return config, summary.store


@pytest.fixture(scope="module")
def fitted_run(extracted_small, tmp_path_factory):
    """A one-epoch head on the shared small store, in a run folder of the module's own: (config, run directory)."""
    from pathseg.train_head.fit import fit_head

    config, _ = extracted_small
    config = config.model_copy(update={"runs_dir": tmp_path_factory.mktemp("runs")}, deep=True)
    config.evaluate.overlays = 0
    config.train.epochs = 1
    return config, fit_head(config, show_progress=False).run_dir


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """`pathseg ARGS` in-process, as the console script runs it: (exit code, stdout, stderr)."""
    import sys

    from pathseg.cli import main

    monkeypatch.setattr(sys, "argv", ["pathseg", *args])
    code = 0
    try:
        main()
    except SystemExit as done:
        code = int(done.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def _write_label_map(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array.astype(np.uint8), mode="L").save(path)


def write_glas_fixture(root: Path, ext: str = "bmp", per_split: dict[str, int] | None = None,
                       size: tuple[int, int] = (90, 120), patients: int = 4) -> Path:
    """GlaS files as the official release has them: images, `_anno` instance maps, `Grade.csv` with leading spaces."""
    per_split = per_split or {"train": 6, "testA": 2, "testB": 1}
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for split, count in per_split.items():
        for n in range(1, count + 1):
            name = f"{split}_{n}"
            h, w = size
            rgb = rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)
            anno = np.zeros((h, w), dtype=np.uint8)
            anno[10:30, 10:40] = 1
            anno[50:80, 60:100] = 2
            Image.fromarray(rgb).save(root / f"{name}.{ext}")
            _write_label_map(root / f"{name}_anno.{ext}", anno)
            rows.append([name, str(1 + (n - 1) % patients), " benign", " healthy"])
    with (root / "Grade.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["name", "patient ID", " grade (GlaS)", " grade (Sirinukunwattana et al. 2015)"])
        writer.writerows(rows)
    return root
