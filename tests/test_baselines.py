"""Issue 24 end to end on synthetic data: encoder maps extend a store, `rgb` and the supervised networks train
from the store, predict needs no diffusion backbone for them, and one `ablate --baselines` sets every kind of
row beside the diffusion cells (a rerun computes nothing)."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from pathseg.extract.feature_encoders import build_feature_encoder
from pathseg.extract.runner import run_extraction
from pathseg.extract.tiles import PaddedView
from pathseg.predict.command import predict_images
from pathseg.train_head.fit import fit_head
from pathseg.train_head.runs import load_run
from PIL import Image

from pathseg.errors import PathsegError
from pathseg.store import FeatureStore
from tests.conftest import run_cli

VIT = "timm:vit_tiny_patch16_224"
VIT_BLOCK = f"enc:{VIT}"


@pytest.fixture(scope="module")
def encoded(extracted_small, tmp_path_factory):
    """A copy of the shared small store, extended with a random ViT-Ti's maps (its output and block 3)."""
    config, store_path = extracted_small
    tmp = tmp_path_factory.mktemp("encoded")
    copy = tmp / store_path.name
    shutil.copytree(store_path, copy)
    config = config.model_copy(update={"runs_dir": tmp / "runs"}, deep=True)
    config.extract.encoders = [VIT]
    config.extract.encoder_weights = {VIT: "random"}
    config.extract.encoder_layers = [3]
    config.train.epochs = 1
    config.evaluate.overlays = 0
    summary = run_extraction(config, show_progress=False, store_path=copy)
    return config, copy, summary


def test_encoder_maps_extend_the_store_as_a_direct_forward_computes_them(encoded, extracted_small):
    config, path, summary = encoded
    store = FeatureStore.open(path)
    assert store.fingerprint == FeatureStore.open(extracted_small[1]).fingerprint  # the store's key is unchanged
    assert sorted(summary.computed_arrays) == ["encoders/timm-vit_tiny_patch16_224",
                                               "encoders/timm-vit_tiny_patch16_224@3"]
    output = store.feature_array(-1, VIT_BLOCK)
    assert output.shape == (store.n_tiles, 192, 14, 14) and output.dtype == np.float16
    record = store.attrs["encoders"][VIT_BLOCK]
    assert record["random"] is True and record["weights_digest"] is None and record["seconds_per_tile"] > 0
    encoder = build_feature_encoder(VIT, "random", seed=config.extract.noise_seed)
    tile = 5
    index = int(store.tile_images()[tile])
    view = PaddedView(store.image_rgb(index), store.image_grid(index), config.tiling.pad_mode)
    pixels = view.tile(tuple(store.tile_origins()[tile]), store.tile_size)
    with torch.inference_mode():
        direct = encoder.maps(torch.from_numpy(pixels[None]).permute(0, 3, 1, 2).float() / 255.0, [3])
    np.testing.assert_array_equal(output[tile], direct[0][0].numpy().astype(np.float16))
    layer3 = store.feature_array(-1, f"{VIT_BLOCK}@3")[tile]
    np.testing.assert_array_equal(layer3, direct[1][0].numpy().astype(np.float16))
    again = run_extraction(config, show_progress=False, store_path=path)
    assert again.nothing_to_do


def test_other_weights_for_a_stored_encoder_are_refused(encoded, tmp_path):
    config, path, _ = encoded
    weights = tmp_path / "vit.pth"
    torch.save(build_feature_encoder(VIT, "random", seed=7).module.state_dict(), weights)
    other = config.model_copy(deep=True)
    other.extract.encoder_weights = {VIT: str(weights)}
    with pytest.raises(PathsegError, match="extracted with random"):
        run_extraction(other, show_progress=False, store_path=path)
    other.extract.encoder_weights = {}
    with pytest.raises(PathsegError, match="encoder_weights"):
        run_extraction(other, show_progress=False, store_path=path)


def test_a_head_on_an_encoder_is_keyed_by_its_weights_and_not_scored_on_others(encoded, tmp_path):
    """Encoder arrays are outside the store's fingerprint, so the run key and evaluate hold their weights."""
    import zarr
    from pathseg.train_head.evaluate import evaluate_run
    from pathseg.train_head.runs import run_key

    config, original, _ = encoded
    path = tmp_path / original.name
    shutil.copytree(original, path)
    config = config.model_copy(update={"runs_dir": tmp_path / "runs"}, deep=True)
    config.head.blocks = [VIT_BLOCK]
    run_dir = fit_head(config, store_path=path, show_progress=False).run_dir
    pairs = load_run(run_dir).pairs
    before = run_key(config, FeatureStore.open(path), pairs)
    group = zarr.open_group(str(path), mode="r+")  # as if re-extracted from another file into a new store here
    records = dict(group.attrs["encoders"])
    records[VIT_BLOCK] = {**records[VIT_BLOCK], "random": False, "weights_digest": "ab" * 32, "seed": None}
    group.attrs["encoders"] = records
    assert run_key(config, FeatureStore.open(path), pairs) != before
    with pytest.raises(PathsegError, match="other encoder weights than run"):
        evaluate_run(config, run_dir, show_progress=False, echo=False)


def _store_image(store: FeatureStore, tmp_path):
    index = next(i for i, entry in enumerate(store.images) if entry.split == "test")
    image = tmp_path / "in" / f"{store.images[index].id}.png"
    image.parent.mkdir(exist_ok=True)
    Image.fromarray(store.image_rgb(index)).save(image)
    return index, image


@pytest.mark.parametrize("settings", [{"blocks": [VIT_BLOCK, "rgb"]}, {"kind": "unet-resnet18"}])
def test_runs_on_encoders_or_pixels_predict_as_evaluate_scores_without_the_backbone(encoded, settings, tmp_path,
                                                                                    monkeypatch):
    from pathseg.predict import predictor

    from tests.predict.test_images import evaluated_label_maps

    config, path, _ = encoded
    config = config.model_copy(deep=True)
    for key, value in settings.items():
        setattr(config.head, key, value)
    run_dir = fit_head(config, store_path=path, show_progress=False).run_dir
    record = load_run(run_dir).record
    assert record["pixels"] and record["blocks"][-1] == "rgb"
    assert record["in_channels"] == ([192] if "blocks" in settings else [])

    def no_backbone(*args, **kwargs):
        raise AssertionError("predict built the diffusion backbone for a run that reads none of its features")

    monkeypatch.setattr(predictor, "load_backbone", no_backbone)
    store = FeatureStore.open(path)
    index, image = _store_image(store, tmp_path)
    predict_images(run_dir, [str(image)], tmp_path / "out", show_progress=False)
    predicted = np.asarray(Image.open(tmp_path / "out" / store.images[index].id / "labels.png"))
    config.cache_dir = str(path.parent)
    kept = evaluated_label_maps(config.model_copy(deep=True), run_dir, monkeypatch)
    np.testing.assert_array_equal(predicted, kept[index])


def test_pixel_only_kinds_refuse_stored_maps(encoded):
    config, path, _ = encoded
    config = config.model_copy(deep=True)
    config.head.kind = "fcn8-vgg16"
    config.head.blocks = ["up1"]
    with pytest.raises(PathsegError, match="pixels alone"):
        fit_head(config, store_path=path, show_progress=False)


@pytest.mark.slow
def test_one_ablation_sets_every_baseline_beside_the_diffusion_cells(encoded, monkeypatch, capsys):
    config, path, _ = encoded
    args = ["ablate", "--dataset", "synthetic", "--store", str(path), "--timesteps", "50", "--blocks", "up3.2",
            "--seeds", "1", "--epochs", "1", "--baseline-epochs", "1", "--quiet",
            "--baselines", f"z0,{VIT_BLOCK},rgb,unet-resnet18,fcn8-vgg16",
            "--set", f"runs_dir={config.runs_dir}", "--set", "evaluate.overlays=0",
            "--set", "dataset.synthetic.train=4", "--set", "dataset.synthetic.val=1",
            "--set", "dataset.synthetic.test=2",
            "--set", "dataset.synthetic.height=150", "--set", "dataset.synthetic.width=170",
            "--set", "tiling.tile_size=128", "--set", "tiling.stride=96", "--set", "extract.timesteps=[50,150]",
            "--set", "train.batch_size=4"]
    code, out, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0, err
    folder = next(line.split("outputs in ")[1].strip() for line in err.splitlines() if "outputs in" in line)
    rows = list(csv.DictReader(open(f"{folder}/leaderboard.csv")))
    cells = {row["cell"] for row in rows}
    assert cells == {"t50 up3.2", "z0", VIT_BLOCK, "rgb", "unet-resnet18", "fcn8-vgg16"}
    costs = {row["cell"]: row for row in rows}
    assert float(costs["rgb"]["feature_seconds_per_tile"]) == 0
    assert float(costs[VIT_BLOCK]["feature_seconds_per_tile"]) > 0
    assert all(float(row["head_seconds_per_epoch"]) > 0 for row in rows)
    table = open(f"{folder}/paper_table.md").read()
    assert "(random weights)" in table and "unet-resnet18" in table and "accuracy" in table
    record = json.load(open(f"{folder}/ablation.json"))
    kinds = {r["baseline"]: load_run(r["run"]).record["head"]["kind"] for r in record["runs"] if r["baseline"]}
    assert kinds == {"rgb": "conv", "unet-resnet18": "unet-resnet18", "fcn8-vgg16": "fcn8-vgg16"}
    code, out, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0 and "nothing computed" in err
