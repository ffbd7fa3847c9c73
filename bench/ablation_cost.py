"""What a 9-cell `pathseg ablate` costs against the same cells run one `pathseg fit-head` at a time.

Target (issue 13): a sweep of 9 cells costs no more than 9.5x one fit-head, and its memory stays flat.
In one run, each in a fresh process with the same store:

  1. `pathseg fit-head` on one cell (t50 up1, seed 0), timed from the command line to exit; then
     `pathseg evaluate` of that run, which a hand-made sweep also needs for its test scores;
  2. `pathseg ablate --grid each --no-baseline --seeds 1` over 3 timesteps x 3 blocks = 9 cells, whose
     runs are each a fit-head plus scoring val and test;
  3. peak RSS of each process (its own VmHWM; ru_maxrss would report the forked parent's peak), for the "flat
     memory" check: ablate's peak against the larger of two single fit-heads, t50 up1 and t50 up3.2 (the cell
     with the largest maps), so growth over the sweep is told apart from one cell's bigger maps.

The store is a synthetic one extracted here (--train-images sizes it), or an existing one (--store, e.g. the
full GlaS tiny store, with --data-root unused: stage 2 reads only the store).

    python bench/ablation_cost.py --json bench/results/ablation_cost.json
    python bench/ablation_cost.py --store cache/glas-tiny-....zarr --epochs 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from _common import add_output_options, print_table, save_json, start, synthetic_config, verdict, work_directory

CHILD = """
import sys, time, json
def peak_mib():  # VmHWM: this process only; ru_maxrss would carry the forked parent's peak across exec
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) / 1024
from pathseg.cli import main
sys.argv = ["pathseg", *sys.argv[1:]]
started = time.perf_counter()
try:
    main()
except SystemExit as done:
    if done.code:
        raise
print(json.dumps({"seconds": time.perf_counter() - started,
                  "peak_rss_mib": peak_mib()}))
"""


def pathseg(*args: str) -> dict:
    """One CLI command in a fresh interpreter: wall seconds (interpreter start included) and peak RSS."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"pathseg {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_seconds"] = time.perf_counter() - started
    return result


def make_store(work: Path, train_images: int) -> Path:
    from pathseg.extract.runner import run_extraction

    config = synthetic_config(work, {"dataset.synthetic.train": train_images, "dataset.synthetic.val": 2,
                                     "dataset.synthetic.test": 4, "extract.timesteps": [50, 150, 250],
                                     "extract.blocks": ["up1", "up2.2", "up3.2"]})
    return run_extraction(config, show_progress=False).store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=None, help="an existing store with t50/150/250 x up1/up2.2/up3.2")
    parser.add_argument("--train-images", type=int, default=16, help="synthetic train images when no --store")
    parser.add_argument("--epochs", type=int, default=3)
    add_output_options(parser, "the store and the runs")
    args = parser.parse_args()
    machine = start()
    with work_directory(args.workdir, "pathseg-ablation-cost-") as work:
        store = Path(args.store) if args.store else make_store(work, args.train_images)
        common = ["--store", str(store), "--epochs", str(args.epochs), "--set", "evaluate.overlays=0", "-q"]
        single_runs, sweep_runs = work / "runs-single", work / "runs-sweep"
        run_dir = single_runs / "one"
        fit = pathseg("fit-head", *common, "--set", f"runs_dir={single_runs}", "--head-timesteps", "50",
                      "--head-blocks", "up1", "--run-dir", str(run_dir))
        evaluate = pathseg("evaluate", str(run_dir), "--store", str(store), "--set", "evaluate.overlays=0", "-q")
        largest = pathseg("fit-head", *common, "--set", f"runs_dir={single_runs}", "--head-timesteps", "50",
                          "--head-blocks", "up3.2", "--run-dir", str(single_runs / "largest"))
        sweep = pathseg("ablate", *common, "--set", f"runs_dir={sweep_runs}", "--timesteps", "50,150,250",
                        "--blocks", "up1,up2.2,up3.2", "--grid", "each", "--no-baseline", "--seeds", "1")
        again = pathseg("ablate", *common, "--set", f"runs_dir={sweep_runs}", "--timesteps", "50,150,250",
                        "--blocks", "up1,up2.2,up3.2", "--grid", "each", "--no-baseline", "--seeds", "1")
    ratio_fit = sweep["wall_seconds"] / fit["wall_seconds"]
    ratio_manual = sweep["wall_seconds"] / (fit["wall_seconds"] + evaluate["wall_seconds"])
    memory = sweep["peak_rss_mib"] / max(fit["peak_rss_mib"], largest["peak_rss_mib"])
    rows = [
        ["fit-head, 1 cell", fit["wall_seconds"], fit["peak_rss_mib"]],
        ["evaluate, 1 run (val + test)", evaluate["wall_seconds"], evaluate["peak_rss_mib"]],
        ["fit-head, the largest cell (t50 up3.2)", largest["wall_seconds"], largest["peak_rss_mib"]],
        ["ablate, 9 cells (fit + score each)", sweep["wall_seconds"], sweep["peak_rss_mib"]],
        ["ablate again (all reused)", again["wall_seconds"], again["peak_rss_mib"]],
    ]
    print_table(f"ablation cost ({args.epochs} epochs per run, store {store.name})",
                ["command", "wall s", "peak RSS MiB"], rows)
    print(f"\n9-cell sweep / one fit-head: {ratio_fit:.2f}x  {verdict(ratio_fit, 9.5, at_least=False)}")
    print(f"9-cell sweep / one fit-head + evaluate (a hand-made cell): {ratio_manual:.2f}x")
    print(f"peak RSS, sweep / the larger single fit-head: {memory:.2f}x  {verdict(memory, 1.2, at_least=False)}")
    save_json(args.json, {"machine": machine, "epochs": args.epochs, "store": str(store), "fit_head": fit,
                          "evaluate": evaluate, "fit_head_largest": largest, "ablate": sweep, "ablate_again": again,
                          "ratio_sweep_to_fit": ratio_fit, "ratio_sweep_to_fit_and_evaluate": ratio_manual,
                          "ratio_peak_rss": memory})


if __name__ == "__main__":
    main()
