"""`pathseg fit-head`: train a head on cached features only, keep the best validation epoch.

The epoch is chosen on the validation images stitched and scored as `evaluate` scores them (not on the
padded, overlapping tiles, where a GlaS pixel counts ~2.4 times and mirror padding is a third of the
canvas), so the kept head is the one that maximises the reported figure.

The run is written into a hidden folder beside its run directory and swapped in whole at the end, so a
fit that is stopped (killed, out of memory, an error) leaves the previous run of that directory as it was,
record and head together, instead of the old record next to a new epoch's head.

Never opens a source image or builds the backbone, so an ablation costs minutes of CPU, not hours of GPU.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pathseg.train_head.contours import TileContours, check_target, contour_fold, run_class_names
from pathseg.train_head.heads import PIXEL_ONLY_KINDS, build_head
from pathseg.train_head.loader import StoreLoader
from pathseg.train_head.runs import (
    EPOCH_SELECTION,
    HEAD_FILE,
    RUN_SCHEMA,
    default_run_dir,
    extraction_identity,
    file_sha256,
    locate_store,
    publish_run,
    resolve_features,
    run_takes_pixels,
    save_head,
    staging_dir,
)
from pathseg.train_head.stitching import stitched_pixel_metrics
from pathseg.train_head.tile_images import TileImages
from pathseg.train_head.tile_sources import decode_threads, plan_memory
from torch.nn import functional as F

from pathseg.config import PipelineConfig, config_to_dict
from pathseg.errors import PathsegError
from pathseg.files import atomic_write_text
from pathseg.memory_budget import resolve_budget
from pathseg.progress import progress_bar, say
from pathseg.store import FeatureStore, software_versions
from pathseg.store.names import RGB_BLOCK, has_timestep, is_encoder


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PathsegError(f"train.device is {name!r} but no CUDA GPU is visible; use auto or cpu")
    return device


def dice_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int | None) -> torch.Tensor:
    """Soft Dice averaged over classes, ignoring don't-care pixels: counters class imbalance that CE leaves."""
    probabilities = logits.softmax(dim=1)
    valid = torch.ones_like(labels, dtype=torch.bool) if ignore_index is None else labels != ignore_index
    target = F.one_hot(torch.where(valid, labels, 0), logits.shape[1]).permute(0, 3, 1, 2).float()
    mask = valid.unsqueeze(1).float()
    intersection = (probabilities * target * mask).sum(dim=(0, 2, 3))
    total = (probabilities * mask).sum(dim=(0, 2, 3)) + (target * mask).sum(dim=(0, 2, 3))
    present = (target * mask).sum(dim=(0, 2, 3)) > 0
    dice = (2 * intersection + 1.0) / (total + 1.0)
    return 1.0 - dice[present].mean() if present.any() else logits.sum() * 0.0


def has_labelled_pixels(labels: torch.Tensor, ignore_index: int | None) -> bool:
    """Cross-entropy over pixels that are all don't-care is 0/0 = NaN, which would poison the head's weights."""
    return ignore_index is None or bool((labels != ignore_index).any())


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor, kind: str, ignore_index: int | None) -> torch.Tensor:
    ce = F.cross_entropy(logits, labels, ignore_index=-100 if ignore_index is None else ignore_index)
    return ce + dice_loss(logits, labels, ignore_index) if kind == "ce+dice" else ce


@dataclass
class FitResult:
    run_dir: Path
    best_epoch: int
    best_metric: float | None
    history: list[dict]


def _history_csv(history: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    return buffer.getvalue()


def fit_head(
    config: PipelineConfig, *, store_path: Path | None = None, run_dir: Path | None = None, show_progress: bool = True,
    store: FeatureStore | None = None, pairs: list[tuple[int, str]] | None = None, announce: bool = True,
) -> FitResult:
    """Train one head; `store` (already open) and `pairs` (exact maps) let `ablate` run many without reopening,
    and `announce` False keeps a sweep's log to its own lines."""
    store = store if store is not None else locate_store(config, store_path)
    check_target(config.head, store)
    if pairs is None:
        pairs = resolve_features(config, store)
    else:
        store.require(pairs)
    train = config.train
    train_tiles = store.tiles_of_splits([train.train_split])
    if len(train_tiles) == 0:
        raise PathsegError(
            f"{store.path} has no tiles in split {train.train_split!r} (splits: {store.splits()}); "
            "set train.train_split"
        )
    val_tiles = store.tiles_of_splits([train.val_split])
    val_images = [i for i, entry in enumerate(store.images) if entry.split == train.val_split]
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(config, store, pairs)
    staged = staging_dir(run_dir)
    try:
        return _fit_into(staged, run_dir, config, store, pairs, train_tiles, val_tiles, val_images, show_progress,
                         announce)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)  # a stopped fit leaves the previous run as it was
        raise


def _fit_into(staged: Path, run_dir: Path, config: PipelineConfig, store: FeatureStore, pairs: list[tuple[int, str]],
              train_tiles: np.ndarray, val_tiles: np.ndarray, val_images: list[int], show_progress: bool,
              announce: bool) -> FitResult:
    """Train into `staged`, then swap it in for `run_dir`."""
    train = config.train
    torch.manual_seed(train.seed)
    device = pick_device(train.device)
    in_channels = [store.feature_array(t, b).shape[1] for t, b in pairs]
    class_names = run_class_names(store, config.head)
    with_pixels = run_takes_pixels(config)
    head = build_head(config.head.kind, in_channels, len(class_names), config.head.model_dump(),
                      with_pixels).to(device)
    contours = (TileContours.build(store, train_tiles, config.head.contour_width)
                if config.head.target == "contour" else None)
    pixels = torch.Generator().manual_seed(train.seed)  # which pixels a sampling head trains on, reproducibly
    threads = decode_threads(train.loader_threads)
    images = TileImages(store) if head.needs_image else None  # conv-image: the tiles' pixels, from the store
    memory = plan_memory(store, pairs, train_tiles, val_tiles, resolve_budget(train.memory_budget), threads, images)
    loader = StoreLoader(
        store,
        pairs,
        train_tiles,
        train.batch_size,
        shuffle=True,
        augment=train.augment,
        seed=train.seed,
        prefetch=train.prefetch,
        window_tiles=train.shuffle_window,
        threads=threads,
        memory=memory.train,
        device=device,
        contours=contours,
        images=images,
    )
    optimizer = torch.optim.AdamW(head.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    total_steps = train.epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))
    )
    ignore_index = store.ignore_index
    # The head's classes; a contour head also records the class its contour folds into when scored.
    record_classes = {"class_names": class_names, "head": config.head.model_dump(mode="json"),
                      **({"contour_fold_class": contours.fold_class} if contours is not None else {})}

    history: list[dict] = []
    best_epoch, best_metric = -1, -math.inf
    started = time.perf_counter()
    with progress_bar("fit-head", total_steps, "steps", show_progress) as advance:
        for epoch in range(train.epochs):
            head.train()
            loader.set_epoch(epoch)
            losses, skipped = [], 0
            for batch in loader:
                if not has_labelled_pixels(batch.labels, ignore_index):
                    skipped += 1  # the schedule still advances, so the step count means the same in every run
                    with warnings.catch_warnings():  # torch warns when a schedule steps before the optimizer
                        warnings.simplefilter("ignore", UserWarning)
                        scheduler.step()
                    advance(1)
                    continue
                logits, targets = head.training_outputs(batch.features, batch.labels, store.tile_size, pixels,
                                                        ignore_index)
                loss = segmentation_loss(logits, targets, train.loss, ignore_index)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                losses.append(loss.item())
                advance(1)
            if not losses:
                raise PathsegError(
                    f"{store.path}: every tile of split {train.train_split!r} is unlabelled (all pixels are the "
                    f"ignore index {ignore_index}); check the dataset's masks or set train.train_split"
                )
            row = {"epoch": epoch, "train_loss": float(np.mean(losses)), "lr": scheduler.get_last_lr()[0],
                   "skipped_batches": skipped}
            if val_images:
                metrics = stitched_pixel_metrics(head, store, pairs, val_images, device, train.batch_size,
                                                 config.evaluate.blend, memory=memory.val, threads=threads,
                                                 fold=contour_fold(record_classes))
                row.update(
                    {
                        "val_pixel_accuracy": metrics["pixel_accuracy"],
                        "val_miou": metrics["miou"],
                        "val_mean_dice": metrics["mean_dice"],
                    }
                )
                score = metrics["miou"] if metrics["miou"] is not None else -math.inf
            else:
                score = -row["train_loss"]
            row["seconds"] = round(time.perf_counter() - started, 2)
            history.append(row)
            if best_epoch < 0 or score > best_metric:
                best_epoch, best_metric = epoch, score
                save_head(head, staged / HEAD_FILE)

    record = {
        "schema": RUN_SCHEMA,
        "store": str(store.path.resolve()),
        "store_fingerprint": store.fingerprint,
        "store_compute_precision": store.compute_precision,
        "extraction": extraction_identity(store),
        "pairs": [list(p) for p in pairs],
        "timesteps": list(dict.fromkeys(t for t, b in pairs if has_timestep(b))),
        "blocks": list(dict.fromkeys(b for _, b in pairs)) + ([RGB_BLOCK] if with_pixels else []),
        "in_channels": in_channels,
        "pixels": with_pixels,
        "map_sizes": [int(store.feature_array(t, b).shape[-1]) for t, b in pairs],
        "encoders": {b: store.attrs.get("encoders", {}).get(b) for _, b in pairs if is_encoder(b)},
        **record_classes,
        "ignore_index": ignore_index,
        "tile_size": store.tile_size,
        "train": train.model_dump(mode="json"),
        "seed": train.seed,
        "train_tiles": int(len(train_tiles)),
        "val_tiles": int(len(val_tiles)),
        "best_epoch": best_epoch,
        "best_selection": "val_miou of stitched whole images, as evaluate scores them" if val_images
        else "train_loss (no validation images)",
        "epoch_selection": EPOCH_SELECTION,
        "head_sha256": file_sha256(staged / HEAD_FILE),
        "blend": config.evaluate.blend,
        "loader": memory.record(),  # how features were read: never changes a result
        "config": config_to_dict(config),
        "versions": software_versions(),
        "seconds": round(time.perf_counter() - started, 2),
    }
    atomic_write_text(staged / "history.json", json.dumps(history, indent=2))
    atomic_write_text(staged / "history.csv", _history_csv(history))
    atomic_write_text(staged / "run.json", json.dumps(record, indent=2))
    publish_run(staged, run_dir)
    if announce:
        inputs = f"{len(pairs)} feature maps" + (" + the pixels" if with_pixels else "")
        if config.head.kind in PIXEL_ONLY_KINDS:
            inputs = f"the pixels ({config.head.kind})"
        say(f"head trained on {len(train_tiles)} tiles x {inputs}; best epoch {best_epoch}; run {run_dir}")
    return FitResult(run_dir, best_epoch, best_metric if val_images else None, history)
