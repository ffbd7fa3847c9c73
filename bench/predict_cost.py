"""What predict on a slide costs beyond the model, and whether its memory grows with the slide.

1. Throughput: `pathseg predict` on a generated pyramidal TIFF (every tile, no tissue mask), tiles/s,
   against the bare forwards it cannot avoid on the same tiles (first stage + UNet with hooks + head,
   tiles already in memory), as a ratio measured in one run. Target >= 0.85x.
2. Memory: peak RSS of `pathseg predict` on a slide of 1x and of 8x the area (each in a fresh process),
   as a ratio. Target <= 1.2x.

The run it predicts with is made here: synthetic images written as a folder dataset with an mpp, the
tiny backbone (or --backbone), one epoch of fit-head.

    python bench/predict_cost.py --side 1536 --json bench/results/predict_cost.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _common import add_output_options, print_table, save_json, start, work_directory

MPP = 0.5


def make_run(work: Path, backbone: str) -> Path:
    from pathseg.extract.runner import run_extraction
    from pathseg.train_head.fit import fit_head
    from PIL import Image

    from pathseg.config import load_config
    from pathseg.datasets import build_dataset

    source = load_config(None, {"dataset.synthetic.train": 4, "dataset.synthetic.val": 1,
                                "dataset.synthetic.test": 0})
    root = work / "data"
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    for record in build_dataset(source.dataset).records():
        Image.fromarray(record.load_rgb()).save(root / "images" / f"{record.id}.png")
        Image.fromarray(record.load_labels().astype(np.uint8)).save(root / "masks" / f"{record.id}.png")
    (root / "classes.yaml").write_text("classes: [background, gland]\n")
    config = load_config(None, {"cache_dir": str(work / "cache"), "runs_dir": str(work / "runs"),
                                "dataset.name": "folder", "dataset.root": str(root), "dataset.folder.mpp": MPP,
                                "dataset.folder.test_fraction": 0.0, "backbone.name": backbone,
                                "train.epochs": 1})
    run_extraction(config, show_progress=False)
    return fit_head(config, show_progress=False).run_dir


def make_slide(path: Path, height: int, width: int) -> None:
    import tifffile

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:height, :width]
    rgb = np.stack([200 + 30 * np.sin(yy / 37.0), 110 + 40 * np.cos(xx / 23.0), 170 + 20 * np.sin((xx + yy) / 51.0)],
                   axis=-1)
    rgb = (rgb + rng.normal(0, 8, rgb.shape)).clip(0, 255).astype(np.uint8)
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        level, index = rgb, 0
        while True:
            per_cm = 1e4 / (MPP * 2**index)
            tif.write(level, tile=(256, 256), photometric="rgb", compression="zlib", subfiletype=int(index > 0),
                      resolution=(per_cm, per_cm), resolutionunit="CENTIMETER")
            if max(level.shape[:2]) <= 1024:
                break
            level, index = np.ascontiguousarray(level[::2, ::2]), index + 1


def bare_forwards(run_dir: Path, slide: Path) -> tuple[int, float]:
    """(tiles, seconds) of the model alone on the slide's tiles, read into memory beforehand."""
    from pathseg.predict.predictor import Predictor

    from pathseg.imaging.slides import Slide
    from pathseg.imaging.tiling import tile_grid

    predictor = Predictor(run_dir)
    with Slide(slide) as opened:
        width, height = opened.size_at(predictor.mpp)
        t = predictor.config.tiling
        grid = tile_grid(height, width, t.tile_size, t.stride)
        origins = grid.origins()
        tiles = np.stack([opened.read(x - grid.pad_left, y - grid.pad_top, t.tile_size, t.tile_size, predictor.mpp)
                          for y, x in origins])
    size = predictor.logits_size()
    started = time.perf_counter()
    for first in range(0, len(origins), predictor.batch_size):
        batch = origins[first : first + predictor.batch_size]
        predictor.tile_logits(tiles[first : first + len(batch)], [f"s:{y}:{x}" for y, x in batch], size)
    return len(origins), time.perf_counter() - started


PREDICT_CHILD = """
import sys, time, json
def peak_mib():  # VmHWM: this process only; ru_maxrss would carry the forked parent's peak across exec
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) / 1024
from pathseg.predict.command import predict_images
started = time.perf_counter()
predict_images(sys.argv[1], [sys.argv[2]], sys.argv[3], use_tissue_mask=False, show_progress=False)
print(json.dumps({"seconds": time.perf_counter() - started,
                  "peak_rss_mib": peak_mib()}))
"""


def predict_in_child(run_dir: Path, slide: Path, out: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", PREDICT_CHILD, str(run_dir), str(slide), str(out)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=1536, help="side in px (at 0.5 µm/px) of the 1x slide")
    parser.add_argument("--backbone", default="tiny")
    add_output_options(parser, "the run, the slides and the outputs")
    args = parser.parse_args()
    machine = start()
    with work_directory(args.workdir, "pathseg-predict-cost-") as work:
        run_dir = make_run(work, args.backbone)
        small, large = work / "1x.tif", work / "8x.tif"
        make_slide(small, args.side, args.side)
        make_slide(large, 2 * args.side, 4 * args.side)
        tiles, bare_seconds = bare_forwards(run_dir, small)
        one = predict_in_child(run_dir, small, work / "out-1x")
        eight = predict_in_child(run_dir, large, work / "out-8x")
    ratio = (tiles / one["seconds"]) / (tiles / bare_seconds)
    memory = eight["peak_rss_mib"] / one["peak_rss_mib"]
    print_table("predict on a slide", ["measure", "value", "target"], [
        ["tiles (1x slide)", tiles, ""],
        ["bare forwards tiles/s", f"{tiles / bare_seconds:.2f}", ""],
        ["predict tiles/s (whole command, incl. start-up and outputs)", f"{tiles / one['seconds']:.2f}", ""],
        ["throughput ratio", f"{ratio:.3f}", ">= 0.85"],
        ["peak RSS 1x / 8x (MiB)", f"{one['peak_rss_mib']:.0f} / {eight['peak_rss_mib']:.0f}", ""],
        ["memory ratio 8x / 1x", f"{memory:.3f}", "<= 1.2"],
    ])
    save_json(args.json, {"machine": machine, "args": vars(args), "tiles": tiles, "bare_seconds": bare_seconds,
                          "predict_1x": one, "predict_8x": eight, "throughput_ratio": ratio,
                          "memory_ratio": memory})


if __name__ == "__main__":
    main()
