import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pathseg.extract import runner
from pathseg.train_head.evaluate import evaluate_run
from pathseg.train_head.fit import dice_loss, fit_head
from pathseg.train_head.head import SegmentationHead
from pathseg.train_head.loader import StoreLoader, dihedral
from pathseg.train_head.runs import load_run

from pathseg.errors import PathsegError
from pathseg.store import FeatureStore


def test_loader_holds_a_bounded_number_of_tiles(extracted_small):
    _, path = extracted_small
    store = FeatureStore.open(path)
    tiles = np.arange(store.n_tiles)
    loader = StoreLoader(store, [(50, "up1"), (150, "up3.2")], tiles, batch_size=3, shuffle=True, prefetch=2)
    seen = []
    for batch in loader:
        assert batch.features[0].shape[1:] == (96, 16, 16) and batch.features[1].shape[1:] == (32, 32, 32)
        assert batch.labels.shape[1:] == (128, 128)
        seen.extend(batch.tiles.tolist())
    assert sorted(seen) == tiles.tolist()
    assert loader.max_tiles_in_memory <= (2 + 1) * 3


def test_loader_shuffle_is_seeded_per_epoch(extracted_small):
    _, path = extracted_small
    store = FeatureStore.open(path)
    tiles = np.arange(store.n_tiles)

    def order(seed, epoch):
        loader = StoreLoader(store, [(50, "up1")], tiles, batch_size=4, shuffle=True, seed=seed, prefetch=0)
        loader.set_epoch(epoch)
        return [t for batch in loader for t in batch.tiles.tolist()]

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1)


def test_augmentation_moves_features_and_labels_together(extracted_small):
    """A tile whose label is read back from its own rotated feature grid stays consistent."""
    _, path = extracted_small
    store = FeatureStore.open(path)
    plain = next(iter(StoreLoader(store, [(150, "up3.2")], np.arange(4), 4, prefetch=0)))
    augmented = next(iter(StoreLoader(store, [(150, "up3.2")], np.arange(4), 4, augment=True, seed=5, prefetch=0)))
    for i in range(4):
        matched = False
        for k in range(4):
            for flip in (False, True):
                f_ok = np.array_equal(dihedral(plain.features[0][i].numpy(), k, flip), augmented.features[0][i].numpy())
                l_ok = np.array_equal(dihedral(plain.labels[i].numpy(), k, flip), augmented.labels[i].numpy())
                matched |= f_ok and l_ok
        assert matched


def test_head_maps_multiscale_features_to_tile_logits():
    head = SegmentationHead([96, 32], num_classes=3, width=16, depth=2, projection_width=8)
    logits = head([torch.randn(2, 96, 16, 16), torch.randn(2, 32, 32, 32)], output_size=128)
    assert logits.shape == (2, 3, 128, 128)


def test_dice_loss_ignores_dont_care_pixels():
    labels = torch.tensor([[[0, 1], [255, 255]]])
    perfect = torch.tensor([[[[9.0, -9.0], [0.0, 0.0]], [[-9.0, 9.0], [0.0, 0.0]]]])
    assert dice_loss(perfect, labels, ignore_index=255) < 1e-3


def test_fit_then_evaluate_writes_run_and_metrics(extracted_small, tmp_path):
    config, store_path = extracted_small
    config = config.model_copy(update={"runs_dir": tmp_path / "runs"})
    result = fit_head(config, show_progress=False)
    run = load_run(result.run_dir)
    record = run.record
    assert record["store_fingerprint"] == FeatureStore.open(store_path).fingerprint
    assert record["timesteps"] == [50, 150] and record["blocks"] == ["up1", "up3.2"]
    assert record["seed"] == 0 and record["config"]["train"]["epochs"] == 2
    assert (result.run_dir / "head.safetensors").exists() and (result.run_dir / "history.csv").exists()
    assert len(json.loads((result.run_dir / "history.json").read_text())) == 2

    evaluation = evaluate_run(config, run, show_progress=False)
    metrics = evaluation.metrics["splits"]["test"]
    assert metrics["images"] == 2
    assert {"pixel_accuracy", "miou", "miou_no_background", "mean_dice", "objects"} <= set(metrics)
    assert {"object_f1", "object_dice", "object_hausdorff"} <= set(metrics["objects"])
    assert (evaluation.directory / "metrics.md").read_text().startswith("# Evaluation")
    assert len(list((evaluation.directory / "overlays" / "test").glob("*.png"))) == 1


def test_best_epoch_is_chosen_on_the_figure_evaluate_reports(extracted_small, tmp_path):
    """The selection metric of every epoch is evaluate's val mIoU of that epoch's head: stitched, cropped."""
    config, _ = extracted_small
    config = config.model_copy(update={"runs_dir": tmp_path / "runs"}, deep=True)
    config.train.epochs = 3
    config.evaluate.splits = ["val"]
    result = fit_head(config, show_progress=False)
    best = result.history[result.best_epoch]
    assert best["val_miou"] == max(row["val_miou"] for row in result.history)
    evaluation = evaluate_run(config, result.run_dir, show_progress=False)
    assert evaluation.metrics["splits"]["val"]["miou"] == pytest.approx(best["val_miou"], abs=1e-9)
    assert evaluation.metrics["splits"]["val"]["pixel_accuracy"] == pytest.approx(best["val_pixel_accuracy"])


def test_batches_without_labelled_pixels_are_skipped_not_nan(extracted_small, tmp_path, monkeypatch):
    """A batch whose pixels are all don't-care gives CE = NaN; without a val split no epoch was ever kept."""
    config, store_path = extracted_small
    copy = tmp_path / "store.zarr"
    import shutil

    shutil.copytree(store_path, copy)
    store = FeatureStore.open(copy, mode="a")
    store.group.attrs["ignore_index"] = 255
    train_tiles = store.tiles_of_splits(["train"])
    labels = store.group["tiles/labels"]
    for tile in train_tiles[:4]:  # the first batch of 4 in storage order would be all-ignored
        labels[int(tile)] = 255
    config = config.model_copy(update={"runs_dir": tmp_path / "runs"}, deep=True)
    config.train.val_split = "none"
    config.train.augment = False
    config.train.batch_size = 4
    monkeypatch.setattr(StoreLoader, "windows", lambda self: [self.tiles])  # storage order: one batch all-ignored
    result = fit_head(config, store_path=copy, show_progress=False)
    assert all(np.isfinite(row["train_loss"]) for row in result.history)
    assert all(row["skipped_batches"] == 1 for row in result.history)
    assert (result.run_dir / "head.safetensors").exists()
    for tile in train_tiles:
        labels[int(tile)] = 255
    with pytest.raises(PathsegError, match="unlabelled"):
        fit_head(config, store_path=copy, run_dir=tmp_path / "none", show_progress=False)


def test_fit_is_reproducible(extracted_small, tmp_path):
    config, _ = extracted_small
    config = config.model_copy(update={"runs_dir": tmp_path / "runs"})
    a = fit_head(config, run_dir=tmp_path / "a", show_progress=False)
    b = fit_head(config, run_dir=tmp_path / "b", show_progress=False)
    assert [r["train_loss"] for r in a.history] == [r["train_loss"] for r in b.history]


def test_ablations_on_one_store_never_extract(extracted_small, tmp_path, monkeypatch):
    config, _ = extracted_small
    monkeypatch.setattr(runner, "load_backbone", lambda *a, **k: pytest.fail("stage 2 built the backbone"))
    dirs = set()
    for timesteps, blocks in (([50], ["up1"]), ([150], ["output_blocks.11"])):
        ablation = config.model_copy(update={"runs_dir": tmp_path / "runs"}, deep=True)
        ablation.head.timesteps, ablation.head.blocks = timesteps, blocks
        ablation.train.epochs = 1
        result = fit_head(ablation, show_progress=False)
        dirs.add(result.run_dir)
        assert load_run(result.run_dir).record["blocks"] == [blocks[0].replace("output_blocks.11", "up3.2")]
    assert len(dirs) == 2


def test_missing_or_incomplete_features_are_refused(extracted_small, tmp_path):
    config, store_path = extracted_small
    missing = config.model_copy(deep=True)
    missing.head.timesteps = [999]
    with pytest.raises(PathsegError, match="no features for timestep 999"):
        fit_head(missing, show_progress=False)
    store = FeatureStore.open(store_path, mode="a")
    store.group["done/t0050/up1"][0] = 0
    try:
        with pytest.raises(PathsegError, match="incomplete"):
            fit_head(config, show_progress=False)
    finally:
        store.group["done/t0050/up1"][0] = 1


def test_default_run_beats_all_background(tmp_path):
    """`pathseg run` on the shipped pipeline.yaml (synthetic data, tiny backbone), as the README runs it:
    the head must find glands, not just predict background."""
    root = Path(__file__).resolve().parents[2]
    command = [sys.executable, "-m", "pathseg.cli", "run", "--config", str(root / "pipeline.yaml"), "--quiet",
               "--set", f"cache_dir={tmp_path / 'cache'}", "--set", f"runs_dir={tmp_path / 'runs'}"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "pixel acc" in done.stdout and "gland" in done.stdout
    (metrics_file,) = (tmp_path / "runs").rglob("metrics.json")
    metrics = json.loads(metrics_file.read_text())["splits"]["test"]
    (store_path,) = (tmp_path / "cache").glob("*.zarr")
    store = FeatureStore.open(store_path)
    labels = np.concatenate([store.image_labels(i).ravel() for i, e in enumerate(store.images) if e.split == "test"])
    background_share = (labels == 0).mean()
    all_background_miou = background_share / 2  # IoU(bg) = share of bg pixels, IoU(gland) = 0
    assert metrics["pixel_accuracy"] > background_share
    assert metrics["miou"] > all_background_miou + 0.15
    assert metrics["per_class"]["gland"]["iou"] > 0.3


def test_evaluate_with_a_run_refuses_flags_that_would_pick_another(extracted_small, tmp_path, monkeypatch, capsys):
    from tests.conftest import run_cli

    config, _ = extracted_small
    config = config.model_copy(update={"runs_dir": tmp_path / "runs"})
    result = fit_head(config, show_progress=False)
    capsys.readouterr()
    for flags in (["--head-blocks", "up1"], ["--dataset", "glas"], ["--set", "head.width=8"]):
        code, _, err = run_cli(monkeypatch, capsys, "evaluate", str(result.run_dir), "--quiet", *flags)
        named = flags[1].split("=")[0] if flags[0] == "--set" else flags[0]
        assert code == 2 and named in err and "RUN" in err
        assert len(err.strip().splitlines()) == 1


def test_evaluate_scores_a_run_on_another_store_extracted_the_same_way(extracted_small, tmp_path):
    from pathseg.extract.runner import run_extraction

    from tests.conftest import small_config

    config, _ = extracted_small
    config = config.model_copy(update={"runs_dir": tmp_path / "runs"})
    result = fit_head(config, show_progress=False)
    few = {"dataset.synthetic.train": 1, "dataset.synthetic.val": 0, "dataset.synthetic.test": 1}
    other = small_config(tmp_path / "other", **{"dataset.synthetic.seed": 7, **few})
    other_store = run_extraction(other, show_progress=False).store
    evaluation = evaluate_run(config, result.run_dir, store_path=other_store, show_progress=False)
    assert evaluation.directory.name == f"eval-{other_store.stem}"
    assert evaluation.metrics["store"] == str(other_store) and evaluation.metrics["splits"]["test"]["images"] == 1
    retiled = small_config(tmp_path / "retiled", **{"tiling.stride": 64, **few})
    retiled_store = run_extraction(retiled, show_progress=False).store
    with pytest.raises(PathsegError, match=r"not extracted like run .*\(differs in tiling\)"):
        evaluate_run(config, result.run_dir, store_path=retiled_store, show_progress=False)


def test_a_consumer_that_raises_mid_stitching_leaves_grad_enabled(extracted_small):
    """The stitching generator once held inference mode across its yields; an error in the consumer (a damaged
    label array while scoring) then left grad disabled, and every later fit-head in the process failed."""
    import gc

    from pathseg.train_head.stitching import stitched_logits

    _, path = extracted_small
    store = FeatureStore.open(path)
    head = SegmentationHead([96], num_classes=len(store.class_names), width=8, depth=1, projection_width=4)
    images = [i for i, entry in enumerate(store.images) if entry.split == "val"]
    gc.disable()  # keep the abandoned generator alive, as a traceback holding its frame does
    try:
        kept = stitched_logits(head, store, [(50, "up1")], images, torch.device("cpu"), 4)
        next(kept)
        assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    finally:
        gc.enable()
