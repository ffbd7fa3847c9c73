"""`pathseg pretrain`: both phases learn, a killed run resumes exactly, a NaN stops cleanly, the result is a backbone.

Every run uses the tiny preset narrowed to width 8 on 64 px synthetic tiles, the first stage trained on
32 px crops of them, on one CPU thread (two threads on a shared two-core machine spend their time waiting
for each other), so a phase step takes tens of milliseconds.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from pathseg.pretrain.checkpoints import CHECKPOINT, load_checkpoint
from pathseg.pretrain.command import run_pretraining, work_dir_for
from pathseg.pretrain.data import TileStream, augment, build_stream, crop_size, random_crops
from safetensors.torch import load_file
from torch import nn

from pathseg.config import load_config
from pathseg.errors import PathsegError
from pathseg.store import PRETRAIN_RECORD, store_path_for
from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parents[2]
SMALL_PRETRAIN = {
    "dataset.synthetic.train": 2,
    "dataset.synthetic.val": 1,
    "dataset.synthetic.test": 1,
    "dataset.synthetic.height": 128,
    "dataset.synthetic.width": 128,
    "tiling.tile_size": 64,
    "tiling.stride": 48,
    "pretrain.first_stage_crop": 32,
    "pretrain.unet_width": 8,
    "pretrain.first_stage_width": 8,
    "pretrain.steps": 24,
    "pretrain.first_stage_fraction": 0.5,
    "pretrain.batch_size": 4,
    "pretrain.checkpoint_every": 4,
    "pretrain.lr_first_stage": 0.001,
    "pretrain.lr_unet": 0.001,
    "pretrain.samples": 2,
    "pretrain.sample_steps": 2,
    "pretrain.reconstructions": 4,
}


def pretrain_overrides(tmp: Path, **overrides) -> dict:
    return {"cache_dir": str(tmp / "cache"), **SMALL_PRETRAIN, **overrides}


def pretrain_config(tmp: Path, **overrides):
    return load_config(None, pretrain_overrides(tmp, **overrides))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """One uninterrupted 12 + 12 step pretraining, the reference the other tests compare against."""
    tmp = tmp_path_factory.mktemp("pretrained")
    config = pretrain_config(tmp)
    summary = run_pretraining(config, tmp / "backbone", show_progress=False)
    return config, tmp / "backbone", summary


def history(out: Path) -> dict[str, list[float]]:
    return json.loads((out / "loss_history.json").read_text())


def test_both_phases_lower_their_loss_and_the_directory_is_complete(pretrained):
    _, out, summary = pretrained
    losses = history(out)
    assert len(losses["first_stage"]) == 12 and len(losses["unet"]) == 12
    for phase in ("first_stage", "unet"):
        values = losses[phase]
        assert np.isfinite(values).all()
        assert np.mean(values[-4:]) < 0.9 * np.mean(values[:4]), (phase, values)
    parts = np.array(losses["first_stage/reconstruction"]) + np.array(losses["first_stage/regulariser"])
    np.testing.assert_allclose(parts, losses["first_stage"], rtol=1e-5)  # the terms, logged apart, add up
    names = {p.name for p in out.iterdir()}
    assert {"unet", "first_stage", "scheduler", "ssl_projector", PRETRAIN_RECORD, "loss.png", "reconstructions.png",
            "samples.png"} <= names
    record = json.loads((out / PRETRAIN_RECORD).read_text())
    assert record == summary.record
    assert record["steps"] == {"total": 24, "first_stage": 12, "unet": 12}
    assert record["data"]["splits"] == ["train"] and record["data"]["images"] == 2  # val and test never seen
    assert all(rate > 0 for rate in record["steps_per_second"].values())
    assert record["seed"] == 0 and record["versions"]["torch"] and record["config"]["pretrain"]["steps"] == 24
    kept = work_dir_for(out)  # only the last checkpoint stays, so a larger --steps can extend the run
    assert [p.name for p in kept.iterdir()] == [CHECKPOINT]
    assert load_checkpoint(kept / CHECKPOINT)["state"]["step"] == 24


def test_the_tile_order_is_a_seeded_windowed_shuffle(tmp_path):
    config = pretrain_config(tmp_path, **{"pretrain.cached_images": 1})
    stream = build_stream(config)
    again = TileStream(stream.reader, 4, 0, 1)
    order = stream.epoch_order(0)
    assert sorted(order.tolist()) == list(range(stream.n_tiles))  # every tile once per epoch
    assert not np.array_equal(order, stream.epoch_order(1))
    np.testing.assert_array_equal(stream.indices(7), again.indices(7))
    images = stream.reader.image_of[order]
    assert (np.diff(images) != 0).sum() == 1  # one image at a time with a one-image window: each decoded once
    generator = torch.Generator().manual_seed(3)
    tiles = torch.rand(4, 3, 16, 16)
    first = augment(tiles, generator, True, 0.05)
    second = augment(tiles, torch.Generator().manual_seed(3), True, 0.05)
    assert torch.equal(first, second) and first.min() >= 0 and first.max() <= 1


def test_the_first_stage_trains_on_crops_and_everything_after_sees_whole_tiles(tmp_path, monkeypatch):
    import pathseg.pretrain.trainer as trainer

    building, seen = trainer.build_first_stage, []

    def spied(*args, **kwargs):
        model = building(*args, **kwargs)
        model.encoder.register_forward_pre_hook(
            lambda _, inputs: seen.append((torch.is_grad_enabled(), tuple(inputs[0].shape)))
        )
        return model

    monkeypatch.setattr(trainer, "build_first_stage", spied)
    config = pretrain_config(tmp_path, **{"pretrain.steps": 4, "pretrain.samples": 0})
    summary = run_pretraining(config, tmp_path / "backbone", show_progress=False)
    training = [shape for grad, shape in seen if grad]
    assert training == [(4, 3, 32, 32)] * 2  # both phase-1 steps on 32 px crops of the 64 px tiles
    assert {shape[-2:] for grad, shape in seen if not grad} == {(64, 64)}  # UNet phase latents, reconstructions
    assert summary.record["first_stage_crop"] == 32 and summary.record["reconstruction"]["tiles"] == 4

    tiles = torch.arange(2 * 3 * 64 * 64, dtype=torch.float32).reshape(2, 3, 64, 64)
    crops = random_crops(tiles, 32, torch.Generator().manual_seed(5))
    assert torch.equal(crops, random_crops(tiles, 32, torch.Generator().manual_seed(5)))  # a function of the seed
    for k in range(2):
        top, left = divmod(int(crops[k, 0, 0, 0] - tiles[k, 0, 0, 0]), 64)
        assert torch.equal(crops[k], tiles[k, :, top : top + 32, left : left + 32])  # a window of its own tile
    assert crop_size(None, 64) is None and crop_size(64, 64) is None and crop_size(128, 64) is None  # whole tiles

    with pytest.raises(PathsegError) as caught:
        pretrain_config(tmp_path, **{"pretrain.first_stage_crop": 30})
    assert "\n" not in str(caught.value) and "pretrain.first_stage_crop" in str(caught.value)


def test_a_whole_tile_fraction_of_phase_one_steps_sees_extractions_tile_size(tmp_path, monkeypatch):
    import pathseg.pretrain.trainer as trainer

    building, seen = trainer.build_first_stage, []

    def spied(*args, **kwargs):
        model = building(*args, **kwargs)
        model.encoder.register_forward_pre_hook(lambda _, inputs: seen.append(tuple(inputs[0].shape[-2:]))
                                                if torch.is_grad_enabled() else None)
        return model

    monkeypatch.setattr(trainer, "build_first_stage", spied)
    config = pretrain_config(tmp_path, **{"pretrain.steps": 6, "pretrain.first_stage_steps": 4, "pretrain.samples": 0,
                                          "pretrain.first_stage_whole_fraction": 0.5, "pretrain.quality_tiles": 0})
    run_pretraining(config, tmp_path / "backbone", show_progress=False)
    assert seen == [(32, 32), (64, 64), (32, 32), (64, 64)]  # evenly spaced, half of the steps


class Interrupted(Exception):
    """A run stopped right after a checkpoint, as a kill there would stop it."""


def run_until_checkpoint(monkeypatch, config, out: Path, step: int) -> None:
    """Run `config` into `out`, stopping right after the checkpoint at `step` is written."""
    import pathseg.pretrain.trainer as trainer

    saving = trainer.save_checkpoint

    def save_then_stop(path, content):
        saving(path, content)
        if content["state"]["step"] == step:
            raise Interrupted

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_stop)
    with pytest.raises(Interrupted):
        run_pretraining(config, out, show_progress=False)
    monkeypatch.setattr(trainer, "save_checkpoint", saving)


def test_a_run_stopped_in_phase_one_resumes_with_the_same_crops_and_refuses_another_crop(pretrained, tmp_path,
                                                                                      monkeypatch):
    _, reference, _ = pretrained
    out = tmp_path / "backbone"
    run_until_checkpoint(monkeypatch, pretrain_config(tmp_path), out, 4)

    with pytest.raises(PathsegError, match="other first_stage_crop;"):
        run_pretraining(pretrain_config(tmp_path, **{"pretrain.first_stage_crop": 16}), out, show_progress=False)
    summary = run_pretraining(pretrain_config(tmp_path), out, show_progress=False)
    assert summary.resumed_from == 4
    np.testing.assert_allclose(history(out)["first_stage"], history(reference)["first_stage"], rtol=1e-5)


def test_a_finished_run_extends_to_more_steps_as_if_run_that_long_and_cannot_shorten(pretrained, tmp_path):
    """The learning rates are constant, so 16 steps then 8 more are the reference's 24 steps, exactly."""
    _, reference, _ = pretrained
    out = tmp_path / "backbone"
    fixed_first = {"pretrain.first_stage_steps": 12}
    short = run_pretraining(pretrain_config(tmp_path, **{"pretrain.steps": 16}, **fixed_first), out,
                            show_progress=False)
    assert short.record["steps"] == {"total": 16, "first_stage": 12, "unet": 4}
    short_digest = short.record["weights_digest"]

    extended = run_pretraining(pretrain_config(tmp_path, **fixed_first), out, show_progress=False)
    assert extended.resumed_from == 16 and extended.record["steps"]["total"] == 24
    assert extended.record["weights_digest"] != short_digest
    np.testing.assert_allclose(history(out)["unet"], history(reference)["unet"], rtol=1e-5)
    for part in ("unet", "first_stage"):
        ours = load_file(out / part / "diffusion_pytorch_model.safetensors")
        theirs = load_file(reference / part / "diffusion_pytorch_model.safetensors")
        for name, tensor in theirs.items():
            torch.testing.assert_close(ours[name], tensor, rtol=1e-4, atol=1e-5)
    assert run_pretraining(pretrain_config(tmp_path, **fixed_first), out, show_progress=False).already_done
    with pytest.raises(PathsegError, match="cannot be shortened"):
        run_pretraining(pretrain_config(tmp_path, **{"pretrain.steps": 20}, **fixed_first), out, show_progress=False)


def test_a_checkpoint_from_before_first_stage_steps_still_resumes(pretrained, tmp_path, monkeypatch):
    """Checkpoints once held `steps` and `first_stage_fraction` in their identity; the same split resumes."""
    from pathseg.pretrain.checkpoints import save_checkpoint

    from pathseg.store import digest

    out = tmp_path / "backbone"
    run_until_checkpoint(monkeypatch, pretrain_config(tmp_path), out, 16)
    checkpoint = work_dir_for(out) / CHECKPOINT
    saved = load_checkpoint(checkpoint)
    legacy = {k: v for k, v in saved["identity"].items() if k != "first_stage_steps"}
    legacy.update(steps=24, first_stage_fraction=0.5)
    save_checkpoint(checkpoint, {**saved, "identity": legacy, "identity_key": digest(legacy)})

    summary = run_pretraining(pretrain_config(tmp_path), out, show_progress=False)
    assert summary.resumed_from == 16
    np.testing.assert_allclose(history(out)["unet"], history(pretrained[1])["unet"], rtol=1e-5)


def test_a_backbone_recorded_before_these_settings_is_still_the_same_run(pretrained, tmp_path):
    """A record whose identity lacks the later settings reads them at their neutral values: done, not refused."""
    config, reference, _ = pretrained
    out = tmp_path / "backbone"
    shutil.copytree(reference, out)
    shutil.copytree(work_dir_for(reference), work_dir_for(out))
    record = json.loads((out / PRETRAIN_RECORD).read_text())
    for name in ("warmup_steps", "lr_decay_after", "min_snr_gamma", "accumulation", "first_stage_whole_fraction",
                 "lowpass_weight", "lowpass_pool"):
        record["identity"]["settings"].pop(name)
    record["settings_key"] = "an-older-key"
    (out / PRETRAIN_RECORD).write_text(json.dumps(record))
    assert run_pretraining(config, out, show_progress=False).already_done


KILLED_RUN = """
import json, sys, time
from pathlib import Path
import pathseg.pretrain.trainer as trainer
from pathseg.config import load_config
from pathseg.pretrain.command import run_pretraining

saving = trainer.save_checkpoint
def save_then_wait(path, content):
    saving(path, content)
    if content["state"]["step"] == 16:  # in the UNet phase, after its first checkpoint
        Path(sys.argv[3]).write_text("saved")
        time.sleep(120)
trainer.save_checkpoint = save_then_wait
run_pretraining(load_config(None, json.loads(sys.argv[1])), Path(sys.argv[2]), show_progress=False)
"""


def test_a_killed_run_resumes_from_its_checkpoint_and_ends_as_an_uninterrupted_one(pretrained, tmp_path):
    _, reference, _ = pretrained
    out, marker = tmp_path / "backbone", tmp_path / "saved"
    overrides = pretrain_overrides(tmp_path)
    process = subprocess.Popen([sys.executable, "-c", KILLED_RUN, json.dumps(overrides), str(out), str(marker)],
                               cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, process.stderr.read().decode()[-2000:]
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not out.exists()
    assert load_checkpoint(work_dir_for(out) / CHECKPOINT)["state"]["step"] == 16

    summary = run_pretraining(load_config(None, overrides), out, show_progress=False)
    assert summary.resumed_from == 16 and summary.record["resumed_from_steps"] == [16]
    resumed, uninterrupted = history(out), history(reference)
    for phase in ("first_stage", "unet"):
        np.testing.assert_allclose(resumed[phase], uninterrupted[phase], rtol=1e-5)
    for part in ("unet", "first_stage"):
        ours = load_file(out / part / "diffusion_pytorch_model.safetensors")
        theirs = load_file(reference / part / "diffusion_pytorch_model.safetensors")
        for name, tensor in theirs.items():
            torch.testing.assert_close(ours[name], tensor, rtol=1e-4, atol=1e-5)


def test_a_nan_loss_stops_in_one_line_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import pathseg.pretrain.unet_phase as unet_phase

    config = pretrain_config(tmp_path, **{"pretrain.steps": 16})
    out = tmp_path / "backbone"
    honest, calls = unet_phase.diffusion_loss, []

    def poisoned(predicted, noise, weights=None):
        calls.append(1)
        loss = honest(predicted, noise, weights)
        return loss * float("nan") if len(calls) == 6 else loss  # the UNet's 6th step, global step 14

    monkeypatch.setattr(unet_phase, "diffusion_loss", poisoned)
    with pytest.raises(PathsegError) as caught:
        run_pretraining(config, out, show_progress=False)
    message = str(caught.value)
    assert "\n" not in message and "UNet phase at step 14" in message and "(step 12) is kept" in message
    saved = load_checkpoint(work_dir_for(out) / CHECKPOINT)
    assert saved["state"]["step"] == 12 and len(saved["state"]["history"]["unet"]) == 4
    assert all(np.isfinite(saved["state"]["history"]["unet"]))
    assert all(torch.isfinite(tensor).all() for tensor in saved["unet"].values())
    assert not (out / PRETRAIN_RECORD).exists()

    monkeypatch.setattr(unet_phase, "diffusion_loss", honest)  # the cause fixed: the same command resumes
    summary = run_pretraining(config, out, show_progress=False)
    assert summary.resumed_from == 12 and len(history(out)["unet"]) == 8


def test_the_pretrained_directory_is_a_backbone_extraction_takes(pretrained, tmp_path):
    from pathseg.extract.backbone_sources import load_backbone
    from pathseg.extract.runner import run_extraction

    from pathseg.store import FeatureStore

    _, out, summary = pretrained
    backbone = load_backbone(str(out))
    assert backbone.digest == summary.record["weights_digest"]
    assert backbone.latent_shape(64) == (3, 16, 16)
    config = pretrain_config(tmp_path, **{"backbone.name": str(out), "extract.timesteps": [50],
                                          "extract.blocks": ["up1"], "extract.batch_size": 4,
                                          "extract.tiles_per_shard": 4, "dataset.synthetic.test": 0})
    extracted = run_extraction(config, show_progress=False)
    assert extracted.computed_tiles > 0
    store = FeatureStore.open(extracted.store)
    assert store.attrs["identity"]["backbone"]["weights_digest"] == summary.record["weights_digest"]
    assert store.is_complete(50, "up1")


def test_a_new_pretraining_at_the_same_path_gets_a_new_store(tmp_path):
    out = tmp_path / "backbone"
    quick = {"pretrain.steps": 4, "pretrain.samples": 0, "pretrain.reconstructions": 0, "backbone.name": str(out)}
    first = pretrain_config(tmp_path, **quick)
    run_pretraining(first, out, show_progress=False)
    first_store = store_path_for(first)
    assert run_pretraining(first, out, show_progress=False).already_done  # the same command again: nothing to do

    second = pretrain_config(tmp_path, **quick, **{"pretrain.seed": 1})
    with pytest.raises(PathsegError, match="--overwrite"):
        run_pretraining(second, out, show_progress=False)
    run_pretraining(second, out, overwrite=True, show_progress=False)
    assert store_path_for(second) != first_store
    plain = load_config(None, {"backbone.name": "tiny"})
    assert store_path_for(plain) == store_path_for(load_config(None, {}))  # other backbones keep their keys


def test_a_kl_first_stage_exports_with_its_latent_scale(tmp_path):
    from pathseg.extract.backbone_sources import load_backbone

    config = pretrain_config(tmp_path, **{"pretrain.first_stage": "kl", "pretrain.steps": 4, "pretrain.samples": 1})
    summary = run_pretraining(config, tmp_path / "kl", show_progress=False)
    backbone = load_backbone(str(tmp_path / "kl"))
    assert type(backbone.first_stage).__name__ == "AutoencoderKL"
    assert backbone.latent_scale == pytest.approx(summary.record["latent_scale"]) and backbone.latent_scale != 1.0
    tiles = build_stream(config).spread(64)
    images = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad():
        assert float(backbone.encode(images).std()) == pytest.approx(1.0, rel=1e-3)  # scale_by_std, as the LDM


class TinyEncoder(nn.Module):
    """A stand-in SSL encoder: 16-dim embeddings of 32 px inputs."""

    input_size = 32

    def __init__(self) -> None:
        super().__init__()
        self.project = nn.Linear(3, 16)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.project(images.mean(dim=(2, 3)))


def tiny_encoder(weights, trust_checkpoint=False):  # an SSL_ENCODERS factory's signature
    from pathseg.extract.ssl_encoders import SSLEncoder

    torch.manual_seed(0)
    return SSLEncoder(TinyEncoder(), input_size=32, identity="pretrain-test-tiny")


def test_ssl_conditioning_sizes_the_projector_and_dropout_gives_the_null_context(tmp_path):
    from pathseg.extract.backbone import SSLProjector
    from pathseg.extract.conditioning import Conditioning
    from pathseg.extract.ssl_encoders import SSL_ENCODERS
    from pathseg.pretrain.unet_phase import ContextMaker

    if "pretrain-test-tiny" not in SSL_ENCODERS:
        SSL_ENCODERS.register("pretrain-test-tiny")(tiny_encoder)
    encoder = {"conditioning.mode": "ssl", "conditioning.encoder": "pretrain-test-tiny"}
    summary = run_pretraining(pretrain_config(tmp_path, **encoder, **{"pretrain.steps": 4}), tmp_path / "ssl",
                              show_progress=False)
    assert summary.record["conditioning"]["mode"] == "ssl"
    projector = SSLProjector.load(tmp_path / "ssl" / "ssl_projector")
    assert projector.patch_dim == 16  # sized from the encoder's embeddings

    maker = ContextMaker(Conditioning(projector, tiny_encoder(None)), projector, dropout=1.0)
    images = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        dropped = maker(images, torch.Generator().manual_seed(0))
        torch.testing.assert_close(dropped, projector.null_context(3))  # dropout = the null context
        assert not torch.allclose(maker(images, None), dropped)


def test_slides_give_only_tissue_tiles_at_the_asked_resolution(tmp_path):
    from pathseg.pretrain.data import SlideTiles

    from tests.imaging.test_slides import he_like_slide, write_pyramid

    folder = tmp_path / "slides"
    folder.mkdir()
    rgb, _ = he_like_slide()
    write_pyramid(folder / "case.tif", rgb, mpp=0.25)
    config = pretrain_config(tmp_path, **{"pretrain.slides": str(folder), "pretrain.mpp": 1.0,
                                          "tiling.stride": 64})
    tiles = SlideTiles(config)
    assert 0 < len(tiles.image_of) < (768 // 64) * (1024 // 64)  # glass tiles left out
    batch = tiles.read(np.arange(len(tiles.image_of)))
    assert batch.shape[1:] == (64, 64, 3)
    saturation = (batch.max(-1).astype(float) - batch.min(-1)) / np.maximum(batch.max(-1), 1)
    assert (saturation > 0.2).mean(axis=(1, 2)).min() >= 0.4  # every tile mostly tissue
    assert tiles.identity()["tiles"] == len(tiles.image_of)


def _registered(monkeypatch):
    """`pathseg pretrain` as the CLI has it, registered here too until pathseg/cli.py registers it."""
    from pathseg.pretrain.cli import pretrain

    import pathseg.cli as cli

    if not any(command.name == "pretrain" for command in cli.app.registered_commands):
        commands = [*cli.app.registered_commands, typer.models.CommandInfo(name="pretrain", callback=pretrain)]
        monkeypatch.setattr(cli.app, "registered_commands", commands)


def test_the_cli_pretrains_and_refuses_a_bad_setting_in_one_line(tmp_path, monkeypatch, capsys):
    _registered(monkeypatch)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "cli backbone"
    sets = [item for key, value in pretrain_overrides(tmp_path, **{"pretrain.samples": 0}).items()
            if key.startswith(("pretrain.", "tiling.", "dataset.synthetic."))
            for item in ("--set", f"{key}={json.dumps(value)}")]
    code, _, err = run_cli(monkeypatch, capsys, "pretrain", "--dataset", "synthetic", "--preset", "tiny",
                           "--steps", "4", "--out", str(out), "--quiet", *sets)
    assert code == 0, err
    assert "wrote" in err and (out / PRETRAIN_RECORD).exists()
    assert json.loads((out / PRETRAIN_RECORD).read_text())["steps"]["total"] == 4
    code, _, err = run_cli(monkeypatch, capsys, "pretrain", "--dataset", "synthetic", "--preset", "tiny", "--steps",
                           "2", "--out", str(tmp_path / "reusing"), "--quiet", *sets,
                           "--set", f"pretrain.first_stage_from={out}")
    assert code == 0 and f"the first stage of {out}" in " ".join(err.split()), err

    code, _, err = run_cli(monkeypatch, capsys, "pretrain", "--preset", "huge", "--out", str(tmp_path / "other"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "pretrain.preset" in err, err
    code, _, err = run_cli(monkeypatch, capsys, "pretrain", "--out", str(tmp_path / "other"),
                           "--set", "pretrain.first_stage_fraction=1.5")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "first_stage_fraction" in err, err


def test_a_checkpoint_with_code_in_it_is_refused(tmp_path):
    path = tmp_path / CHECKPOINT
    torch.save({"format": 1, "payload": Path("not/a/tensor")}, path)
    with pytest.raises(PathsegError, match="not a readable pretraining checkpoint"):
        load_checkpoint(path)
