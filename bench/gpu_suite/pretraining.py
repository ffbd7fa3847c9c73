"""Pretraining steps/s of the tiny, small and paper presets at bf16, with peak GPU memory.

Each preset trains through pathseg's own `Trainer` (both phases, EMA, conditioning, the tile stream), set up
exactly as `pathseg pretrain` sets it up, for a few steps per phase. The only differences: checkpoints are
not written (a paper checkpoint is gigabytes of disk time that is not a training step), and each step's
loss call records a synchronised time, so the first step of each phase (allocation, kernel selection) is
left out of its rate, and the phase stops once the preset's time is up.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from gpu_suite.measure import Clock, GpuMemory, LimitReached, synchronize
from gpu_suite.report import Part
from gpu_suite.workspace import Workspace

WEIGHTS = {"tiny": 1.0, "small": 1.5, "paper": 3.0}  # shares of the part's time
PHASES = {"first_stage": "first-stage", "unet": "UNet"}


def measure_pretraining(ws: Workspace, clock: Clock, part: Part) -> None:
    ws.write_data()
    presets = ws.plan.pretrain_presets
    for index, preset in enumerate(presets):
        remaining = sum(WEIGHTS[p] for p in presets[index:])
        preset_clock = clock.share(WEIGHTS[preset] / remaining)
        if preset_clock.left() < 1.0:
            part.stop(f"stopped at limit before the {preset} preset ({', '.join(presets[index:])} not run)")
            break
        try:
            train_preset(ws, preset, preset_clock, part)
        except torch.cuda.OutOfMemoryError:
            part.add(f"{preset}: peak GPU memory", None, "GiB", "out of GPU memory at the plan's batch size")
            part.stop(f"failed: {preset} ran out of GPU memory")
            torch.cuda.empty_cache()
    skipped = [p for p in ("tiny", "small", "paper") if p not in presets]
    if skipped:
        part.details["not_run"] = f"{', '.join(skipped)}: quick mode runs tiny only"


def train_preset(ws: Workspace, preset: str, clock: Clock, part: Part) -> None:
    from pathseg.pretrain.command import autocast_factory, training_device, training_precision
    from pathseg.pretrain.data import build_stream
    from pathseg.pretrain.identity import resume_key, run_identity
    from pathseg.pretrain.presets import model_configs, phase_steps
    from pathseg.pretrain.trainer import Trainer
    from pathseg.pretrain.unet_phase import ssl_conditioning

    plan = ws.plan
    first, unet = plan.pretrain_steps
    device = ws.device
    overrides = {"pretrain.preset": preset, "pretrain.steps": first + unet, "pretrain.first_stage_steps": first,
                 "pretrain.autocast": "bfloat16" if device.type == "cuda" else "off",
                 "tiling.tile_size": plan.pretrain_tile, "tiling.stride": plan.pretrain_tile,
                 **plan.pretrain_overrides}
    config = ws.config(overrides)
    settings = config.pretrain
    device = training_device(settings.device)
    precision = training_precision(device, settings.autocast)
    times: dict[str, list[float]] = {"first_stage": [], "unet": []}

    class TimedTrainer(Trainer):
        """The command's Trainer, writing no checkpoints and timing each step's start (see the module doc)."""

        def save(self) -> None:
            pass

        def _tick(self, phase: str) -> None:
            synchronize(device)
            times[phase].append(time.perf_counter())
            if clocks[phase].expired() and len(times[phase]) > 2:
                raise LimitReached(phase)

        def _first_stage_loss(self, *args: Any) -> Any:
            self._tick("first_stage")
            return super()._first_stage_loss(*args)

        def _unet_loss(self, *args: Any) -> Any:
            self._tick("unet")
            return super()._unet_loss(*args)

    ends: dict[str, float] = {}
    clocks = {"first_stage": clock, "unet": clock}
    stopped: list[str] = []
    with GpuMemory(device) as memory:
        configs = model_configs(settings)
        stream = build_stream(config)
        conditioning, configs["projector"] = ssl_conditioning(config.conditioning, configs["projector"],
                                                              config.tiling.tile_size)
        identity = run_identity(config, configs, stream.reader.identity())
        torch.manual_seed(settings.seed)
        trainer = TimedTrainer(config, configs, device, autocast_factory(device, precision), stream, conditioning,
                               ws.root / f"pretrain-{preset}.ckpt", identity, resume_key(identity),
                               phase_steps(settings))
        trainer.precision = precision
        clocks["first_stage"] = clock.share(0.4)  # phase 1 stops early enough to leave the UNet its steps
        for phase, train in (("first_stage", trainer.train_first_stage), ("unet", trainer.train_unet)):
            try:
                train(False)
                synchronize(device)
                ends[phase] = time.perf_counter()
            except LimitReached:
                stopped.append(phase)
                ends[phase] = times[phase].pop()  # the step that noticed the limit did not run
                if phase == "first_stage":
                    trainer.freeze_first_stage()  # as the phase's end would have
        del trainer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    shape = (f"batch {settings.batch_size}, {plan.pretrain_tile} px tiles, first-stage crop "
             f"{settings.first_stage_crop}, {precision}")
    if plan.pretrain_overrides.get("pretrain.unet_width"):
        shape += f", narrowed to unet_width {settings.unet_width}, first_stage_width {settings.first_stage_width}"
    part.details[preset] = {"steps_started": {k: len(v) for k, v in times.items()}, "setting": shape,
                            "stopped_in": stopped}
    for phase, label in PHASES.items():
        starts = times[phase]
        rate, note = None, "not reached" if phase not in ends else ""
        if phase in ends and len(starts) >= 2:
            rate = (len(starts) - 1) / (ends[phase] - starts[1])
            note = f"steps 2 to {len(starts)}" if len(starts) > 2 else "step 2"
        elif phase in ends and starts:
            rate = len(starts) / (ends[phase] - starts[0])
            note = "one step, incl. its warm-up"
        part.add(f"{preset}: {label} phase", rate, "steps/s", f"{note}; {shape}")
    part.add(f"{preset}: peak GPU memory", memory.peak_gib, "GiB",
             "both phases, models, optimisers and EMA" if device.type == "cuda" else "CPU: no GPU memory")
    if stopped:
        part.stop(f"stopped at limit in {preset} after {len(times['first_stage'])} first-stage and "
                  f"{len(times['unet'])} UNet steps")
