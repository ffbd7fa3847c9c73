"""Bad input, through the command line as a user meets it: one line naming the file or setting at
fault, a non-zero exit code, no traceback, and nothing recorded as done."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pathseg.store import FeatureStore, list_stores
from pathseg.store.integrity import store_info
from tests.conftest import run_cli, write_glas_fixture

SMALL_YAML = Path(__file__).parent / "fixtures" / "ldm" / "small_only_ssl.yaml"
FAST = ["--set", "tiling.tile_size=64", "--set", "tiling.stride=64", "--timesteps", "50", "--blocks", "up1",
        "--quiet"]


@pytest.fixture
def here(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def fails_in_one_line(code: int, err: str, *expected: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for text in expected:
        assert text in lines[0], (text, lines[0])


def nothing_marked_done_for(image_id: str) -> None:
    for path in list_stores(Path("cache")):
        store = FeatureStore.open(path)
        assert not store_info(store)["complete"]
        done = store.image_done()
        assert not any(done[i] for i, entry in enumerate(store.images) if entry.id == image_id)


def glas(root: Path) -> Path:
    return write_glas_fixture(root, ext="png", per_split={"train": 3, "testA": 1})


def test_truncated_image(here, monkeypatch, capsys):
    root = glas(here / "glas")
    image = root / "train_2.png"
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    code, _, err = run_cli(monkeypatch, capsys, "extract", "--dataset", "glas", "--data-root", str(root), *FAST)
    fails_in_one_line(code, err, "train_2.png", "cannot read")
    nothing_marked_done_for("train_2")


def test_unreadable_image(here, monkeypatch, capsys):
    root = glas(here / "glas")
    (root / "train_3.png").write_bytes(b"this is not a PNG")
    code, _, err = run_cli(monkeypatch, capsys, "extract", "--dataset", "glas", "--data-root", str(root), *FAST)
    fails_in_one_line(code, err, "train_3.png", "cannot read")
    nothing_marked_done_for("train_3")


def test_mask_of_another_size(here, monkeypatch, capsys):
    root = glas(here / "glas")
    Image.fromarray(np.zeros((50, 60), np.uint8)).save(root / "train_2_anno.png")
    code, _, err = run_cli(monkeypatch, capsys, "extract", "--dataset", "glas", "--data-root", str(root), *FAST)
    fails_in_one_line(code, err, "train_2_anno.png", "60x50", "120x90")
    nothing_marked_done_for("train_2")


def test_missing_annotation(here, monkeypatch, capsys):
    root = glas(here / "glas")
    (root / "train_2_anno.png").unlink()
    code, _, err = run_cli(monkeypatch, capsys, "extract", "--dataset", "glas", "--data-root", str(root), *FAST)
    fails_in_one_line(code, err, "train_2", "no annotation")
    nothing_marked_done_for("train_2")


def test_empty_dataset_folder(here, monkeypatch, capsys):
    (here / "empty").mkdir()
    code, _, err = run_cli(monkeypatch, capsys, "extract", "--dataset", "glas", "--data-root", "empty", *FAST)
    fails_in_one_line(code, err, "empty", "no GlaS images")
    assert not list_stores(Path("cache"))


def test_mask_with_unknown_labels(here, monkeypatch, capsys):
    root = here / "mine"
    for folder in ("images", "masks"):
        (root / folder).mkdir(parents=True)
    (root / "classes.yaml").write_text("classes: [background, tumor]\n")
    for k in range(4):
        mask = np.zeros((40, 50), np.uint8)
        mask[5:20, 5:20] = 7 if k == 2 else 1
        Image.fromarray(np.full((40, 50, 3), 200, np.uint8)).save(root / "images" / f"img{k}.png")
        Image.fromarray(mask).save(root / "masks" / f"img{k}.png")
    code, _, err = run_cli(monkeypatch, capsys, "extract", "--dataset", "folder", "--data-root", str(root), *FAST)
    fails_in_one_line(code, err, "img2.png", "7")
    nothing_marked_done_for("img2")


def test_checkpoint_with_wrong_keys(here, monkeypatch, capsys):
    torch.save({"state_dict": {"model.diffusion_model.not_a_layer.weight": torch.zeros(3)}}, here / "bad.ckpt")
    code, _, err = run_cli(monkeypatch, capsys, "extract", "--backbone", "bad.ckpt", "--backbone-config",
                           str(SMALL_YAML), *FAST)
    fails_in_one_line(code, err, "bad.ckpt", "missing", "1 unexpected: model.diffusion_model.not_a_layer.weight")
    code, _, err = run_cli(monkeypatch, capsys, "convert-ldm", "--ckpt", "bad.ckpt", "--config", str(SMALL_YAML),
                           "--out", "converted")
    fails_in_one_line(code, err, "bad.ckpt", "missing")
    assert not Path("converted").exists()


def test_checkpoint_with_missing_keys(here, monkeypatch, capsys):
    from pathseg.extract.backbone_info import build_from_ldm_yaml

    full = build_from_ldm_yaml(SMALL_YAML).projector.state_dict()
    torch.save({"state_dict": {f"cond_stage_model.{k}": v for k, v in full.items()}}, here / "partial.ckpt")
    code, _, err = run_cli(monkeypatch, capsys, "convert-ldm", "--ckpt", "partial.ckpt", "--config",
                           str(SMALL_YAML), "--out", "converted")
    fails_in_one_line(code, err, "partial.ckpt", "missing: model.diffusion_model.")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tiling:\n  tile_sise: 64\n", ["pipeline.yaml", "tiling.tile_sise", "unknown key"]),
        ("tiling:\n  tile_size: big\n", ["pipeline.yaml", "tiling.tile_size", "integer"]),
        ("extract:\n  blocks: up1\n", ["pipeline.yaml", "extract.blocks", "list"]),
        ("datset:\n  name: glas\n", ["pipeline.yaml", "datset", "unknown key"]),
        ("tiling:\n  tile_size: 64\n", ["pipeline.yaml", "stride 192 is larger than tile_size 64", "tiling.stride"]),
    ],
)
def test_yaml_with_unknown_or_mistyped_keys(here, monkeypatch, capsys, text, expected):
    (here / "pipeline.yaml").write_text(text)
    code, _, err = run_cli(monkeypatch, capsys, "extract", "--quiet")
    fails_in_one_line(code, err, *expected)


def test_timestep_out_of_range(here, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "extract", "--timesteps", "50,1000", "--quiet")
    fails_in_one_line(code, err, "extract.timesteps", "1000", "0..999")


def test_unknown_block_lists_the_valid_ones(here, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "extract", "--blocks", "up1,up9.9", "--quiet")
    fails_in_one_line(code, err, "up9.9", "valid blocks are: mid, up0.0", "up3.2", "output_blocks.K")
    assert not list_stores(Path("cache"))


def test_stage_two_without_a_store(here, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "fit-head", "--quiet")
    fails_in_one_line(code, err, "no feature store", "pathseg extract")
    shutil.rmtree(here / "cache", ignore_errors=True)
