"""`pathseg pretrain`: settings and data -> both phases (resuming from a checkpoint) -> backbone directory.

What may be resumed is decided by the run's identity: model shapes, data, tiling, conditioning, seed,
the first stage's step count and training crop (they change what phase 1 trains on). Learning rates,
loss weights, batch size, device and checkpoint interval are not in it, so a run stopped by a NaN can
resume from its last good checkpoint with a lower learning rate. Nor is the total step count: the
learning rates are constant, so the first k steps of a run do not depend on how many follow, and a
finished run (its checkpoint is kept beside `--out`) is extended by rerunning it with a larger `--steps`.
"""

from __future__ import annotations

import json
import shutil
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pathseg.extract.precision import pick_device
from pathseg.extract.runner import conditioning_fingerprint
from pathseg.pretrain.checkpoints import CHECKPOINT, load_checkpoint, remove_stale_temporaries
from pathseg.pretrain.data import build_stream, crop_size
from pathseg.pretrain.presets import model_configs, phase_steps
from pathseg.pretrain.unet_phase import ssl_conditioning

from pathseg.config import PipelineConfig
from pathseg.errors import PathsegError
from pathseg.locking import store_lock
from pathseg.progress import say
from pathseg.store import PRETRAIN_RECORD, canonical_json, digest

WORK_SUFFIX = ".pretraining"


@dataclass
class PretrainSummary:
    out: Path
    already_done: bool = False
    record: dict[str, Any] = field(default_factory=dict)
    resumed_from: int | None = None


def work_dir_for(out: Path) -> Path:
    """Checkpoints and the export being written live beside `out`, never inside it."""
    out = Path(out)
    return out.with_name(out.name + WORK_SUFFIX)


def training_device(name: str) -> torch.device:
    return pick_device(name, "pretrain.device")


def training_precision(device: torch.device, setting: str) -> str:
    """bfloat16 autocast on CUDA GPUs that have it; float32 on CPU and older GPUs."""
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if setting == "bfloat16" and not bf16:
        raise PathsegError(
            f"pretrain.autocast is 'bfloat16' but {device} has no bfloat16 training support; set pretrain.autocast "
            "to auto or off"
        )
    return "bfloat16" if setting != "off" and bf16 else "float32"


def autocast_factory(device: torch.device, precision: str):
    if precision == "bfloat16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext


def run_identity(config: PipelineConfig, configs: dict, data: dict) -> dict:
    """What a checkpoint must share with this run to be resumed by it (JSON-plain, for the checkpoint)."""
    s = config.pretrain
    identity = {
        "models": configs,
        "data": data,
        "tiling": config.tiling.model_dump(mode="json"),
        "conditioning": conditioning_fingerprint(config),
        "seed": s.seed,
        "first_stage_steps": phase_steps(s)[0],
        "first_stage_crop": crop_size(s.first_stage_crop, config.tiling.tile_size),  # None: whole tiles
    }
    return json.loads(canonical_json(identity))


def legacy_identity(identity: dict) -> dict:
    """A checkpoint written before the identity held `first_stage_steps` (it held `steps` and
    `first_stage_fraction`) in today's form, so such runs still resume and extend."""
    if "first_stage_steps" in identity or "steps" not in identity or "first_stage_fraction" not in identity:
        return identity
    legacy = {k: v for k, v in identity.items() if k not in ("steps", "first_stage_fraction")}
    steps = int(identity["steps"])
    legacy["first_stage_steps"] = min(max(1, round(steps * float(identity["first_stage_fraction"]))), steps - 1)
    return legacy


def finished_backbone(out: Path, key: str, steps: int, checkpoint: Path, overwrite: bool) -> bool:
    """True when `out` already holds this very pretraining; refuses to replace another one unless told to.

    --overwrite replaces only what was made with other settings: the same command, flag included, run
    again after a kill resumes, and run again after it finished does nothing. The same run with a larger
    `--steps` extends it from its kept checkpoint and replaces `out` when done.
    """
    record = out / PRETRAIN_RECORD
    if record.is_file():
        try:
            recorded = json.loads(record.read_text())
            recorded_key, recorded_steps = recorded.get("settings_key"), int(recorded["steps"]["total"])
        except (OSError, ValueError, AttributeError, KeyError, TypeError):
            recorded_key, recorded_steps = None, None
        if recorded_key == key and recorded_steps == steps:
            return True
        if recorded_key == key and not overwrite:
            if recorded_steps is not None and recorded_steps > steps:
                raise PathsegError(
                    f"{out} was pretrained for {recorded_steps} steps and a run cannot be shortened; use --steps "
                    f"{recorded_steps} or more, or choose another --out"
                )
            if not checkpoint.is_file():
                raise PathsegError(
                    f"cannot extend {out} to {steps} steps: its checkpoint {checkpoint} is gone; rerun with "
                    "--overwrite to pretrain afresh, or choose another --out"
                )
            return False
        if overwrite:
            return False
        raise PathsegError(
            f"{out} holds a backbone pretrained with other settings or data; rerun with --overwrite to replace it, "
            "or choose another --out"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PathsegError(
            f"{out} exists and is not a pretrained backbone (it has no {PRETRAIN_RECORD}); choose another --out"
        )
    return False


def resume_point(checkpoint: Path, identity: dict, key: str, overwrite: bool) -> dict | None:
    if not checkpoint.exists():
        return None
    try:
        saved = load_checkpoint(checkpoint)
    except PathsegError:
        if not overwrite:
            raise
        saved = {}
    if saved.get("identity_key") != key and digest(legacy_identity(saved.get("identity", {}))) == key:
        saved["identity"], saved["identity_key"] = identity, key
    if saved.get("identity_key") != key and overwrite:
        checkpoint.unlink()
        return None
    if saved.get("identity_key") != key:
        theirs = saved.get("identity", {})
        differ = sorted(k for k in identity.keys() | theirs.keys() if theirs.get(k) != identity.get(k)) or ["settings"]
        raise PathsegError(
            f"{checkpoint} belongs to a pretraining with other {', '.join(differ)}; rerun the command that made it "
            "to resume it, or add --overwrite to start afresh"
        )
    return saved


def run_pretraining(config: PipelineConfig, out: Path, *, overwrite: bool = False,
                    show_progress: bool = True) -> PretrainSummary:
    """Train (or resume, or find done) the pretraining the config describes, into the backbone directory `out`."""
    out = Path(out)
    with store_lock(out, wait=False):
        return _run_locked(config, out, overwrite, show_progress)


def _run_locked(config: PipelineConfig, out: Path, overwrite: bool, show_progress: bool) -> PretrainSummary:
    from pathseg.pretrain.export import export_backbone
    from pathseg.pretrain.trainer import Trainer

    settings = config.pretrain
    steps = phase_steps(settings)
    device = training_device(settings.device)
    precision = training_precision(device, settings.autocast)
    configs = model_configs(settings)
    stream = build_stream(config)
    conditioning, configs["projector"] = ssl_conditioning(config.conditioning, configs["projector"],
                                                          config.tiling.tile_size)
    identity = run_identity(config, configs, stream.reader.identity())
    key = digest(identity)
    work = work_dir_for(out)
    checkpoint = work / CHECKPOINT
    if finished_backbone(out, key, settings.steps, checkpoint, overwrite):
        record = json.loads((out / PRETRAIN_RECORD).read_text())
        return PretrainSummary(out, already_done=True, record=record)

    work.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(work)
    saved = resume_point(checkpoint, identity, key, overwrite)
    if saved is not None and int(saved["state"]["step"]) > settings.steps:
        raise PathsegError(
            f"{checkpoint} is at step {saved['state']['step']}, past --steps {settings.steps}; a run cannot be "
            "shortened: use a larger --steps, or --overwrite to start afresh"
        )
    torch.manual_seed(settings.seed)
    trainer = Trainer(config, configs, device, autocast_factory(device, precision), stream, conditioning,
                      checkpoint, identity, key, steps)
    trainer.precision = precision
    summary = PretrainSummary(out)
    if saved is not None:
        trainer.restore(saved)
        summary.resumed_from = trainer.state.step
        if show_progress:
            say(f"resuming from {checkpoint} at step {trainer.state.step} of {trainer.total_steps}")
    trainer.train_first_stage(show_progress)
    trainer.train_unet(show_progress)
    summary.record = export_backbone(trainer, out, work)
    if settings.keep_checkpoint:
        shutil.rmtree(work / "backbone", ignore_errors=True)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return summary
