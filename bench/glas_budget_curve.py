"""Issue 25 item 2: GlaS mIoU of the val-chosen cell against pretraining minutes, budgets as snapshots of one run.

One UNet run on a fixed first stage (`pretrain.first_stage_from`) is extended budget by budget (`--steps`). After
each budget the backbone is copied aside, GlaS train/val/testA are extracted with it, and `pathseg ablate` fits
and scores the heads: 3 seeds, chosen on val, test A reported. z0 (the frozen first stage's latent) is the same at
every budget, so its heads are fitted at the first budget only and it stays a candidate of each. Every step reuses
what a previous call finished, so rerunning after a stop resumes. Writes budget_curve.json and budget_curve.png.

    python bench/glas_budget_curve.py --workdir W --first-stage pt/fs-kl --out pt/unet-kl --budgets 100,200,400,600 \
        [--set pretrain.min_snr_gamma=5 ...]

Pretraining minutes are the reused first stage's phase-1 seconds (from its record) plus the UNet seconds of the
snapshot. Run it on a quiet machine: the seconds are wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DATA = "../shared/data/glas"
INSTANCE_GRIDS = ["--set", "instances.marker_thresholds=[0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9]",
                  "--set", "instances.min_areas=[0,100,250,500,1000,1500,2000,3000,4000]"]


def pathseg(*args: str) -> str:
    """Run one pathseg command, echo its output, stop the script in one line if it fails."""
    print("$ pathseg " + " ".join(args), flush=True)
    command = shutil.which("pathseg") or str(Path(sys.executable).with_name("pathseg"))  # the venv's, unactivated
    done = subprocess.run([command, *args], capture_output=True, text=True)
    sys.stdout.write(done.stdout[-4000:] + done.stderr[-4000:])
    if done.returncode:
        sys.exit(f"pathseg {args[0]} failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    return done.stdout + done.stderr  # pathseg says where it wrote on stderr


def scores(ablation: dict, cell: str) -> dict:
    """Mean and sample std over seeds of one cell's val/testA mIoU and decoded object F1."""
    runs = [r for r in ablation["runs"] if r["cell"] == cell]
    out: dict = {"cell": cell, "seeds": len(runs)}
    for split in ("val", "testA"):
        miou = [r["splits"][split]["miou"] for r in runs]
        f1 = [(r["splits"][split].get("objects_decoded") or r["splits"][split]["objects"])["object_f1"] for r in runs]
        out[f"{split}_miou"] = [float(np.mean(miou)), float(np.std(miou, ddof=1)) if len(miou) > 1 else 0.0]
        out[f"{split}_object_f1"] = [float(np.mean(f1)), float(np.std(f1, ddof=1)) if len(f1) > 1 else 0.0]
    return out


def budget_point(args: argparse.Namespace, steps: int, z0: dict | None) -> dict:
    """One budget's point; `z0` the scores of the first budget's z0 heads (None: fit them here)."""
    common = ["--dataset", "glas", "--data-root", DATA]
    snapshot = Path(f"{args.out}-{steps}")
    if not (snapshot / "pretrain.json").is_file():  # a rerun after a stop skips the budgets it finished
        pathseg("pretrain", *common, "--preset", "tiny", "--out", args.out, "--steps", str(steps),
                "--set", f"pretrain.first_stage_from={args.first_stage}", "--set", "pretrain.samples=4",
                "--set", f"pretrain.checkpoint_every={args.checkpoint_every}", *args.set, "-q")
        shutil.rmtree(snapshot, ignore_errors=True)
        shutil.copytree(args.out, snapshot)
    record = json.loads((snapshot / "pretrain.json").read_text())
    store = f"{snapshot}.zarr"
    extraction = ["--timesteps", args.timesteps, "--blocks", args.blocks, "--store", store]
    started = time.perf_counter()
    pathseg("extract", *common, "--backbone", str(snapshot), *extraction, "-q")
    extract_seconds = time.perf_counter() - started  # of this call: about 0 when a rerun finds the store done
    ablate = pathseg("ablate", *common, "--backbone", str(snapshot), *extraction, "--grid", args.grid,
                     "--seeds", str(args.seeds), "--epochs", str(args.epochs),
                     *(["--baselines", "z0"] if z0 is None else ["--no-baseline"]),
                     *INSTANCE_GRIDS, "-q")
    folder = re.findall(r"outputs in (\S+)", ablate)[-1]
    ablation = json.loads((Path(folder) / "ablation.json").read_text())
    first_stage_seconds = (record.get("first_stage_from") or {}).get("seconds") or record["seconds"]["first_stage"]
    cells = sorted({r["cell"] for r in ablation["runs"]})
    return {
        "unet_steps": record["steps"]["unet"],
        "pretraining_minutes": (first_stage_seconds + record["seconds"]["unet"]) / 60,
        "first_stage_minutes": first_stage_seconds / 60,
        "unet_minutes": record["seconds"]["unet"] / 60,
        "unet_loss": record["final_losses"]["unet"],
        "weights_digest": record["weights_digest"],
        "ablation": folder,
        "cells": [scores(ablation, cell) for cell in cells] + ([z0] if z0 is not None else []),
        "head_seconds": ablation["seconds"],
        "extract_seconds": extract_seconds,
    }


def plot(points: list[dict], path: Path, reference: dict[str, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [p["pretraining_minutes"] for p in points]
    figure, axis = plt.subplots(figsize=(6, 4))
    for split, marker in (("val", "o"), ("testA", "s")):
        mean = [p["chosen"][f"{split}_miou"][0] for p in points]
        std = [p["chosen"][f"{split}_miou"][1] for p in points]
        axis.errorbar(minutes, mean, yerr=std, marker=marker, capsize=3, label=f"{split} mIoU, val-chosen cell")
    for label, value in reference.items():
        axis.axhline(value, linestyle="--", linewidth=1, color="grey")
        axis.annotate(label, (min(minutes), value), textcoords="offset points", xytext=(0, 3), fontsize=8)
    for p, m in zip(points, minutes, strict=True):
        axis.annotate(f"{p['unet_steps']} UNet steps", (m, p["chosen"]["testA_miou"][0]), textcoords="offset points",
                      xytext=(4, -12), fontsize=7)
    axis.set_xlabel("pretraining minutes (first stage + UNet), this 2-core CPU")
    axis.set_ylabel("mIoU")
    axis.set_title("GlaS: what pretraining minutes buy (tiny preset, 3 head seeds)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=".", help="folder beside ../shared/data/glas that holds the runs")
    parser.add_argument("--first-stage", required=True, help="backbone directory whose first stage is reused")
    parser.add_argument("--out", required=True, help="the UNet run's backbone directory; snapshots go beside it")
    parser.add_argument("--budgets", required=True, help="UNet steps at each budget, comma-separated, ascending")
    parser.add_argument("--timesteps", default="50")
    parser.add_argument("--blocks", default="up1,up2.2,up3.2")
    parser.add_argument("--grid", default="all")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument("--reference", action="append", default=[], metavar="LABEL=MIOU",
                        help="a horizontal line on the plot (e.g. 'random tiny testA=0.393')")
    parser.add_argument("--set", action="append", default=[], metavar="pretrain.KEY=VALUE")
    args = parser.parse_args()
    args.set = [item for value in args.set for item in ("--set", value)]
    os.chdir(args.workdir)
    points: list[dict] = []
    for steps in args.budgets.split(","):
        z0 = next((c for c in points[0]["cells"] if c["cell"] == "z0"), None) if points else None
        point = budget_point(args, int(steps), z0)
        point["chosen"] = max(point["cells"], key=lambda cell: cell["val_miou"][0])  # chosen on val, as ablate does
        point["selected"] = point["chosen"]["cell"]
        points.append(point)
    result = Path(f"{args.out}-budget_curve.json")
    result.write_text(json.dumps({"first_stage": args.first_stage, "settings": args.set, "points": points}, indent=1))
    reference = {label: float(value) for label, value in (item.rsplit("=", 1) for item in args.reference)}
    plot(points, Path(f"{args.out}-budget_curve.png"), reference)
    print(f"wrote {result} and {args.out}-budget_curve.png")
    for p in points:
        c = p["chosen"]
        print(f"{p['unet_steps']:>5} UNet steps  {p['pretraining_minutes']:6.1f} min  {p['selected']:<36} "
              f"val {c['val_miou'][0]:.3f} ± {c['val_miou'][1]:.3f}  testA {c['testA_miou'][0]:.3f} ± "
              f"{c['testA_miou'][1]:.3f}")


if __name__ == "__main__":
    main()
