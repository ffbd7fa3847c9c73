"""The models of a pretraining, their optimisers and EMA, both phases, and what a checkpoint holds of them.

Phase 1 trains the first stage, on random crops of the tiles unless `first_stage_crop` is null; at its end it
is frozen for good. Phase 2 sees whole tiles, the latents extraction computes. The UNet and projector are built
(seeded) only when phase 2 starts, so phase 1 holds one model in memory and its checkpoints only that.
The EMA covers the UNet and the projector: the projector is trained with the UNet and exported with
it, so the context the averaged UNet sees comes from the averaged projector.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.training_utils import EMAModel
from pathseg.extract.backbone import ldm_scheduler
from pathseg.extract.conditioning import Conditioning
from pathseg.pretrain.checkpoints import RunState, restore_rng, rng_states, save_checkpoint
from pathseg.pretrain.data import BatchPart, TileStream, augment, crop_size, random_crops, to_unit_tensor
from pathseg.pretrain.distributed import ONE_PROCESS, Processes, broadcast_parameters
from pathseg.pretrain.first_stage import build_first_stage, first_stage_loss, set_latent_scale
from pathseg.pretrain.loop import Phase, step_generator, train_phase
from pathseg.pretrain.reused_first_stage import ReusedFirstStage
from pathseg.pretrain.schedule import lr_factor
from pathseg.pretrain.unet_phase import ContextMaker, build_unet, latent_encoder, latent_std, unet_loss
from torch import nn

from pathseg.config import PipelineConfig

LATENT_SCALE_TILES = 64  # tiles whose z_0 std sets a KL first stage's scaling factor


class Trainer:
    def __init__(self, config: PipelineConfig, configs: dict, device: torch.device,
                 autocast: Callable[[], AbstractContextManager], stream: TileStream, conditioning: Conditioning,
                 checkpoint: Path, identity: dict, identity_key: str, phase_steps: tuple[int, int],
                 processes: Processes = ONE_PROCESS, reused: ReusedFirstStage | None = None) -> None:
        self.config = config
        self.processes = processes
        self.settings = config.pretrain
        self.configs = configs
        self.device = device
        self.autocast = autocast
        self.stream = stream
        self.conditioning = conditioning.to(device)
        self.checkpoint = checkpoint
        self.identity = identity
        self.identity_key = identity_key  # the resume key: what a checkpoint must share to be resumed
        self.first_steps, self.unet_steps = phase_steps
        self.state = RunState()
        self.precision = "float32"  # what autocast computes in; set by the command, recorded
        self.scheduler = ldm_scheduler()
        s = self.settings
        self.first_stage_crop = crop_size(s.first_stage_crop, config.tiling.tile_size)  # None: whole tiles
        self.reused = reused  # a first stage from another backbone: no phase 1, its own latent scale kept
        first_stage = reused.model if reused else build_first_stage(configs["first_stage_class"],
                                                                    configs["first_stage"], s.seed)
        self.first_stage = first_stage.to(device)
        broadcast_parameters([self.first_stage], processes)
        self.first_stage_optimizer: torch.optim.Optimizer | None = None if reused else torch.optim.AdamW(
            self.first_stage.parameters(), lr=s.lr_first_stage, weight_decay=s.weight_decay
        )
        self.unet = None
        self.projector = None
        self.unet_optimizer: torch.optim.Optimizer | None = None
        self.ema: EMAModel | None = None
        self.context: ContextMaker | None = None

    @property
    def total_steps(self) -> int:
        return self.first_steps + self.unet_steps

    def _hyperparameters(self, base_lr: float, phase_start: int) -> Callable[[int], dict[str, float]]:
        """Global step -> lr and weight decay, set before every step: the schedule (warm-up, decay) counts steps
        of its own phase, and the values are today's settings, so a resume that changes them (a `RECOVERY`
        change) takes effect rather than what the checkpointed optimiser carried."""
        s = self.settings
        return lambda step: {"lr": base_lr * lr_factor(step - phase_start, s.warmup_steps, s.lr_decay_after),
                             "weight_decay": s.weight_decay}

    # ---- phase 1 -----------------------------------------------------------------------------------

    def _augmented(self, step: int, tiles: np.ndarray, part: BatchPart) -> tuple[torch.Tensor, torch.Generator]:
        generator = step_generator(self.settings.seed, step)
        images = augment(to_unit_tensor(tiles, self.device), generator, self.settings.flips,
                         self.settings.colour_jitter, part)
        return images, generator

    def crops_at(self, step: int) -> bool:
        """False on the `first_stage_whole_fraction` of phase-1 steps that see whole tiles, evenly spaced (the
        step's crop draws are then skipped, so a fraction of 0 cuts exactly the crops it always did)."""
        fraction = self.settings.first_stage_whole_fraction
        return math.floor((step + 1) * fraction) == math.floor(step * fraction)

    def _first_stage_loss(self, step: int, tiles: np.ndarray,
                          part: BatchPart) -> tuple[torch.Tensor, dict[str, float]]:
        """On a random crop of each augmented tile (`pretrain.first_stage_crop`), drawn from the step's generator."""
        images, generator = self._augmented(step, tiles, part)
        images = random_crops(images, self.first_stage_crop if self.crops_at(step) else None, generator, part)
        with self.autocast():
            return first_stage_loss(self.first_stage, images * 2.0 - 1.0, self.settings, generator, part)

    def train_first_stage(self, show_progress: bool) -> None:
        if self.state.step < self.first_steps:
            self.first_stage.train().requires_grad_(True)
            phase = Phase("first_stage", self.first_steps, self._first_stage_loss,
                          list(self.first_stage.parameters()), self.first_stage_optimizer,
                          hyperparameters=self._hyperparameters(self.settings.lr_first_stage, 0),
                          accumulation=self.settings.accumulation)
            train_phase(phase, self.state, self.stream, self.settings.checkpoint_every, self.save, self.checkpoint,
                        show_progress, self.processes)
        self.freeze_first_stage()

    def freeze_first_stage(self) -> None:
        """Frozen for good; a KL first stage gets its scaling factor from the data (deterministic, so a resumed
        run computes the same one)."""
        self.first_stage.eval().requires_grad_(False)
        self.first_stage_optimizer = None
        if self.reused is not None:
            self.state.latent_scale = float(self.first_stage.config.get("scaling_factor", 1.0))
        elif self.configs["first_stage_class"] == "AutoencoderKL":
            set_latent_scale(self.first_stage, 1.0)
            encoder = latent_encoder(self.first_stage, None, self.scheduler, None)
            tiles = self.stream.spread(LATENT_SCALE_TILES)
            batches = [to_unit_tensor(tiles[i : i + self.settings.batch_size], self.device)
                       for i in range(0, len(tiles), self.settings.batch_size)]
            with self.autocast():
                std = latent_std(encoder, batches)
            self.state.latent_scale = 1.0 / max(std, 1e-6)
            set_latent_scale(self.first_stage, self.state.latent_scale)

    # ---- phase 2 -----------------------------------------------------------------------------------

    def ensure_unet(self) -> None:
        if self.unet is not None:
            return
        s = self.settings
        unet, projector = build_unet(self.configs["unet"], self.configs["projector"], s.seed)
        self.unet, self.projector = unet.to(self.device), projector.to(self.device)
        broadcast_parameters([self.unet, self.projector], self.processes)
        self.unet_optimizer = torch.optim.AdamW(self.trained_parameters(), lr=s.lr_unet, weight_decay=s.weight_decay)
        if self.processes.main:  # the average is kept, saved and exported once
            self.ema = EMAModel(self.trained_parameters(), decay=s.ema_decay, foreach=True)
        self.context = ContextMaker(self.conditioning, self.projector, s.condition_dropout)
        self.encoder = latent_encoder(self.first_stage, self.unet, self.scheduler, self.projector)

    def trained_parameters(self) -> list[nn.Parameter]:
        return [*self.unet.parameters(), *self.projector.parameters()]

    def _unet_loss(self, step: int, tiles: np.ndarray, part: BatchPart) -> torch.Tensor:
        images, generator = self._augmented(step, tiles, part)
        return unet_loss(self.unet, self.encoder, self.scheduler, self.context, images, generator, self.autocast,
                         part, self.settings.min_snr_gamma)

    def train_unet(self, show_progress: bool) -> None:
        self.ensure_unet()
        self.unet.train()
        self.projector.train()
        average = (lambda: self.ema.step(self.trained_parameters())) if self.ema is not None else None
        phase = Phase("unet", self.total_steps, self._unet_loss, self.trained_parameters(), self.unet_optimizer,
                      after_step=average,
                      hyperparameters=self._hyperparameters(self.settings.lr_unet, self.first_steps),
                      accumulation=self.settings.accumulation)
        train_phase(phase, self.state, self.stream, self.settings.checkpoint_every, self.save, self.checkpoint,
                    show_progress, self.processes)

    def use_ema_weights(self) -> None:
        """The averaged weights into the UNet and projector: what is exported and sampled from."""
        self.ema.copy_to(self.trained_parameters())
        self.unet.eval()
        self.projector.eval()

    # ---- checkpoints -------------------------------------------------------------------------------

    def content(self) -> dict[str, Any]:
        content: dict[str, Any] = {
            "identity_key": self.identity_key,
            "identity": self.identity,
            "state": self.state.as_dict(),
            "processes": self.processes.world,
            "rng": rng_states(),
            "first_stage": self.first_stage.state_dict(),
        }
        if self.first_stage_optimizer is not None and self.state.step < self.first_steps:
            content["first_stage_optimizer"] = self.first_stage_optimizer.state_dict()
        if self.unet is not None:
            content["unet"] = self.unet.state_dict()
            content["projector"] = self.projector.state_dict()
            content["unet_optimizer"] = self.unet_optimizer.state_dict()
            content["ema"] = self.ema.state_dict()
        return content

    def save(self) -> None:
        """Rank 0 only: every process holds the same weights and optimiser state."""
        if self.processes.main:
            save_checkpoint(self.checkpoint, self.content())

    def restore(self, saved: dict[str, Any]) -> None:
        """Weights, optimiser and EMA states, RNG and history of a checkpoint, so training continues from it."""
        self.state = RunState.from_dict(saved["state"])
        self.state.resumed_from.append(self.state.step)
        self.first_stage.load_state_dict(saved["first_stage"])
        if "first_stage_optimizer" in saved:
            self.first_stage_optimizer.load_state_dict(saved["first_stage_optimizer"])
        if "unet" in saved:
            self.freeze_first_stage()
            self.ensure_unet()
            self.unet.load_state_dict(saved["unet"])
            self.projector.load_state_dict(saved["projector"])
            self.unet_optimizer.load_state_dict(saved["unet_optimizer"])
            if self.ema is not None:
                self.ema.load_state_dict(saved["ema"])
                self.ema.to(self.device)
        restore_rng(saved["rng"])
        before = int(saved.get("processes", 1))
        if before != self.processes.world:  # the global batch is the same, so this changes no result
            self.state.changes.append({"step": self.state.step, "processes": [before, self.processes.world]})
