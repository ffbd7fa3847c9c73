"""Does memory stay flat as the dataset and the store grow?

The loader promises memory bounded by batch size and prefetch depth, never by the store's size:
that is what lets one machine train heads on caches far larger than its RAM. Extraction makes the
same promise for the dataset (images are decoded into the store one at a time, tiles are cut per
batch). This benchmark runs `pathseg extract` with the tiny backbone on synthetic data twice, one
dataset 8x the other (train and test images N and 8N), then `pathseg fit-head` and
`pathseg evaluate` on each store, every command in a fresh subprocess, one at a time, each
reporting its own peak RSS (VmHWM) as it exits. It also measures a child that only imports torch
and pathseg, the floor every command pays.

    target: peak RSS at 8x <= 1.1x peak RSS at 1x, for fit-head and for evaluate (extraction reported)

    python bench/memory.py
    python bench/memory.py --images 4 --scale 8 --tile 256/192 --json out.json
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _common as common
import yaml

from pathseg.config import config_to_dict
from pathseg.store import FeatureStore

DRIVER = """
import atexit, os, sys

def report():
    with open("/proc/self/status") as status:
        peak = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    with open(os.environ["PATHSEG_BENCH_PEAK"], "w") as out:
        out.write(peak)

atexit.register(report)
sys.argv = ["pathseg", *sys.argv[1:]]
import torch, pathseg.cli, pathseg.train_head.fit, pathseg.train_head.evaluate, pathseg.extract.runner
if len(sys.argv) > 1:
    pathseg.cli.main()
"""


def peak_rss(arguments: list[str], cwd: Path) -> tuple[float, float]:
    """(peak RSS in MiB, wall seconds) of `pathseg ARGUMENTS` in a fresh child; no arguments: imports only.

    The child reports its own VmHWM at exit. `os.wait4`'s ru_maxrss would not do: Linux carries the
    RSS of the forked copy of this (large) parent across exec into the child's maximum.
    """
    peak_file = cwd / ".peak_rss_kib"
    peak_file.unlink(missing_ok=True)
    env = {**os.environ, "PATHSEG_BENCH_PEAK": str(peak_file)}
    started = time.perf_counter()
    child = subprocess.run([sys.executable, "-c", DRIVER, *arguments], cwd=cwd, env=env, capture_output=True,
                           text=True)
    seconds = time.perf_counter() - started
    if child.returncode != 0:
        raise RuntimeError(f"pathseg {' '.join(arguments)} failed ({child.returncode}):\n{child.stdout[-2000:]}"
                           f"{child.stderr[-3000:]}")
    return int(peak_file.read_text()) / 1024, seconds


def write_config(directory: Path, args: argparse.Namespace, images: int) -> Path:
    tile, stride = (int(v) for v in args.tile.split("/"))
    height, width = (int(v) for v in args.size.split("x"))
    config = common.synthetic_config(
        directory,
        {
            "dataset.synthetic.train": images,
            "dataset.synthetic.test": images,
            "dataset.synthetic.height": height,
            "dataset.synthetic.width": width,
            "tiling.tile_size": tile,
            "tiling.stride": stride,
            "extract.timesteps": [int(t) for t in args.timesteps.split(",")],
            "extract.blocks": [b.strip() for b in args.blocks.split(",")],
            "train.epochs": args.epochs,
            "train.batch_size": args.batch_size,
            "evaluate.overlays": 1,
        },
    )
    path = directory / "pipeline.yaml"
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    return path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--images", type=int, default=2, help="N: train and test images of the 1x store")
    parser.add_argument("--scale", type=int, default=8, help="the large store has scale*N train and test images")
    parser.add_argument("--size", default="288x352", help="HxW of each synthetic image")
    parser.add_argument("--tile", default="128/96", help="tile_size/stride (128/96: 12 tiles per image)")
    parser.add_argument("--timesteps", default="50")
    parser.add_argument("--blocks", default="up1,up2.2,up3.2")
    parser.add_argument("--epochs", type=int, default=2, help="fit-head epochs")
    parser.add_argument("--batch-size", type=int, default=8, help="train.batch_size")
    common.add_output_options(parser, "stores and runs")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    machine = common.start()
    results: dict[str, Any] = {}
    with common.work_directory(args.workdir, "pathseg-bench-memory-") as workdir:
        floor, _ = peak_rss([], workdir)
        print(f"import floor: {floor:.0f} MiB", flush=True)
        for label, images in (("1x", args.images), (f"{args.scale}x", args.images * args.scale)):
            directory = workdir / label
            config_path = write_config(directory, args, images)
            store = directory / "store.zarr"
            print(f"[{label}] extracting {images} train + {images} test images ...", flush=True)
            common.fresh(store)
            extract_rss, extract_s = peak_rss(["extract", "--config", str(config_path), "--store", str(store),
                                               "--quiet"], directory)
            opened = FeatureStore.open(store)
            tiles, store_bytes = opened.n_tiles, common.bytes_under(store)
            run_dir = directory / "run"
            fit_rss, fit_s = peak_rss(
                ["fit-head", "--config", str(config_path), "--store", str(store), "--run-dir", str(run_dir),
                 "--quiet"], directory)
            eval_rss, eval_s = peak_rss(["evaluate", str(run_dir), "--config", str(config_path), "--quiet"],
                                           directory)
            results[label] = {"train_images": images, "test_images": images, "tiles": tiles,
                              "store_bytes": store_bytes, "extraction_s": extract_s,
                              "extract_peak_rss_mib": extract_rss,
                              "fit_head_peak_rss_mib": fit_rss, "fit_head_s": fit_s,
                              "evaluate_peak_rss_mib": eval_rss, "evaluate_s": eval_s}
            print(f"[{label}] {tiles} tiles, store {store_bytes / 2**20:.0f} MiB: extract {extract_rss:.0f} MiB "
                  f"({extract_s:.1f} s), fit-head {fit_rss:.0f} MiB "
                  f"({fit_s:.1f} s), evaluate {eval_rss:.0f} MiB ({eval_s:.1f} s)", flush=True)

    small, large = results["1x"], results[f"{args.scale}x"]
    rows = []
    for command, key in (("extract", "extract_peak_rss_mib"), ("fit-head", "fit_head_peak_rss_mib"),
                         ("evaluate", "evaluate_peak_rss_mib")):
        ratio = large[key] / small[key]
        above = (large[key] - floor) / max(small[key] - floor, 1e-9)
        rows.append([command, small[key], large[key], ratio, small[key] - floor, large[key] - floor, above,
                     common.verdict(ratio, 1.1, False)])
    common.print_table(
        f"peak RSS (MiB) on stores of {small['tiles']} and {large['tiles']} tiles "
        f"({small['store_bytes'] / 2**20:.0f} and {large['store_bytes'] / 2**20:.0f} MiB); "
        f"import floor {floor:.0f} MiB",
        ["command", "1x", f"{args.scale}x", f"{args.scale}x/1x", "1x above floor", f"{args.scale}x above floor",
         "ratio above floor", "target <= 1.1"],
        rows,
    )
    common.save_json(args.json, {"benchmark": "memory", "machine": machine, "import_floor_mib": floor,
                                 "scale": args.scale, "results": results,
                                 "ratios": {r[0]: r[3] for r in rows}})


if __name__ == "__main__":
    main()
