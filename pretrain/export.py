"""The finished pretraining as a backbone directory `pathseg extract --backbone DIR` reads, plus its record.

Everything is written into a side directory (`<out>.pretraining/backbone`) and renamed into place,
record last, so `<out>` is either the previous complete backbone or the new complete one, never a
half-written mix. The record's `weights_digest` is what `store_key` reads to give the new weights a
new feature store even at the same path.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pathseg.extract.backbone import Backbone, file_digest
from pathseg.pretrain.checkpoints import PHASES
from pathseg.pretrain.data import to_unit_tensor
from pathseg.pretrain.first_stage import reconstruct
from pathseg.pretrain.identity import settings_key
from pathseg.pretrain.plots import image_grid, loss_plot, to_uint8
from pathseg.pretrain.quality import first_stage_quality, psnr, quality_tiles
from pathseg.pretrain.trainer import Trainer
from pathseg.pretrain.unet_phase import sample_images

from pathseg.config import config_to_dict
from pathseg.files import atomic_write_text
from pathseg.store import PRETRAIN_RECORD, software_versions
from pathseg.store.disk import _fsync_dir, _fsync_tree

RECORD_SCHEMA = 1
HISTORY_FILE = "loss_history.json"
FINAL_LOSS_WINDOW = 20  # steps the reported final loss is averaged over (single steps are noisy)


def weight_files(directory: Path) -> list[Path]:
    """The files `backbone_fingerprint` hashes: the record's digest must equal the one extraction computes."""
    return [p for p in Path(directory).rglob("*") if p.suffix in {".safetensors", ".bin"}]


def parameter_count(module: torch.nn.Module) -> int:
    return int(sum(p.numel() for p in module.parameters()))


def _final(values: list[float]) -> float | None:
    return float(np.mean(values[-FINAL_LOSS_WINDOW:])) if values else None


def _images_in_batches(trainer: Trainer, tiles: np.ndarray, work) -> np.ndarray:
    outputs = []
    for start in range(0, len(tiles), trainer.settings.batch_size):
        images = to_unit_tensor(tiles[start : start + trainer.settings.batch_size], trainer.device)
        with torch.no_grad(), trainer.autocast():
            outputs.append(work(images).float().cpu().numpy())
    return np.concatenate(outputs) if outputs else np.zeros((0, 3, 1, 1), np.float32)


def write_reconstructions(trainer: Trainer, path: Path) -> dict[str, float] | None:
    """Fixed tiles spread over the data (no augmentation), above what the frozen first stage gives back."""
    tiles = trainer.stream.spread(trainer.settings.reconstructions)
    if not len(tiles):
        return None
    decoded = _images_in_batches(trainer, tiles, lambda x: reconstruct(trainer.first_stage, x * 2.0 - 1.0))
    originals = tiles.astype(np.float32) / 127.5 - 1.0
    rebuilt = to_uint8(decoded)
    error = np.abs(rebuilt.astype(np.float32) - tiles.astype(np.float32)) / 255.0
    image_grid([tiles, rebuilt], path)
    return {
        "tiles": len(tiles),
        "l1": float(np.mean(np.abs(decoded.transpose(0, 2, 3, 1) - originals)) / 2.0),
        "psnr_db": psnr(error),
    }


def write_samples(trainer: Trainer, path: Path) -> int:
    """DDIM samples of the EMA UNet, decoded; conditioned on real tiles' embeddings in ssl mode, else null."""
    count = trainer.settings.samples
    if count == 0:
        return 0
    generator = torch.Generator().manual_seed(trainer.settings.seed)
    tile_size = trainer.config.tiling.tile_size
    latent_shape = (trainer.encoder.latent_channels, tile_size // trainer.encoder.latent_factor,
                    tile_size // trainer.encoder.latent_factor)
    if trainer.context.mode == "null":
        contexts = [trainer.projector.null_context(count)]
        shown = []
    else:
        shown = trainer.stream.spread(count)
        contexts = [trainer.context(to_unit_tensor(shown, trainer.device), None)]
    rows = []
    with torch.no_grad(), trainer.autocast():
        for context in contexts:
            images = sample_images(trainer.unet, trainer.encoder, trainer.scheduler, context,
                                   trainer.settings.sample_steps, latent_shape, generator)
            rows.append(to_uint8(images.float().cpu().numpy()))
    image_grid([shown, *rows] if len(shown) else rows, path)
    return count


def measure_first_stage(trainer: Trainer) -> dict[str, Any] | None:
    tiles, source = quality_tiles(trainer.config, trainer.stream.spread)
    quality = first_stage_quality(trainer.first_stage, tiles, trainer.device, trainer.settings.batch_size,
                                  trainer.autocast)
    return {**quality, **source} if quality is not None else None


def build_record(trainer: Trainer, reconstruction: dict | None, samples: int, digest: str) -> dict[str, Any]:
    state = trainer.state
    seconds = {phase: state.seconds.get(phase, 0.0) for phase in PHASES}
    steps = {"first_stage": trainer.first_steps, "unet": trainer.unet_steps}
    measured = {phase: len(state.history[phase]) for phase in PHASES}
    return {
        "schema": RECORD_SCHEMA,
        "weights_digest": digest,
        "settings_key": settings_key(trainer.identity),  # what a rerun compares: every setting of the weights
        "identity": trainer.identity,
        "preset": trainer.settings.preset,
        "first_stage_class": trainer.configs["first_stage_class"],
        "parameters": {
            "unet": parameter_count(trainer.unet),
            "first_stage": parameter_count(trainer.first_stage),
            "projector": parameter_count(trainer.projector),
        },
        "data": trainer.stream.reader.identity(),
        "conditioning": trainer.identity["conditioning"],
        "steps": {"total": trainer.total_steps, **steps},
        "batch_size": trainer.settings.batch_size,  # the global batch, split over `processes`
        "processes": trainer.processes.world,
        "first_stage_crop": trainer.first_stage_crop,  # px of phase 1's square training crops; None: whole tiles
        "final_losses": {phase: _final(state.history[phase]) for phase in PHASES},
        "steps_per_second": {phase: (measured[phase] / seconds[phase] if seconds[phase] > 0 else None)
                             for phase in PHASES},
        "seconds": seconds,
        "resumed_from_steps": state.resumed_from,
        "settings_changed": state.changes,  # learning rates etc. changed when a stopped run was resumed
        "latent_scale": state.latent_scale,
        # the first stage taken from another backbone (pretrain.first_stage_from): where, its digest, its phase-1 s
        "first_stage_from": trainer.reused.source if trainer.reused is not None else None,
        "reconstruction": reconstruction,
        # whole held-out tiles at extraction size; with the first stage's minutes in `seconds`
        "first_stage_quality": measure_first_stage(trainer),
        "samples": {"count": samples, "ddim_steps": trainer.settings.sample_steps},
        "seed": trainer.settings.seed,
        "device": str(trainer.device),
        "precision": trainer.precision,
        "versions": software_versions(),
        "config": config_to_dict(trainer.config),
    }


def export_backbone(trainer: Trainer, out: Path, work: Path) -> dict[str, Any]:
    """Write the backbone, pictures and record into `work/backbone`, then put it at `out`; returns the record."""
    staging = work / "backbone"
    if staging.exists():
        shutil.rmtree(staging)
    trainer.use_ema_weights()
    Backbone(trainer.unet, trainer.first_stage, trainer.scheduler, trainer.projector, str(out), "").save(staging)
    loss_plot(trainer.state.history, staging / "loss.png")
    atomic_write_text(staging / HISTORY_FILE, json.dumps(trainer.state.history))
    reconstruction = write_reconstructions(trainer, staging / "reconstructions.png")
    samples = write_samples(trainer, staging / "samples.png")
    record = build_record(trainer, reconstruction, samples, file_digest(weight_files(staging)))
    atomic_write_text(staging / PRETRAIN_RECORD, json.dumps(record, indent=2))
    _fsync_tree(staging)
    put_in_place(staging, Path(out))
    return record


def put_in_place(staging: Path, out: Path) -> None:
    """Rename the finished directory to `out`, moving a previous backbone there aside first, then dropping it."""
    replaced = out.with_name(out.name + ".replaced")
    if replaced.exists():
        shutil.rmtree(replaced)
    if out.exists():
        out.rename(replaced)
    staging.rename(out)
    _fsync_dir(out.parent)
    if replaced.exists():
        shutil.rmtree(replaced)
