"""One phase's optimiser steps: read ahead, step, check, record, checkpoint. Shared by both phases.

Every batch draws its randomness (augmentation, noise, timesteps, condition dropout) from a generator
seeded by (seed, batch index), and its tiles from the stream's (seed, batch index) order, so a resumed run
repeats exactly what the killed one would have done. With `pretrain.accumulation` A, optimiser step k
averages the gradients of batches kA .. kA + A - 1, so A = 1 is exactly the run without accumulation.
A loss or gradient that is not finite stops the run before the optimiser touches the weights, and the last
checkpoint, written before it, stays as it was.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pathseg.pretrain.checkpoints import RunState
from pathseg.pretrain.data import BatchPart, TileStream
from pathseg.pretrain.distributed import ONE_PROCESS, Processes, average_gradients, mean_over_processes
from torch import nn

from pathseg.errors import PathsegError
from pathseg.progress import progress_bar

PHASE_NAMES = {"first_stage": "first-stage", "unet": "UNet"}
LR_SETTINGS = {"first_stage": "pretrain.lr_first_stage", "unet": "pretrain.lr_unet"}


def step_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator for one step, from (seed, step) alone."""
    material = hashlib.sha256(f"pretrain:{seed}:{step}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(material[:8], "little") & ((1 << 63) - 1))


@dataclass
class Phase:
    name: str  # first_stage | unet
    stop: int  # the global step count this phase ends at
    # (global step, uint8 tiles, their part of the global batch) -> scalar loss, or (loss, {term: value}) to log
    # its terms as well
    loss: Callable[[int, np.ndarray, BatchPart], torch.Tensor | tuple[torch.Tensor, dict[str, float]]]
    parameters: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    after_step: Callable[[], None] | None = None  # the EMA update
    # global step -> optimiser settings (lr, weight_decay) set before every step: the schedule, and today's values
    # rather than those a resumed optimiser state carried
    hyperparameters: Callable[[int], dict[str, float]] | None = None
    accumulation: int = 1  # batches per optimiser step


def _stop(phase: Phase, step: int, what: str, value: float, checkpoint: Path, checkpoint_step: int | None) -> None:
    kept = (f"the last good checkpoint {checkpoint} (step {checkpoint_step}) is kept" if checkpoint_step is not None
            else "no checkpoint was written yet")
    raise PathsegError(
        f"pretraining stopped in the {PHASE_NAMES[phase.name]} phase at step {step}: the {what} is {value}; {kept}; "
        f"lower {LR_SETTINGS[phase.name]} (or set pretrain.autocast=off) and rerun the same command to resume"
    )


def train_phase(phase: Phase, state: RunState, stream: TileStream, checkpoint_every: int,
                save: Callable[[], None], checkpoint: Path, show_progress: bool,
                processes: Processes = ONE_PROCESS) -> None:
    """Steps state.step .. phase.stop - 1; a checkpoint every `checkpoint_every` steps and at the phase's end.

    Under torchrun each process reads and computes its part of every batch; the losses logged and checked are
    the means over processes and the gradients are averaged, so every process takes the same step.
    """
    part = processes.part(stream.batch_size)
    start = state.step
    if start >= phase.stop:
        return
    last_saved = state.step if state.step > 0 and checkpoint.exists() else None
    total = phase.stop - start
    per_step = phase.accumulation
    with (
        progress_bar(PHASE_NAMES[phase.name], total, "steps", show_progress and processes.main) as advance,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="pathseg-pretrain-read") as reader,
    ):
        batches = range(start * per_step, phase.stop * per_step)
        upcoming = reader.submit(stream.batch, batches[0], part)
        started = time.perf_counter()
        for step in range(start, phase.stop):
            phase.optimizer.zero_grad(set_to_none=True)
            values: list[list[float]] = []  # per batch: the loss, then its terms
            names: list[str] = []
            for index in range(step * per_step, (step + 1) * per_step):
                tiles = upcoming.result()
                if index + 1 < batches.stop:
                    upcoming = reader.submit(stream.batch, index + 1, part)
                loss = phase.loss(index, tiles, part)
                loss, parts = loss if isinstance(loss, tuple) else (loss, {})
                value, *term_values = mean_over_processes([float(loss.detach()), *parts.values()], processes)
                if not math.isfinite(value):
                    _stop(phase, step + 1, "loss", value, checkpoint, last_saved)
                (loss / per_step if per_step > 1 else loss).backward()
                values.append([value, *term_values])
                names = list(parts)
            value, *term_values = np.mean(values, axis=0).tolist()
            parts = dict(zip(names, term_values, strict=True))
            average_gradients(phase.parameters, processes)
            norm = float(torch.nn.utils.clip_grad_norm_(phase.parameters, float("inf")))
            if not math.isfinite(norm):
                _stop(phase, step + 1, "gradient norm", norm, checkpoint, last_saved)
            if phase.hyperparameters is not None:
                for group in phase.optimizer.param_groups:
                    group.update(phase.hyperparameters(step))
            phase.optimizer.step()
            if phase.after_step is not None:
                phase.after_step()
            state.step = step + 1
            state.history[phase.name].append(value)
            for term, term_value in parts.items():  # "first_stage/reconstruction": only the steps that logged it
                state.history.setdefault(f"{phase.name}/{term}", []).append(term_value)
            advance(1)
            if state.step % checkpoint_every == 0 or state.step == phase.stop:
                state.seconds[phase.name] += time.perf_counter() - started
                save()
                last_saved = state.step
                started = time.perf_counter()
