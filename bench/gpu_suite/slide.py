"""predict on a generated pyramidal slide: the whole command against the bare backbone + head forwards.

The slide is a tiled, zlib-compressed pyramidal TIFF with its resolution tags (as the tests write them),
tiled from the synthetic generator's H&E-like image at the run's mpp. The bare reference is the run's
`Predictor.tile_logits` (first stage, hooked UNet, head) on the same tiles already read into memory; the
whole command is `predict_images` on the slide with no tissue mask, so both see every tile. Peak host RSS
is this process's high-water mark, lowered to its current RSS just before predict (Linux `clear_refs`).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from gpu_suite.measure import (
    Clock,
    GpuMemory,
    LimitReached,
    Patches,
    Ticks,
    peak_rss_mib,
    reset_peak_rss,
    rss_mib,
    synchronize,
)
from gpu_suite.report import Part, ratio
from gpu_suite.workspace import MPP, Workspace, ensure_conv_run
from pathseg.datasets.synthetic import generate


def write_slide(path: Path, side: int, mpp: float = MPP, tile: int = 256) -> None:
    """A `side` px square pyramidal TIFF at `mpp`, levels halving down to 512 px or less (at least two)."""
    import tifffile

    unit = generate(0, "train", 0, 512, 512)[0]
    repeats = -(-side // 512)
    rgb = np.ascontiguousarray(np.tile(unit, (repeats, repeats, 1))[:side, :side])
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        level, index = rgb, 0
        while True:
            per_cm = 1e4 / (mpp * 2**index)
            tif.write(level, tile=(tile, tile), photometric="rgb", compression="zlib", subfiletype=int(index > 0),
                      resolution=(per_cm, per_cm), resolutionunit="CENTIMETER")
            if index >= 1 and max(level.shape[:2]) <= 512:
                break
            level, index = np.ascontiguousarray(level[::2, ::2]), index + 1


def measure_predict(ws: Workspace, clock: Clock, part: Part) -> None:
    from pathseg.predict import predictor as predictor_module
    from pathseg.predict import slide_command
    from pathseg.predict.command import predict_images
    from pathseg.predict.predictor import Predictor

    from pathseg.imaging.slides import Slide
    from pathseg.imaging.tiling import tile_grid

    try:
        run_dir = ensure_conv_run(ws, clock)
    except LimitReached:
        part.stop("stopped at limit while making the run it predicts with")
        return
    device = ws.device
    slide_path = ws.root / "slide.tif"
    write_slide(slide_path, ws.plan.slide_side)

    # the bare forwards, batch by batch until the time is up
    bare_clock = clock.share(0.4)
    predictor = Predictor(run_dir, device=str(device))
    t = predictor.config.tiling
    with Slide(slide_path) as opened:
        width, height = opened.size_at(predictor.mpp)
        grid = tile_grid(height, width, t.tile_size, t.stride)
        origins = grid.origins()
        tiles = np.stack([opened.read(x - grid.pad_left, y - grid.pad_top, t.tile_size, t.tile_size, predictor.mpp)
                          for y, x in origins])
    size = predictor.logits_size()
    setting = (f"{ws.plan.slide_side} px slide at {MPP} µm/px, {len(origins)} tiles of {t.tile_size} px, "
               f"{predictor.config.backbone.name}, conv head, batch {predictor.batch_size}")
    part.details["setting"] = setting
    predictor.tile_logits(tiles[: predictor.batch_size], ["warm"] * min(len(origins), predictor.batch_size), size)
    bare_s, bare_tiles = 0.0, 0
    for first in range(0, len(origins), predictor.batch_size):
        if bare_clock.expired():
            part.stop(f"stopped at limit after {bare_tiles} of {len(origins)} tiles of the bare forwards")
            break
        batch = origins[first : first + predictor.batch_size]
        begun = time.perf_counter()
        predictor.tile_logits(tiles[first : first + len(batch)], [f"s:{y}:{x}" for y, x in batch], size)
        synchronize(device)
        bare_s += time.perf_counter() - begun
        bare_tiles += len(batch)
    del predictor, tiles
    bare_tps = bare_tiles / bare_s if bare_s else None

    # the whole command
    seconds: dict[str, float] = {}
    ticks = Ticks()
    rss_before = rss_mib()
    clean_peak = reset_peak_rss()
    with Patches() as patches, GpuMemory(device) as memory:
        patches.timer(predictor_module, "load_backbone", seconds, "build")
        patches.progress(slide_command, clock, ticks, device)
        begun = time.perf_counter()
        try:
            predict_images(run_dir, [str(slide_path)], ws.root / "predicted", device=str(device),
                           use_tissue_mask=False, show_progress=False)
        except LimitReached:
            part.stop(f"stopped at limit after {ticks.done} of {len(origins)} tiles of predict")
        whole_s = time.perf_counter() - begun
    peak = peak_rss_mib()
    done = ticks.done
    whole_tps = done / whole_s if done else None
    without_build = done / (whole_s - seconds.get("build", 0.0)) if done else None
    part.details.update({"predict_s": round(whole_s, 3), "tiles_done": done, "bare_s": round(bare_s, 3),
                         "rss_before_mib": rss_before, "peak_rss_is_predicts_own": clean_peak,
                         "seconds": {k: round(v, 3) for k, v in seconds.items()}})
    part.add("predict, whole command", whole_tps, "tiles/s",
             f"{setting}; reading, blending, label pyramid, GeoJSON, glands")
    part.add("bare backbone + head forwards (Predictor.tile_logits)", bare_tps, "tiles/s",
             f"same tiles in memory, {bare_tiles} tiles")
    part.add("ratio: predict / bare", ratio(whole_tps, bare_tps), "x", "target >= 0.8")
    part.add("ratio: predict without its backbone build / bare", ratio(without_build, bare_tps), "x",
             f"build {seconds.get('build', 0.0):.1f} s")
    part.add("peak host RSS during predict", peak, "MiB",
             (f"the process held {rss_before:.0f} MiB before" if clean_peak and rss_before
              else "the whole suite process's peak (the kernel would not reset it)"))
    part.add("peak GPU memory of predict", memory.peak_gib, "GiB",
             "allocated by torch above what was held before" if device.type == "cuda" else "CPU: no GPU memory")
