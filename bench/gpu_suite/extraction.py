"""Extraction at bf16: pathseg's own `run_extraction` against the bare encoder + UNet forwards, and GPU memory.

1. `run_extraction` into a fresh store of the workspace's images, with timers patched around the backbone
   build, the image table, the extraction pass (`extract_shards`: reading, encoding, the hooked UNet, host
   copies, compressed writes) and each `Extractor.features` call; peak GPU memory at the default batch.
2. The bare first-stage encoder + UNet forwards (`bench/_bare_forwards.py`, the reference every extraction
   benchmark uses) on the same number of tiles in the same batch sizes, in the same run: the ratio.
3. `Extractor.features` at the default batch, then doubled until the GPU runs out of memory (caught), the
   time is up, or the features copied to the host would crowd its memory: the largest batch that fits.

`extract.compile` is measured by `compiled.py`, in a child process that can be stopped mid-compilation.
"""

from __future__ import annotations

import time
from typing import Any

import _bare_forwards as bare
import numpy as np
import torch

from gpu_suite.measure import Clock, GpuMemory, LimitReached, Patches, Ticks, synchronize
from gpu_suite.report import Part, ratio
from gpu_suite.workspace import Workspace
from pathseg.memory_budget import available_memory

HOST_SHARE = 0.25  # of the available memory, for the features the batch probe copies to the host


def measure_extraction(ws: Workspace, clock: Clock, part: Part) -> None:
    from pathseg.extract import extractor as extractor_module
    from pathseg.extract import runner
    from pathseg.extract.backbone_sources import load_backbone

    started = time.perf_counter()
    ws.write_data()
    part.details["data_s"] = round(time.perf_counter() - started, 2)
    config = ws.config()
    e, device, tile = config.extract, ws.device, config.tiling.tile_size
    n_tiles = ws.n_tiles
    sizes = bare.batch_plan(n_tiles, e.tiles_per_shard, e.batch_size)
    setting = (f"{ws.plan.backbone}, {n_tiles} tiles of {tile} px, {len(e.timesteps)} timesteps x "
               f"{len(e.blocks)} blocks, batch {e.batch_size}, {e.autocast}")
    part.details.update({"setting": setting, "batch_sizes": sizes})

    # The bench's own copy of the backbone, placed as the runner places its own, for the bare references.
    backbone = extractor_module.prepare_for_device(load_backbone(config.backbone.name, None, config.backbone.seed),
                                                   device, False)
    generator = torch.Generator().manual_seed(0)
    latent = backbone.latent_shape(tile)
    inputs = [(torch.randn(size, *latent, generator=generator).to(device),
               backbone.projector.null_context(size).detach()) for size in sizes]
    bare.bare_forward_pass(backbone, inputs[:1], e.timesteps[:1], e.autocast)  # warm-up: kernels, allocator
    bare.encode_pass(backbone, sizes[:1], tile, e.autocast)

    # 1. the whole extraction
    seconds: dict[str, float] = {}
    calls: list[tuple[float, int]] = []
    ticks = Ticks()
    original_features = extractor_module.Extractor.features

    def features(self: Any, tiles: Any, noise: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        begun = time.perf_counter()
        out = original_features(self, tiles, noise, *args, **kwargs)  # synchronises the stream itself
        calls.append((time.perf_counter() - begun, len(noise)))
        return out

    store = ws.root / "store.zarr"
    run_clock = clock.share(0.55)
    with Patches() as patches, GpuMemory(device) as memory:
        patches.timer(runner, "load_backbone", seconds, "build")
        patches.timer(runner, "_prepare_images", seconds, "images")
        patches.timer(runner, "extract_shards", seconds, "pass")
        patches.replace(extractor_module.Extractor, "features", features)
        patches.progress(runner, run_clock, ticks, device, label="extract")
        begun = time.perf_counter()
        try:
            runner.run_extraction(config, show_progress=False, store_path=store)
            ws.store = store
        except LimitReached:
            part.stop(f"stopped at limit after {ticks.done} of {n_tiles} tiles of run_extraction")
        whole_s = time.perf_counter() - begun
    done = ticks.done
    whole_tps = done / whole_s if done else None
    pass_tps = done / seconds["pass"] if done and seconds.get("pass") else None
    steady = calls[1:]
    steady_tps = sum(n for _, n in steady) / sum(s for s, _ in steady) if steady else None
    ws.eager_features_tps = steady_tps
    part.details.update({"run_extraction_s": round(whole_s, 3), "tiles_done": done,
                         "seconds": {k: round(v, 3) for k, v in seconds.items()},
                         "features_calls_s": [round(s, 4) for s, _ in calls]})

    # 2. the bare forwards on as many tiles, in the same batch sizes, batch by batch until the time is up
    bare_clock = clock.share(0.5)
    unet_s = encode_s = 0.0
    bare_tiles = 0
    for (zt, context), size in zip(inputs, sizes, strict=True):
        if bare_clock.expired():
            part.stop(f"stopped at limit after {bare_tiles} of {n_tiles} tiles of the bare forwards")
            break
        unet_s += bare.bare_forward_pass(backbone, [(zt, context)], e.timesteps, e.autocast)
        encode_s += bare.encode_pass(backbone, [size], tile, e.autocast)
        bare_tiles += size
    bare_tps = bare_tiles / (unet_s + encode_s) if bare_tiles else None
    part.details.update({"bare_unet_s": round(unet_s, 3), "bare_encode_s": round(encode_s, 3),
                         "bare_tiles": bare_tiles})

    part.add("run_extraction, whole command", whole_tps, "tiles/s",
             f"{setting}; incl. backbone build and image table")
    part.add("extraction pass (extract_shards)", pass_tps, "tiles/s",
             "reading tiles, encoder, hooked UNet, host copies, compressed shard writes")
    part.add("bare encoder + UNet forwards", bare_tps, "tiles/s", f"same batch sizes, {bare_tiles} tiles")
    part.add("ratio: extraction pass / bare", ratio(pass_tps, bare_tps), "x", "target >= 0.8")
    part.add("ratio: whole command / bare", ratio(whole_tps, bare_tps), "x", "")
    part.add("Extractor.features, steady", steady_tps, "tiles/s", f"all calls of the run but the first ({len(calls)})")
    part.add("backbone build in run_extraction", seconds.get("build"), "s", "random init + move to device")
    part.add(f"peak GPU memory of run_extraction at batch {e.batch_size}", memory.peak_gib, "GiB",
             "allocated by torch above what was held before" if device.type == "cuda" else "CPU: no GPU memory")

    # 3. the largest batch that fits
    probe_batches(ws, config, backbone, clock, part)
    del backbone, inputs
    if device.type == "cuda":
        torch.cuda.empty_cache()


def probe_batches(ws: Workspace, config: Any, backbone: Any, clock: Clock, part: Part) -> None:
    """Extractor.features at the default batch, doubled until out of memory, out of time or at the cap."""
    from pathseg.extract.blocks import UNetLayout
    from pathseg.extract.extractor import Extractor
    from pathseg.extract.runner import requested_arrays

    device, e, tile = ws.device, config.extract, config.tiling.tile_size
    extractor = Extractor(backbone, config, device)
    wanted: dict[int, list[str]] = {}
    for timestep, block in requested_arrays(config, UNetLayout.of(backbone.unet)):
        wanted.setdefault(timestep, []).append(block)
    rng = np.random.default_rng(0)
    generator = torch.Generator().manual_seed(1)
    cap, capped_by = ws.plan.probe_cap_tiles, f"the plan's cap of {ws.plan.probe_cap_tiles} tiles"
    rows: list[dict[str, Any]] = []
    batch, ended = e.batch_size, None
    while ended is None:
        if batch > cap:
            ended = (f"no OOM up to {capped_by}" if device.type == "cuda"
                     else f"CPU: doubled up to {capped_by}, no GPU memory to run out of")
            break
        if clock.expired() or (rows and clock.left() < 2.5 * rows[-1]["seconds"]):
            ended = "stopped at limit"
            part.stop(f"stopped at limit in the batch probe at batch {batch}")
            break
        tiles = rng.integers(0, 256, (batch, tile, tile, 3), dtype=np.uint8)
        noise = torch.randn(batch, *backbone.latent_shape(tile), generator=generator)
        try:
            with GpuMemory(device) as memory:
                begun = time.perf_counter()
                out, z0 = extractor.features(tiles, noise, wanted)
                synchronize(device)
                seconds = time.perf_counter() - begun
        except torch.cuda.OutOfMemoryError:
            ended = f"out of memory at {batch}"
            out = z0 = None
            torch.cuda.empty_cache()
            break
        host_bytes = sum(values.nbytes for values, _ in out.values()) + (z0.nbytes if z0 is not None else 0)
        rows.append({"batch": batch, "seconds": round(seconds, 4), "tiles_per_s": round(batch / seconds, 2),
                     "peak_gib": None if memory.peak_gib is None else round(memory.peak_gib, 3),
                     "host_mib": round(host_bytes / 2**20, 1)})
        host_cap = int(HOST_SHARE * available_memory() / max(host_bytes / batch, 1))
        if host_cap < cap:
            cap, capped_by = host_cap, f"{host_cap} tiles, whose features would fill {HOST_SHARE:.0%} of free host RAM"
        del out, z0, tiles, noise
        batch *= 2
    part.details["batch_probe"] = {"rows": rows, "ended": ended}
    gpu = device.type == "cuda"
    first, last = (rows[0], rows[-1]) if rows else ({}, {})
    part.add(f"peak GPU memory, Extractor.features at batch {e.batch_size}", first.get("peak_gib"), "GiB",
             "one call, default batch" if gpu else "CPU: no GPU memory")
    part.add("largest batch that fits", last.get("batch"), "tiles", ended or "")
    part.add("peak GPU memory at the largest batch", last.get("peak_gib"), "GiB",
             "" if gpu else "CPU: no GPU memory")
    part.add("Extractor.features at the largest batch", last.get("tiles_per_s"), "tiles/s",
             "one call (the first at that shape)")
