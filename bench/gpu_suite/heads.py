"""Head training: fit-head epochs streaming and from RAM, against the same batches already on the GPU.

For each head kind, `fit_head` runs twice on the shared store (train.memory_budget 0: streamed from the store;
`auto`: read once into RAM, as run.json's `loader` then confirms), with its progress callback patched to
record when each step ended; the last epoch is timed (the first warms up) and the GPU's utilisation is
averaged over it. The reference is the same training step (pathseg's head, loss and optimiser calls, in
fit_head's order) over the same epoch's batches, gathered beforehand by the loader into GPU tensors: what
an epoch would cost if the loader were free. Streaming / resident and RAM / resident are the loader's ratios.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpu_suite.measure import Clock, LimitReached, Patches, Ticks, UtilSampler, synchronize
from gpu_suite.report import Part, ratio
from gpu_suite.workspace import Workspace, ensure_store

MODES = (("streaming", 0), ("from RAM", "auto"))


def measure_heads(ws: Workspace, clock: Clock, part: Part) -> None:
    try:
        store = ensure_store(ws, clock)
    except LimitReached:
        part.stop("stopped at limit while extracting the store it trains on")
        return
    kinds = ws.plan.head_kinds
    epochs = ws.plan.head_epochs
    part.details["epochs"] = epochs
    with UtilSampler(ws.device) as sampler:
        for index, kind in enumerate(kinds):
            kind_clock = clock.share(1.0 / (len(kinds) - index))
            rates: dict[str, float | None] = {}
            loads: dict[str, tuple[float | None, str, str]] = {}
            for mode, budget in MODES:
                config = ws.config({"head.kind": kind, "train.epochs": epochs, "train.memory_budget": budget})
                rates[mode], loads[mode] = fit_epoch(ws, config, store, kind, mode, kind_clock.share(0.4), sampler,
                                                     part)
            resident = resident_epoch(ws, config, store, kind, kind_clock, part)
            note = f"the last of {epochs} epochs, batch {config.train.batch_size}"
            for mode, _ in MODES:
                part.add(f"{kind}: fit-head epoch, {mode}", rates[mode], "tiles/s", note)
            held = "GPU-resident" if ws.device.type == "cuda" else "held in tensors (CPU)"
            part.add(f"{kind}: same batches, {held}", resident, "tiles/s", "the head step alone, no loader")
            for mode, _ in MODES:
                part.add(f"{kind}: ratio {mode} / {held}", ratio(rates[mode], resident), "x", "target >= 0.8")
            for mode, _ in MODES:
                part.add(f"{kind}: GPU utilisation, {mode} epoch", *loads[mode])
            if clock.expired() and index + 1 < len(kinds):
                part.stop(f"stopped at limit after {index + 1} of {len(kinds)} head kinds")
                break
    part.details["utilisation_source"] = sampler.source


def fit_epoch(ws: Workspace, config: Any, store: Path, kind: str, mode: str, clock: Clock, sampler: UtilSampler,
              part: Part) -> tuple[float | None, tuple[float | None, str, str]]:
    """Tiles/s of fit-head's last epoch, and (utilisation, unit, note) over it; None when stopped early."""
    from pathseg.train_head import fit

    run_dir = ws.root / "runs" / f"{kind}-{mode.replace(' ', '-')}"
    ticks = Ticks()
    with Patches() as patches:
        patches.progress(fit, clock, ticks, ws.device, label="fit-head")
        try:
            fit.fit_head(config, store_path=store, run_dir=run_dir, show_progress=False, announce=False)
        except LimitReached:
            part.stop(f"stopped at limit in {kind} ({mode}) after {ticks.done} steps")
    record = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else None
    epochs = config.train.epochs
    steps = len(ticks.times) // epochs if record else 0
    utilisation = tiles_per_s = None
    note = "CPU: null"
    if ws.device.type == "cuda":
        note = f"mean of {sampler.source} samples over the epoch" if sampler.source else "no reader of GPU load"
    if record is not None and steps and epochs >= 2:
        first, last = steps * (epochs - 1) - 1, steps * epochs - 1
        seconds = ticks.times[last] - ticks.times[first]
        tiles_per_s = record["train_tiles"] / seconds if seconds > 0 else None
        utilisation = sampler.mean(ticks.times[first], ticks.times[last])
        part.details[f"{kind} {mode}"] = {"loader": record["loader"], "epoch_s": round(seconds, 4),
                                          "steps_per_epoch": steps}
        if kind == "conv" and ws.conv_run is None:
            ws.conv_run = run_dir
        if mode == "from RAM" and record["loader"]["train"] != "memory":
            note += "; the features did not fit train.memory_budget (auto), so this epoch streamed"
    return tiles_per_s, (utilisation, "%", note)


def resident_epoch(ws: Workspace, config: Any, store_path: Path, kind: str, clock: Clock, part: Part) -> float | None:
    """The fit-head step over the last epoch's batches, already on the device: tiles/s of the timed second pass."""
    from pathseg.train_head.fit import has_labelled_pixels, segmentation_loss
    from pathseg.train_head.heads import build_head
    from pathseg.train_head.loader import StoreLoader
    from pathseg.train_head.runs import resolve_features
    from pathseg.train_head.tile_sources import decode_threads, plan_memory

    from pathseg.store import FeatureStore

    if clock.expired():
        part.stop(f"stopped at limit before the GPU-resident reference of {kind}")
        return None
    device, train = ws.device, config.train
    store = FeatureStore.open(store_path)
    pairs = resolve_features(config, store)
    tiles = store.tiles_of_splits([train.train_split])
    threads = decode_threads(train.loader_threads)
    memory = plan_memory(store, pairs, tiles, np.zeros(0, dtype=np.int64), 2**62, threads)
    loader = StoreLoader(store, pairs, tiles, train.batch_size, shuffle=True, augment=train.augment, seed=train.seed,
                         prefetch=train.prefetch, window_tiles=train.shuffle_window, threads=threads,
                         memory=memory.train, device=device)
    loader.set_epoch(train.epochs - 1)
    batches = [([f.clone() for f in batch.features], batch.labels.clone()) for batch in loader]
    del memory, loader
    torch.manual_seed(train.seed)
    in_channels = [store.feature_array(t, b).shape[1] for t, b in pairs]
    head = build_head(kind, in_channels, len(store.class_names), config.head.model_dump()).to(device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    pixels = torch.Generator().manual_seed(train.seed)
    ignore_index = store.ignore_index

    def epoch() -> None:
        head.train()
        for features, labels in batches:
            if not has_labelled_pixels(labels, ignore_index):
                continue
            logits, targets = head.training_outputs(features, labels, store.tile_size, pixels, ignore_index)
            loss = segmentation_loss(logits, targets, train.loss, ignore_index)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss.item()  # fit-head reads every loss, which waits for the step

    epoch()  # warm-up, as fit-head's first epoch
    synchronize(device)
    begun = time.perf_counter()
    epoch()
    synchronize(device)
    seconds = time.perf_counter() - begun
    part.details[f"{kind} GPU-resident"] = {"epoch_s": round(seconds, 4), "batches": len(batches)}
    return len(tiles) / seconds if seconds > 0 else None
