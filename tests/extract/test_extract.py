import os
import shutil

import numpy as np
import pytest
import torch
from pathseg.extract import precision, runner
from pathseg.extract.backbone_sources import load_backbone
from pathseg.extract.tiles import tile_noise

from pathseg.errors import PathsegError
from pathseg.reports import store_info_text
from pathseg.store import FeatureStore, store_path_for
from pathseg.store.integrity import store_info, verify_store
from tests.conftest import REAL_GLAS, small_config, write_glas_fixture


def test_store_holds_every_array_at_native_resolution(extracted_small):
    config, path = extracted_small
    store = FeatureStore.open(path)
    info = store_info(store)
    assert info["complete"]
    shapes = {(f["timestep"], f["block"]): tuple(f["shape"]) for f in info["features"]}
    n = store.n_tiles
    # 128 px tiles -> 32 px latent; up1 = 96 ch after upsampling to 16 px, up3.2 = 32 ch at 32 px
    assert shapes == {(50, "up1"): (n, 96, 16, 16), (50, "up3.2"): (n, 32, 32, 32),
                      (150, "up1"): (n, 96, 16, 16), (150, "up3.2"): (n, 32, 32, 32)}
    array = store.feature_array(50, "up3.2")
    assert array.dtype == np.float16 and array.chunks == (1, 32, 32, 32) and array.shards[0] == 4
    assert "zstd" in str(array.compressors).lower()
    attrs = store.attrs
    assert attrs["config"]["extract"]["noise_seed"] == 0
    assert attrs["versions"]["torch"] and attrs["fingerprint"] == store.fingerprint
    assert attrs["block_aliases"]["output_blocks.5"] == "up1"


def test_image_and_tile_tables_allow_stitching(extracted_small):
    _, path = extracted_small
    store = FeatureStore.open(path)
    images = store.images
    assert [e.split for e in images].count("train") == 4
    assert sum(e.n_tiles for e in images) == store.n_tiles
    first = images[0]
    assert (first.height, first.width) == (150, 170)
    assert store.image_rgb(0).shape == (150, 170, 3)
    labels = store.image_labels(0)
    grid = store.image_grid(0)
    padded = np.pad(labels, [(grid.pad_top, grid.pad_bottom), (grid.pad_left, grid.pad_right)], mode="reflect")
    origin = store.tile_origins()[1]
    np.testing.assert_array_equal(store.tile_labels(np.array([1]))[0], padded[origin[0]:origin[0] + 128,
                                                                                origin[1]:origin[1] + 128])


def test_features_match_a_direct_forward_pass(extracted_small):
    """The stored map equals the UNet run by hand on z_t = sqrt(abar) z0 + sqrt(1 - abar) eps."""
    config, path = extracted_small
    store = FeatureStore.open(path)
    backbone = load_backbone("tiny")
    padded = np.pad(store.image_rgb(0), [(16, 16), (16, 16), (0, 0)], mode="reflect")
    tile = torch.from_numpy(padded[:128, :128].copy()).permute(2, 0, 1)[None].float() / 255
    with torch.inference_mode():
        z0 = backbone.first_stage.quant_conv(backbone.first_stage.encoder(tile * 2 - 1))
        noise = tile_noise(0, [f"{store.images[0].id}:0:0"], (3, 32, 32))
        zt = backbone.scheduler.add_noise(z0, noise, torch.tensor([150]))
        captured = {}
        handle = backbone.unet.up_blocks[1].register_forward_hook(lambda m, i, o: captured.setdefault("up1", o))
        backbone.unet(zt, torch.tensor([150]), encoder_hidden_states=backbone.projector.null_context(1))
        handle.remove()
    stored = store.read_features(150, "up1", np.array([0]))[0]
    np.testing.assert_allclose(stored, captured["up1"][0].numpy().astype(np.float16), rtol=2e-2, atol=2e-2)


def test_noise_depends_on_tile_not_on_batch():
    both = tile_noise(7, ["a:0:0", "b:0:96"], (3, 8, 8))
    alone = tile_noise(7, ["b:0:96"], (3, 8, 8))
    torch.testing.assert_close(both[1], alone[0])
    assert not torch.equal(both[0], both[1])


def test_two_extractions_of_one_config_are_identical(tmp_path, extracted_small):
    config, path = extracted_small
    again = small_config(tmp_path)
    summary = runner.run_extraction(again, show_progress=False)
    first, second = FeatureStore.open(path), FeatureStore.open(summary.store)
    assert first.fingerprint == second.fingerprint
    for info in first.feature_infos():
        np.testing.assert_array_equal(first.read_features(info.timestep, info.block, slice(None)),
                                      second.read_features(info.timestep, info.block, slice(None)))


def test_rerun_computes_nothing_and_never_builds_the_backbone(tmp_path, monkeypatch):
    config = small_config(tmp_path, **{"extract.timesteps": [50], "extract.blocks": ["up1"]})
    runner.run_extraction(config, show_progress=False)
    monkeypatch.setattr(runner, "load_backbone", lambda *a, **k: pytest.fail("backbone built for a cached store"))
    summary = runner.run_extraction(config, show_progress=False)
    assert summary.nothing_to_do and summary.computed_arrays == []


def test_new_timestep_or_block_computes_only_what_is_missing(tmp_path):
    config = small_config(tmp_path, **{"extract.timesteps": [50], "extract.blocks": ["up1"]})
    first = runner.run_extraction(config, show_progress=False)
    old = first.store / "features" / "t0050" / "up1"
    stamps = {p: p.stat().st_mtime_ns for p in old.rglob("*") if p.is_file()}
    bigger = small_config(tmp_path, **{"extract.timesteps": [50, 250], "extract.blocks": ["up1", "output_blocks.11"]})
    second = runner.run_extraction(bigger, show_progress=False)
    assert second.store == first.store
    assert second.computed_arrays == ["t0050/up3.2", "t0250/up1", "t0250/up3.2"]
    assert {p: p.stat().st_mtime_ns for p in old.rglob("*") if p.is_file()} == stamps


def test_one_compute_precision_per_store(tmp_path):
    """`auto` is float32 on a CPU: extending that store under bfloat16 would mix precisions, so it is refused."""
    config = small_config(tmp_path, **{"extract.timesteps": [50], "extract.blocks": ["up1"]})
    summary = runner.run_extraction(config, show_progress=False)
    assert FeatureStore.open(summary.store).compute_precision == "float32"
    bf16 = small_config(tmp_path, **{"extract.timesteps": [50], "extract.blocks": ["up1"],
                                     "extract.autocast": "bfloat16"})
    assert runner.run_extraction(bf16, show_progress=False).computed_tiles == 0  # nothing to compute: no mixing
    extend = small_config(tmp_path, **{"extract.timesteps": [50, 150], "extract.blocks": ["up1"],
                                       "extract.autocast": "bfloat16"})
    with pytest.raises(PathsegError, match=r"computed in float32; this run would compute in bfloat16"):
        runner.run_extraction(extend, show_progress=False)
    store = FeatureStore.open(summary.store)
    assert not store.has_feature(150, "up1") and store_info(store)["compute_precision"] == "float32"
    assert "precision   float32 (backbone compute" in store_info_text(store_info(store))
    fresh = runner.run_extraction(extend, show_progress=False, store_path=tmp_path / "bf16.zarr")
    assert FeatureStore.open(fresh.store).compute_precision == "bfloat16"


def test_different_tiling_dataset_or_backbone_gets_another_store(tmp_path):
    base = small_config(tmp_path)
    others = [
        small_config(tmp_path, **{"tiling.stride": 128}),
        small_config(tmp_path, **{"dataset.synthetic.seed": 1}),
        small_config(tmp_path, **{"backbone.seed": 1}),
        small_config(tmp_path, **{"extract.noise_seed": 1}),
    ]
    paths = {store_path_for(c) for c in [base, *others]}
    assert len(paths) == 5
    same = small_config(tmp_path, **{"extract.timesteps": [999], "train.epochs": 9})
    assert store_path_for(same) == store_path_for(base)


def test_store_of_other_data_needs_overwrite(tmp_path):
    root = write_glas_fixture(tmp_path / "glas", per_split={"train": 2, "testA": 1})
    config = small_config(tmp_path, **{"dataset.name": "glas", "dataset.root": str(root),
                                       "dataset.glas.val_fraction": 0.0, "extract.timesteps": [50],
                                       "extract.blocks": ["up1"]})
    runner.run_extraction(config, show_progress=False)
    (root / "testA_1.bmp").write_bytes((root / "testA_1.bmp").read_bytes() + b"\0" * 16)  # the data changed
    with pytest.raises(PathsegError, match="--overwrite"):
        runner.run_extraction(config, show_progress=False)
    summary = runner.run_extraction(config, show_progress=False, overwrite=True)
    assert store_info(FeatureStore.open(summary.store))["complete"]


def test_glas_fixture_extracts_with_instances(tmp_path):
    root = write_glas_fixture(tmp_path / "glas", ext="png", per_split={"train": 2, "testA": 1})
    config = small_config(tmp_path, **{"dataset.name": "glas", "dataset.root": str(root),
                                       "dataset.glas.val_fraction": 0.0, "extract.timesteps": [50],
                                       "extract.blocks": ["up1"]})
    store = FeatureStore.open(runner.run_extraction(config, show_progress=False).store)
    assert store.class_names == ["background", "gland"] and store.has_instances
    assert set(np.unique(store.image_instances(0))) == {0, 1, 2}


@pytest.mark.skipif(not REAL_GLAS.is_dir(), reason="real GlaS copy not present")
def test_real_glas_images_extract_with_tiny(tmp_path):
    subset = tmp_path / "glas"
    subset.mkdir()
    for name in ["train_1", "train_2", "testA_1"]:
        for suffix in ("", "_anno"):
            os.symlink(REAL_GLAS / f"{name}{suffix}.png", subset / f"{name}{suffix}.png")
    shutil.copy(REAL_GLAS / "Grade.csv", subset / "Grade.csv")
    config = small_config(tmp_path, **{"dataset.name": "glas", "dataset.root": str(subset),
                                       "dataset.glas.val_fraction": 0.0, "tiling.tile_size": 256,
                                       "tiling.stride": 256, "extract.timesteps": [50], "extract.blocks": ["up1"]})
    store = FeatureStore.open(runner.run_extraction(config, show_progress=False).store)
    info = store_info(store)
    assert info["complete"] and info["images"] == 3
    assert (store.images[0].height, store.images[0].width) == (522, 775)
    assert store.n_tiles == 3 * 3 * 4  # 522 -> 3 rows, 775 -> 4 cols of 256 px


def test_images_smaller_than_one_tile(tmp_path):
    """One tile per image (the whole image reflect-padded): its label chunk is written like any other."""
    config = small_config(tmp_path, **{"dataset.synthetic.height": 50, "dataset.synthetic.width": 60,
                                       "tiling.tile_size": 64, "tiling.stride": 64, "extract.timesteps": [50],
                                       "extract.blocks": ["up1"]})
    store = FeatureStore.open(runner.run_extraction(config, show_progress=False).store)
    assert store.n_tiles == len(store.images) and store_info(store)["complete"]
    grid = store.image_grid(0)
    padded = np.pad(store.image_labels(0), [(grid.pad_top, grid.pad_bottom), (grid.pad_left, grid.pad_right)],
                    mode="reflect")
    np.testing.assert_array_equal(store.tile_labels(np.array([0]))[0], padded)


def test_extension_reuses_cached_latents_and_matches_a_single_run(tmp_path, monkeypatch):
    """A new timestep on an existing store reads z_0 back instead of re-running the first-stage encoder,
    and decodes no image at all with the null context, yet gives the same bits as one run with both."""
    from pathseg.extract.backbone import Backbone
    from pathseg.extract.tiles import TileSource

    first = small_config(tmp_path / "a", **{"extract.timesteps": [50]})
    path = runner.run_extraction(first, show_progress=False).store
    assert FeatureStore.open(path).latent_shards_done().all()

    def must_not_run(*args, **kwargs):
        raise AssertionError("the extension recomputed what the store already holds")

    monkeypatch.setattr(Backbone, "encode", must_not_run)
    monkeypatch.setattr(TileSource, "tiles", must_not_run)
    extended = runner.run_extraction(small_config(tmp_path / "a", **{"extract.timesteps": [50, 150]}),
                                     show_progress=False)
    assert extended.computed_arrays == ["t0150/up1", "t0150/up3.2"]
    monkeypatch.undo()
    single = runner.run_extraction(small_config(tmp_path / "b", **{"extract.timesteps": [50, 150]}),
                                   show_progress=False).store
    a, b = FeatureStore.open(path), FeatureStore.open(single)
    for timestep, block in [(50, "up1"), (150, "up1"), (150, "up3.2")]:
        np.testing.assert_array_equal(a.read_features(timestep, block, slice(None)),
                                      b.read_features(timestep, block, slice(None)))


def _scaled_unet_outputs(monkeypatch, scale: float) -> None:
    """Make every captured block output `scale` times larger, as a backbone with huge activations would."""
    from pathseg.extract import blocks

    real_call = blocks.FeatureCapture.__call__

    def scaled(self, *args, **kwargs):
        return {name: value * scale for name, value in real_call(self, *args, **kwargs).items()}

    monkeypatch.setattr(blocks.FeatureCapture, "__call__", scaled)


def test_values_float16_cannot_hold_are_refused_then_stored_in_float32(tmp_path, monkeypatch):
    """A value above 65504 would be stored as inf and give fit-head NaN logits: refuse the shard, say why."""
    config = small_config(tmp_path, **{"extract.timesteps": [50], "extract.blocks": ["up1"]})
    _scaled_unet_outputs(monkeypatch, 1e7)
    with pytest.raises(PathsegError, match=r"t=50 up1 \(tile \d+\): \|values\| up to .* exceed float16's 65504") as err:
        runner.run_extraction(config, show_progress=False)
    assert "extract.feature_dtype=float32" in str(err.value) and "\n" not in str(err.value)
    store = FeatureStore.open(store_path_for(config))
    assert store.missing_shards(50, "up1") == list(range(store.n_shards))  # nothing flagged
    wide = small_config(tmp_path, **{"extract.timesteps": [50], "extract.blocks": ["up1"],
                                     "extract.feature_dtype": "float32"})
    runner.run_extraction(wide, show_progress=False)
    store = FeatureStore.open(store_path_for(wide))
    assert store.feature_array(50, "up1").dtype == np.float32
    assert np.isfinite(store.read_features(50, "up1", np.arange(4))).all()
    assert verify_store(store)["problems"] == []


def test_nan_from_the_model_is_refused_naming_the_block(tmp_path, monkeypatch):
    config = small_config(tmp_path, **{"extract.timesteps": [150], "extract.blocks": ["up3.2"]})
    _scaled_unet_outputs(monkeypatch, float("nan"))
    with pytest.raises(PathsegError, match=r"t=150 up3.2 .*computed NaN or inf"):
        runner.run_extraction(config, show_progress=False)


def test_no_silent_float16_on_a_gpu_without_bfloat16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    gpu = torch.device("cuda")
    assert precision.compute_dtype(gpu, "auto") == torch.float32
    assert precision.compute_dtype(gpu, "float16") == torch.float16
    with pytest.raises(PathsegError, match="no bfloat16 support; set extract.autocast to off"):
        precision.compute_dtype(gpu, "bfloat16")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert precision.compute_dtype(gpu, "auto") == torch.bfloat16
