"""Does memory stay flat as the dataset and the store grow?

The loader promises memory bounded by batch size and prefetch depth, never by the store's size:
that is what lets one machine train heads on caches far larger than its RAM. Extraction makes the
same promise for the dataset (images are decoded into the store one at a time, tiles are cut per
batch). This benchmark runs `pathseg extract` with the tiny backbone on synthetic data twice, one
dataset 8x the other (train and test images N and 8N), then `pathseg fit-head` and
`pathseg evaluate` on each store, every command in a fresh subprocess, one at a time, each
reporting its own peak RSS (VmHWM) as it exits. It also measures a child that only imports torch
and pathseg, the floor every command pays.

    target: peak RSS at 8x <= 1.1x peak RSS at 1x, for fit-head streaming (train.memory_budget=0) and for
            evaluate (extraction reported)

fit-head also runs with the default budget ("auto": the features go to RAM when they fit) and, on the
large store, with a budget of half of what its features need, to show the other promise of issue 16:
peak RSS <= the streaming peak + the budget (what was held in RAM is read from run.json).

    python bench/memory.py
    python bench/memory.py --images 4 --scale 8 --tile 256/192 --json out.json
    python bench/memory.py --budget-store cache/glas-tiny-XXXX.zarr   # the budget rows on a store of GBs

The synthetic stores hold a few MiB of features, below the noise of a peak RSS; `--budget-store` runs
the budget rows (streaming, auto, half of the need; one epoch of a linear head) on a real store instead.
"""

from __future__ import annotations

import argparse
import json
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


def budget_runs(base: list[str], directory: Path, settings: list[str]) -> dict[str, dict[str, Any]]:
    """fit-head under each `train.memory_budget` setting ("half" = half of what auto held); RSS and record."""
    runs: dict[str, dict[str, Any]] = {}
    for name in settings:
        if name == "half":
            need = runs["auto"]["train_bytes"] + runs["auto"]["val_bytes"]
            setting = str(need // 2)
        else:
            setting = name
        run_dir = directory / f"run-budget-{name}"
        rss, seconds = peak_rss([*base, "--run-dir", str(run_dir), "--quiet", "--set",
                                 f"train.memory_budget={setting}"], directory)
        loader = json.loads((run_dir / "run.json").read_text())["loader"]
        runs[name] = {**loader, "setting": setting, "peak_rss_mib": rss, "seconds": seconds}
        print(f"fit-head, memory_budget={setting}: peak {rss:.0f} MiB ({seconds:.1f} s), "
              f"{loader['bytes_in_memory'] / 2**20:.1f} MiB of features in RAM "
              f"(budget {loader['memory_budget_bytes'] / 2**20:.0f} MiB)", flush=True)
    for run in runs.values():
        run["above_streaming_mib"] = run["peak_rss_mib"] - runs["0"]["peak_rss_mib"]
    return runs


def print_budget_table(table: list[tuple[str, dict[str, dict[str, Any]]]]) -> None:
    rows = []
    for label, runs in table:
        for name, run in runs.items():
            if name == "0":
                continue
            held = run["bytes_in_memory"] / 2**20
            rows.append([label, run["setting"], f"{run['memory_budget_bytes'] / 2**20:.0f}", f"{held:.1f}",
                         runs["0"]["peak_rss_mib"], run["peak_rss_mib"], run["above_streaming_mib"],
                         "yes" if run["above_streaming_mib"] <= run["memory_budget_bytes"] / 2**20 + 64 else "NO"])
    common.print_table(
        "fit-head peak RSS (MiB) with features in RAM: target <= the streaming peak + the budget (+ 64 MiB)",
        ["store", "memory_budget", "budget MiB", "features in RAM MiB", "streaming peak", "peak", "above streaming",
         "within"],
        rows,
    )


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
    parser.add_argument("--budget-store", default=None,
                        help="run the memory-budget rows on this existing store (one epoch, linear head)")
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
            budgets = budget_runs(["fit-head", "--config", str(config_path), "--store", str(store)], directory,
                                  ["0", "auto"] if label == "1x" else ["0", "auto", "half"])
            run_dir = directory / "run-budget-0"  # streaming: the flat-memory promise of the loader
            fit_rss, fit_s = budgets["0"]["peak_rss_mib"], budgets["0"]["seconds"]
            eval_rss, eval_s = peak_rss(["evaluate", str(run_dir), "--config", str(config_path), "--quiet"],
                                           directory)
            results[label] = {"train_images": images, "test_images": images, "tiles": tiles,
                              "store_bytes": store_bytes, "extraction_s": extract_s,
                              "extract_peak_rss_mib": extract_rss,
                              "fit_head_peak_rss_mib": fit_rss, "fit_head_s": fit_s, "fit_head_budgets": budgets,
                              "evaluate_peak_rss_mib": eval_rss, "evaluate_s": eval_s}
            print(f"[{label}] {tiles} tiles, store {store_bytes / 2**20:.0f} MiB: extract {extract_rss:.0f} MiB "
                  f"({extract_s:.1f} s), fit-head {fit_rss:.0f} MiB "
                  f"({fit_s:.1f} s), evaluate {eval_rss:.0f} MiB ({eval_s:.1f} s)", flush=True)

        budget_store = None
        if args.budget_store:
            print(f"memory budgets on {args.budget_store} ...", flush=True)
            runs = budget_runs(["fit-head", "--store", str(Path(args.budget_store).resolve()), "--epochs", "1",
                                "--head-kind", "linear"], workdir, ["0", "auto", "half"])
            budget_store = {"store": str(args.budget_store), "runs": runs}

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
    budget_table = [(label, result["fit_head_budgets"]) for label, result in results.items()]
    if budget_store is not None:
        budget_table.append((budget_store["store"], budget_store["runs"]))
    print_budget_table(budget_table)
    common.save_json(args.json, {"benchmark": "memory", "machine": machine, "import_floor_mib": floor,
                                 "scale": args.scale, "results": results, "budget_store": budget_store,
                                 "ratios": {r[0]: r[3] for r in rows}})


if __name__ == "__main__":
    main()
