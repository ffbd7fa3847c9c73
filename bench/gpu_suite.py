"""Every figure only a GPU can give, in one short run that fits a lent GPU's window with time to rerun it.

    python3 bench/gpu_suite.py --device cuda --out OUT          # full: about 3 minutes on one H100/H200
    python3 bench/gpu_suite.py --device cpu --quick --out OUT   # the smoke run CI does: under a minute

Parts, each under its own time limit (shares of --budget-s; what one part leaves unused goes to the next),
each stopping at its limit and saying what it reached rather than overrunning:

  extraction   paper-random at bf16 through `run_extraction` against the bare encoder + UNet forwards in the
               same run; peak GPU memory at the default batch and at the largest batch that fits
  heads        fit-head epochs (conv, linear, pixel-mlp) streaming and from RAM against the same batches held
               on the GPU; GPU utilisation sampled during the epoch
  predict      `predict` on a generated pyramidal slide against the bare backbone + head forwards; peak host
               and GPU memory
  pretrain     steps/s of the tiny, small and paper presets at bf16, with peak GPU memory
  compile      the extraction again with `extract.compile`, in a child process stopped at the limit

Writes OUT/gpu_suite.json and OUT/gpu_suite.md (the table for docs/benchmarks.md, as it is). Exits 1 when a
part failed, 2 on bad arguments. Runs pathseg's own code; nothing is fetched from the network.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path

# On a shared CPU, OpenMP's spin-waiting makes torch's barriers wait on descheduled threads (docs/benchmarks.md);
# libgomp reads this once, when torch loads, so it is set before anything imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Each part's share of the budget, in the order they run. A part's limit is its share of what is left, so what
# one leaves unused goes to those after it; compile runs last (full mode) and gets all that remains. On a CPU the
# quick run's heads are the slow part (the pixel-MLP ensemble), on a GPU the paper network.
SHARES = {
    "full": {"extraction": 0.27, "heads": 0.22, "predict": 0.13, "pretrain": 0.15, "compile": 0.23},
    "quick": {"extraction": 0.20, "heads": 0.45, "predict": 0.15, "pretrain": 0.20, "compile": 0.0},
}
DEFAULT_BUDGET_S = {"full": 180.0, "quick": 45.0}
MIN_PART_S = 2.0  # a part given less than this is not started: every part builds a model or reads a store first


class OneLineParser(argparse.ArgumentParser):
    """Bad arguments: one line naming the problem, exit 2 (`--help` still prints the whole usage)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"gpu_suite: {message} (see --help)\n")
        raise SystemExit(2)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = OneLineParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny backbone and shapes, tiny pretrain preset only, no compile: the CI smoke run")
    parser.add_argument("--out", default=".", help="folder for gpu_suite.json and gpu_suite.md (default .)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="seconds for all parts together (default 180 full, 45 quick)")
    parser.add_argument("--workdir", default=None, help="keep the data, stores and runs here (default: temporary)")
    args = parser.parse_args(argv)
    if args.budget_s is not None and args.budget_s <= 0:
        parser.error(f"--budget-s must be positive, not {args.budget_s:g}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        parser.error(f"--out {args.out} exists and is not a folder")
    return args


def pick_device(name: str):  # -> torch.device
    """The device, or one line and exit 2: a suite that cannot run its device must not start."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        sys.stderr.write(f"gpu_suite: --device {name!r} is not a torch device (use cuda, cuda:N or cpu)\n")
        raise SystemExit(2) from None
    if device.type not in ("cuda", "cpu"):
        sys.stderr.write(f"gpu_suite: --device {name!r}: only cuda and cpu are measured\n")
        raise SystemExit(2)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.stderr.write(f"gpu_suite: --device {name} but torch {torch.__version__} sees no CUDA GPU; "
                         "use --device cpu --quick for the CPU smoke run\n")
        raise SystemExit(2)
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        sys.stderr.write(f"gpu_suite: --device {name} but only {torch.cuda.device_count()} GPU(s) are visible\n")
        raise SystemExit(2)
    return torch.device("cuda", device.index or 0) if device.type == "cuda" else device


def check_pathseg() -> None:
    """pathseg's stages are packaged under pathseg.* only once installed (pyproject's package-dir)."""
    import importlib.util

    try:
        found = importlib.util.find_spec("pathseg.extract") is not None
    except ImportError:
        found = False
    if not found:
        sys.stderr.write("gpu_suite: pathseg is not installed here (pathseg.extract is missing); from the repository "
                         "root: pip install -e . (or, offline, README 'The GPU suite')\n")
        raise SystemExit(2)


def run_parts(ws, budget_s: float) -> list:
    """Each part under its share of what is left, in order; an exception fails that part, not the suite."""
    import torch
    from gpu_suite.compiled import measure_compiled
    from gpu_suite.extraction import measure_extraction
    from gpu_suite.heads import measure_heads
    from gpu_suite.measure import Clock
    from gpu_suite.pretraining import measure_pretraining
    from gpu_suite.report import Part
    from gpu_suite.slide import measure_predict

    measures = {"extraction": measure_extraction, "heads": measure_heads, "predict": measure_predict,
                "pretrain": measure_pretraining, "compile": measure_compiled}
    suite = Clock(budget_s)
    parts = []
    shares = SHARES[ws.plan.mode]
    for index, (name, share) in enumerate(shares.items()):
        later = sum(list(shares.values())[index:])
        limit = max(0.0, suite.left()) * share / later if later else 0.0
        part = Part(name, limit_s=round(limit, 1))
        print(f"[gpu_suite] {name}: up to {limit:.0f} s", file=sys.stderr, flush=True)
        begun = time.perf_counter()
        try:
            if limit < MIN_PART_S and share > 0:
                part.stop(f"stopped at limit before it started: {limit:.0f} s of the budget were left")
            else:
                measures[name](ws, Clock(limit), part)
        except Exception as error:  # noqa: BLE001 - reported in the table, the suite goes on
            part.details["traceback"] = traceback.format_exc()[-4000:]
            part.stop(f"failed: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
        part.seconds = round(time.perf_counter() - begun, 2)
        part.settle()
        print(f"[gpu_suite] {name}: {part.status} ({part.seconds:.1f} s, {len(part.figures)} figures)",
              file=sys.stderr, flush=True)
        parts.append(part)
        if ws.device.type == "cuda":
            torch.cuda.empty_cache()
    return parts


def main(argv: list[str]) -> int:
    if argv[:1] == ["--child-compile"]:
        from gpu_suite.compiled import child_main

        child_main(argv[1])
        return 0
    args = parse_args(argv)
    device = pick_device(args.device)
    check_pathseg()
    from dataclasses import asdict

    import torch
    from gpu_suite.report import build_result, environment, write
    from gpu_suite.workspace import FULL, QUICK, Workspace

    plan = QUICK if args.quick else FULL
    budget = args.budget_s if args.budget_s is not None else DEFAULT_BUDGET_S[plan.mode]
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    torch.manual_seed(0)
    env = environment(device)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pathseg-gpu-suite-") as tmp:
        root = Path(args.workdir) if args.workdir else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        parts = run_parts(Workspace(root, device, plan), budget)
    result = build_result(command, plan.mode, budget, time.perf_counter() - started, env, parts,
                          {"plan": asdict(plan), "part_shares": SHARES[plan.mode]})
    json_path, md_path = write(Path(args.out), result)
    print(md_path.read_text())
    print(f"written: {json_path} and {md_path}", file=sys.stderr)
    return 1 if any(p.failed for p in parts) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
