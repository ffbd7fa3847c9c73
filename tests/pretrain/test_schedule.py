"""The small-budget schedule (warm-up, EDM2 decay, min-SNR-gamma, accumulation): each does what its paper says,
stays step-local so a finished run still extends exactly, and older runs without these settings still extend."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from pathseg.extract.backbone import ldm_scheduler
from pathseg.pretrain.checkpoints import CHECKPOINT, RunState, load_checkpoint
from pathseg.pretrain.command import run_pretraining, work_dir_for
from pathseg.pretrain.loop import Phase, train_phase
from pathseg.pretrain.schedule import lr_factor, min_snr_weights
from pathseg.pretrain.unet_phase import diffusion_loss
from safetensors.torch import load_file
from torch import nn

from pathseg.errors import PathsegError
from tests.pretrain.test_pretraining import history, pretrain_config, run_until_checkpoint

SCHEDULED = {"pretrain.warmup_steps": 3, "pretrain.lr_decay_after": 4, "pretrain.min_snr_gamma": 5.0,
             "pretrain.accumulation": 2, "pretrain.first_stage_steps": 8}


def test_warm_up_is_linear_and_the_decay_is_edm2s_inverse_square_root():
    assert [lr_factor(k, 4, None) for k in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_factor(10, 0, None) == 1.0
    assert lr_factor(100, 0, 100) == 1.0
    assert lr_factor(400, 0, 100) == pytest.approx(0.5)
    assert lr_factor(0, 2, 100) == 0.5  # warm-up and decay compose


def test_min_snr_weights_cap_the_low_noise_timesteps_and_leave_the_noisy_ones():
    scheduler = ldm_scheduler()
    timesteps = torch.tensor([0, 10, 100, 500, 999])
    alphas = scheduler.alphas_cumprod[timesteps]
    snr = alphas / (1 - alphas)
    weights = min_snr_weights(scheduler, timesteps, 5.0)
    torch.testing.assert_close(weights, torch.clamp(snr, max=5.0) / snr)
    assert weights[0] < 0.01 and weights[-1] == 1.0  # t=0 has SNR in the hundreds; t=999 under 1

    predicted, noise = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)
    per_sample = ((predicted - noise) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(diffusion_loss(predicted, noise, weights), (per_sample * weights).mean())
    torch.testing.assert_close(diffusion_loss(predicted, noise, torch.ones(5)), diffusion_loss(predicted, noise))
    assert isinstance(scheduler, DDPMScheduler)


class ToyStream:
    """Batch index -> a fixed batch of 2 rows, so two accumulated batches can be set against one of 4."""

    def __init__(self, rows: np.ndarray, batch_size: int) -> None:
        self.rows, self.batch_size = rows, batch_size

    def batch(self, index: int, part=None) -> np.ndarray:
        return self.rows[index * self.batch_size : (index + 1) * self.batch_size]


def toy_run(rows: np.ndarray, batch_size: int, accumulation: int, steps: int, tmp_path: Path,
            lr=None) -> tuple[nn.Linear, list[float]]:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    rates: list[float] = []

    def loss(index, tiles, part):
        x = torch.as_tensor(tiles, dtype=torch.float32)
        return ((model(x[:, :3]).squeeze(1) - x[:, 3]) ** 2).mean()

    hyperparameters = None if lr is None else (lambda step: {"lr": lr(step)})
    phase = Phase("first_stage", steps, loss, list(model.parameters()), optimizer, hyperparameters=hyperparameters,
                  accumulation=accumulation,
                  after_step=lambda: rates.append(optimizer.param_groups[0]["lr"]))
    train_phase(phase, RunState(), ToyStream(rows, batch_size), 100, lambda: None, tmp_path / "none.pt", False)
    return model, rates


def test_two_accumulated_batches_take_the_step_of_one_batch_twice_their_size(tmp_path):
    rows = np.random.default_rng(0).normal(size=(24, 4)).astype(np.float32)
    accumulated, _ = toy_run(rows, 2, 2, 6, tmp_path)
    whole, _ = toy_run(rows, 4, 1, 6, tmp_path)
    one_batch, _ = toy_run(rows, 2, 1, 6, tmp_path)
    torch.testing.assert_close(accumulated.weight, whole.weight)
    torch.testing.assert_close(accumulated.bias, whole.bias)
    assert not torch.allclose(one_batch.weight, whole.weight)  # the comparison can fail


def test_the_learning_rate_is_set_from_the_schedule_before_every_step(tmp_path):
    rows = np.zeros((40, 4), dtype=np.float32)
    _, rates = toy_run(rows, 2, 1, 5, tmp_path, lr=lambda step: 0.1 * lr_factor(step, 4, None))
    assert rates == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1])


def weights_of(out: Path, part: str) -> dict[str, torch.Tensor]:
    return load_file(out / part / "diffusion_pytorch_model.safetensors")


def test_a_scheduled_run_extends_to_more_steps_exactly_as_a_run_that_long(tmp_path):
    """Warm-up, EDM2 decay, min-SNR and accumulation count only steps done, so 12 then 16 steps are 16 steps."""
    reference = run_pretraining(pretrain_config(tmp_path, **{"pretrain.steps": 16}, **SCHEDULED),
                                tmp_path / "reference", show_progress=False)
    out = tmp_path / "extended"
    run_pretraining(pretrain_config(tmp_path, **{"pretrain.steps": 12}, **SCHEDULED), out, show_progress=False)
    extended = run_pretraining(pretrain_config(tmp_path, **{"pretrain.steps": 16}, **SCHEDULED), out,
                               show_progress=False)
    assert extended.resumed_from == 12
    assert extended.record["weights_digest"] == reference.record["weights_digest"]
    np.testing.assert_allclose(history(out)["unet"], history(tmp_path / "reference")["unet"], rtol=1e-6)
    settings = reference.record["identity"]["settings"]
    assert {k: settings[k] for k in ("warmup_steps", "lr_decay_after", "min_snr_gamma", "accumulation")} == {
        "warmup_steps": 3, "lr_decay_after": 4, "min_snr_gamma": 5.0, "accumulation": 2}


def test_a_resume_that_changes_lr_or_weight_decay_trains_with_the_new_values(tmp_path, monkeypatch):
    """The optimiser's saved state carries the old values; today's are set before every step."""
    out = tmp_path / "backbone"
    run_until_checkpoint(monkeypatch, pretrain_config(tmp_path), out, 16)
    summary = run_pretraining(pretrain_config(tmp_path, **{"pretrain.lr_unet": 0.0002, "pretrain.weight_decay": 0.01}),
                              out, show_progress=False)
    assert summary.resumed_from == 16
    groups = load_checkpoint(work_dir_for(out) / CHECKPOINT)["unet_optimizer"]["param_groups"]
    assert [(group["lr"], group["weight_decay"]) for group in groups] == [(0.0002, 0.01)]


def test_a_first_stage_from_another_backbone_is_reused_frozen_and_keyed_by_its_weights(tmp_path):
    """No phase 1: every step trains the UNet on the other backbone's first stage, which is exported unchanged;
    moving that directory changes nothing, other first-stage weights are another run."""
    source = tmp_path / "source"
    run_pretraining(pretrain_config(tmp_path, **{"pretrain.steps": 6, "pretrain.first_stage_steps": 4,
                                                 "pretrain.samples": 0}), source, show_progress=False)
    settings = {"pretrain.steps": 4, "pretrain.first_stage_from": str(source), "pretrain.samples": 0,
                "pretrain.min_snr_gamma": 5.0}
    out = tmp_path / "reusing"
    summary = run_pretraining(pretrain_config(tmp_path, **settings), out, show_progress=False)
    assert summary.record["steps"] == {"total": 4, "first_stage": 0, "unet": 4}
    assert len(history(out)["unet"]) == 4 and history(out)["first_stage"] == []
    assert weights_of(out, "first_stage").keys() == weights_of(source, "first_stage").keys()
    for name, tensor in weights_of(source, "first_stage").items():
        assert torch.equal(weights_of(out, "first_stage")[name], tensor)
    origin = summary.record["first_stage_from"]
    assert origin["path"] == str(source.resolve()) and origin["seconds"] > 0

    moved = tmp_path / "moved"
    shutil.move(source, moved)
    again = run_pretraining(pretrain_config(tmp_path, **{**settings, "pretrain.first_stage_from": str(moved)}), out,
                            show_progress=False)
    assert again.already_done

    with pytest.raises(PathsegError, match="has no first_stage/"):
        run_pretraining(pretrain_config(tmp_path, **{**settings, "pretrain.first_stage_from": str(tmp_path)}),
                        tmp_path / "none", show_progress=False)
    other = tmp_path / "other"
    run_pretraining(pretrain_config(tmp_path, **{"pretrain.steps": 6, "pretrain.first_stage_steps": 4,
                                                 "pretrain.samples": 0, "pretrain.seed": 1}), other,
                    show_progress=False)
    with pytest.raises(PathsegError, match="first_stage_from"):
        run_pretraining(pretrain_config(tmp_path, **{**settings, "pretrain.first_stage_from": str(other)}), out,
                        show_progress=False)
