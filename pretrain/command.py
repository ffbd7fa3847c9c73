"""`pathseg pretrain`: settings and data -> both phases (resuming from a checkpoint) -> backbone directory.

A run's identity (pretrain/identity.py) holds every setting that changes its weights; its digest, the
settings key, is what a finished backbone's `pretrain.json` records. The same key and `--steps` is done
(or redone from scratch with `--overwrite`); a larger `--steps` extends the run from the checkpoint kept
beside `--out`; another key is refused unless `--overwrite`. A stopped run resumes from its checkpoint,
also with other learning rates, loss weights or batch size (what gets past a NaN), and the record says so.
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
from pathseg.pretrain.checkpoints import CHECKPOINT, load_checkpoint, remove_stale_temporaries
from pathseg.pretrain.data import build_stream
from pathseg.pretrain.distributed import (
    Processes,
    decided_by_main,
    device_of,
    processes_from_environment,
    start,
    stop,
)
from pathseg.pretrain.identity import (
    differences,
    normalised,
    recorded_identity,
    recovery_changes,
    resumable,
    resume_key,
    run_identity,
    settings_key,
)
from pathseg.pretrain.presets import model_configs, phase_steps
from pathseg.pretrain.reused_first_stage import reuse_first_stage
from pathseg.pretrain.unet_phase import ssl_conditioning

from pathseg.config import PipelineConfig
from pathseg.errors import PathsegError
from pathseg.files import atomic_write_text
from pathseg.progress import say
from pathseg.store import PRETRAIN_RECORD, store_lock

WORK_SUFFIX = ".pretraining"
REDO_MARKER = "redoing.json"  # in the work directory while --overwrite redoes a finished backbone
DONE, REDO, REPLACE, TRAIN = "done", "redo", "replace", "train"


@dataclass
class PretrainSummary:
    out: Path
    already_done: bool = False
    record: dict[str, Any] = field(default_factory=dict)
    resumed_from: int | None = None
    main: bool = True  # False on the other processes of a torchrun: they export nothing and report nothing


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


def finished_backbone(out: Path, identity: dict, steps: int, checkpoint: Path, overwrite: bool) -> str:
    """What `out` asks of this run: DONE (it holds this very pretraining), REDO, REPLACE or TRAIN.

    The same settings key and `--steps` is DONE, or REDO (from scratch) with --overwrite. The same key with a
    larger `--steps` extends the run from its kept checkpoint. Another key is refused, naming what differs,
    unless --overwrite (REPLACE: only a checkpoint of this very run, killed while replacing, is resumed).
    """
    record = out / PRETRAIN_RECORD
    if not record.is_file():
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise PathsegError(
                f"{out} exists and is not a pretrained backbone (it has no {PRETRAIN_RECORD}); choose another --out"
            )
        return TRAIN
    key = settings_key(identity)
    try:
        recorded = json.loads(record.read_text())
        recorded_key, theirs = recorded_identity(recorded, identity)
        recorded_steps = int(recorded["steps"]["total"])
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        recorded_key, theirs, recorded_steps = None, None, None
    if recorded_key == key:
        if overwrite:
            return REDO
        if recorded_steps == steps:
            return DONE
        if recorded_steps is not None and recorded_steps > steps:
            raise PathsegError(
                f"{out} was pretrained for {recorded_steps} steps and a run cannot be shortened; use --steps "
                f"{recorded_steps} or more, --overwrite to pretrain afresh, or choose another --out"
            )
        if not checkpoint.is_file():
            raise PathsegError(
                f"cannot extend {out} to {steps} steps: its checkpoint {checkpoint} is gone; rerun with "
                "--overwrite to pretrain afresh, or choose another --out"
            )
        return TRAIN
    if overwrite:
        return REPLACE
    differ = ", ".join(differences(identity, theirs)[:6]) if theirs is not None else ""
    raise PathsegError(
        f"{out} holds a backbone pretrained with other {differ or 'settings or data'}; rerun with --overwrite to "
        "replace it, or choose another --out"
    )


def begin_redo(out: Path, work: Path, checkpoint: Path) -> None:
    """Drop the finished run's checkpoint so the redo starts from scratch, unless a redo of this very backbone
    was already under way (then, like any killed run, it resumes). A marker naming the backbone being redone
    tells the two apart; `out` keeps the old backbone until the new one replaces it."""
    marker = work / REDO_MARKER
    try:
        replacing = json.loads((out / PRETRAIN_RECORD).read_text()).get("weights_digest")
    except (OSError, ValueError, AttributeError):
        replacing = None
    try:
        under_way = json.loads(marker.read_text()).get("replacing") == replacing
    except (OSError, ValueError, AttributeError):
        under_way = False
    if under_way and checkpoint.is_file():
        return
    checkpoint.unlink(missing_ok=True)
    atomic_write_text(marker, json.dumps({"replacing": replacing}))


def resume_point(checkpoint: Path, identity: dict, overwrite: bool, exact: bool = False) -> dict | None:
    """The checkpoint to resume from, None to start afresh; refuses one of another run unless --overwrite.

    `exact`: only a checkpoint with this very settings key is resumed (replacing a finished backbone: its kept
    checkpoint must not be continued under other settings). Otherwise the `RECOVERY` settings may differ.
    """
    if not checkpoint.exists():
        return None
    try:
        saved = load_checkpoint(checkpoint)
    except PathsegError:
        if not overwrite:
            raise
        saved = {}
    theirs = saved.get("identity")
    theirs = normalised(theirs, identity) if isinstance(theirs, dict) else {}
    same = (settings_key(theirs) == settings_key(identity) if exact
            else resume_key(theirs) == resume_key(identity))
    if same:
        saved["identity"] = theirs
        return saved
    if overwrite:
        checkpoint.unlink()
        return None
    differ = differences(resumable(identity), resumable(theirs)) or ["settings"]
    raise PathsegError(
        f"{checkpoint} belongs to a pretraining with other {', '.join(differ[:6])}; rerun the command that made it "
        "to resume it, or add --overwrite to start afresh"
    )


def _prepare(out: Path, work: Path, checkpoint: Path, identity: dict, steps: int,
             overwrite: bool) -> tuple[str, dict | None]:
    """What `out` asks of this run, with the files set for it, and the checkpoint it resumes from (rank 0)."""
    verdict = finished_backbone(out, identity, steps, checkpoint, overwrite)
    if verdict == DONE:
        return verdict, None
    work.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(work)
    if verdict == REDO:
        begin_redo(out, work, checkpoint)
    saved = resume_point(checkpoint, identity, overwrite, exact=verdict == REPLACE)
    if saved is not None and int(saved["state"]["step"]) > steps:
        raise PathsegError(
            f"{checkpoint} is at step {saved['state']['step']}, past --steps {steps}; a run cannot be "
            "shortened: use a larger --steps, or --overwrite to start afresh"
        )
    return verdict, saved


def run_pretraining(config: PipelineConfig, out: Path, *, overwrite: bool = False,
                    show_progress: bool = True) -> PretrainSummary:
    """Train (or resume, or find done) the pretraining the config describes, into the backbone directory `out`.

    Under torchrun every process calls this; rank 0 holds the lock, decides, checkpoints and exports
    (`distributed.py`).
    """
    out = Path(out)
    processes = processes_from_environment()
    device = device_of(processes, training_device(config.pretrain.device))
    processes.part(config.pretrain.batch_size)  # a batch that does not split fails before anything starts
    start(processes, device)
    try:
        if not processes.main:
            return _run_locked(config, out, overwrite, show_progress, processes, device)
        with store_lock(out, wait=False):
            return _run_locked(config, out, overwrite, show_progress, processes, device)
    finally:
        stop(processes)


def _run_locked(config: PipelineConfig, out: Path, overwrite: bool, show_progress: bool, processes: Processes,
                device: torch.device) -> PretrainSummary:
    from pathseg.pretrain.export import export_backbone
    from pathseg.pretrain.trainer import Trainer

    settings = config.pretrain
    steps = phase_steps(settings)
    precision = training_precision(device, settings.autocast)
    configs = model_configs(settings)
    stream = build_stream(config)
    conditioning, configs["projector"] = ssl_conditioning(config.conditioning, configs["projector"],
                                                          config.tiling.tile_size)
    reused = (reuse_first_stage(settings.first_stage_from, configs["unet"])
              if settings.first_stage_from is not None else None)
    if reused is not None:
        reused.apply_to(configs)
    identity = run_identity(config, configs, stream.reader.identity(), reused.digest if reused else None)
    work = work_dir_for(out)
    checkpoint = work / CHECKPOINT
    prepared: dict[str, dict | None] = {}

    def decide() -> tuple[str, bool]:  # only the verdict travels to the other processes, never the checkpoint
        verdict, prepared["saved"] = _prepare(out, work, checkpoint, identity, settings.steps, overwrite)
        return verdict, prepared["saved"] is not None

    verdict, resumes = decided_by_main(processes, decide)
    if verdict == DONE:
        record = json.loads((out / PRETRAIN_RECORD).read_text()) if processes.main else {}
        return PretrainSummary(out, already_done=True, record=record, main=processes.main)
    # rank 0's own read, or the same file read by the others before any step (rank 0 writes none until then)
    saved = prepared["saved"] if processes.main else (load_checkpoint(checkpoint) if resumes else None)
    torch.manual_seed(settings.seed)
    trainer = Trainer(config, configs, device, autocast_factory(device, precision), stream, conditioning,
                      checkpoint, identity, resume_key(identity), steps, processes, reused)
    trainer.precision = precision
    summary = PretrainSummary(out, main=processes.main)
    if saved is not None:
        trainer.restore(saved)
        summary.resumed_from = trainer.state.step
        changed = recovery_changes(identity, saved["identity"])
        if changed:
            trainer.state.changes.append({"step": trainer.state.step, **changed})
        if show_progress and processes.main:
            now = "".join(f", {k} {old} -> {new}" for k, (old, new) in changed.items())
            say(f"resuming from {checkpoint} at step {trainer.state.step} of {trainer.total_steps}{now}")
    trainer.train_first_stage(show_progress)
    trainer.train_unet(show_progress)
    if not processes.main:
        return summary
    summary.record = export_backbone(trainer, out, work)
    if settings.keep_checkpoint:
        shutil.rmtree(work / "backbone", ignore_errors=True)
        (work / REDO_MARKER).unlink(missing_ok=True)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return summary
