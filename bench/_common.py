"""Helpers shared by the `bench/` scripts: machine facts, small synthetic configs, timing, tables and JSON output.

Not a benchmark itself; each `bench/NAME.py` imports it (Python puts the script's folder on sys.path first).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from pathseg.config import PipelineConfig, load_config


def passive_omp() -> None:
    """Re-run this script with OMP_WAIT_POLICY=PASSIVE unless the variable is already set.

    On a machine shared with other busy processes, OpenMP's default spin-waiting makes torch's
    intra-op barriers wait for descheduled threads: a tiny-UNet forward measured 0.8 s with PASSIVE
    and 1.6-28 s without, on the same 2 cores. libgomp reads the variable once, when torch loads,
    hence the re-exec. Set OMP_WAIT_POLICY yourself (e.g. ACTIVE) to measure the default instead.
    """
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.execv(sys.executable, [sys.executable, *sys.argv])


def add_output_options(parser: argparse.ArgumentParser, workdir_holds: str) -> None:
    """--workdir and --json, which every benchmark takes."""
    parser.add_argument("--workdir", default=None,
                        help=f"where {workdir_holds} go (default: a temporary directory, removed afterwards)")
    parser.add_argument("--json", default=None, help="write all results to this JSON file")


def start() -> dict[str, Any]:
    """What every benchmark does first: passive OpenMP waits (re-exec), then record and print the machine."""
    passive_omp()
    machine = machine_info()
    print(f"machine: {machine}")
    return machine


def machine_info() -> dict[str, Any]:
    """What a reader needs to compare numbers: cores, CPU model, RAM, torch, and how busy the machine was."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_gib = round(int(line.split()[1]) / 2**20, 1)
                break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "ram_gib": ram_gib,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "git": git_state(),
    }


def git_state() -> str:
    """The commit measured, and whether project files had uncommitted changes (benchmarks measure the tree)."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    changed = sorted(line[3:] for line in dirty if line.strip())
    return head + (f" + uncommitted changes in {', '.join(changed)}" if changed else "")


def synthetic_config(workdir: Path, overrides: dict[str, Any]) -> PipelineConfig:
    """A config on generated data and the CPU, with no split unless asked: benchmarks size every split themselves."""
    values: dict[str, Any] = {
        "cache_dir": str(workdir / "cache"),
        "runs_dir": str(workdir / "runs"),
        "dataset.name": "synthetic",
        "dataset.synthetic.train": 1,
        "dataset.synthetic.val": 0,
        "dataset.synthetic.test": 0,
        "extract.device": "cpu",
        "train.device": "cpu",
    }
    values.update(overrides)
    return load_config(None, values)


@contextmanager
def work_directory(path: str | None, prefix: str) -> Iterator[Path]:
    """`path` when given (kept afterwards, for inspection), else a temporary directory removed at the end."""
    if path:
        directory = Path(path)
        directory.mkdir(parents=True, exist_ok=True)
        yield directory
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


def fresh(path: Path) -> Path:
    """`path` removed if present: every timed extraction writes a store that does not exist yet."""
    if path.exists():
        shutil.rmtree(path)
    return path


def timed(function: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = function()
    return time.perf_counter() - started, result


def bytes_under(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def fmt(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    if value == 0 or abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain aligned text table, readable in a terminal and pasteable into Markdown."""
    cells = [[fmt(value) for value in row] for row in rows]
    widths = [max(len(str(c)), *(len(r[i]) for r in cells)) if cells else len(str(c)) for i, c in enumerate(columns)]
    print(f"\n{title}")
    print("| " + " | ".join(str(c).ljust(w) for c, w in zip(columns, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) + " |")


def verdict(value: float, target: float, at_least: bool) -> str:
    met = value >= target if at_least else value <= target
    sign = ">=" if at_least else "<="
    return f"{'MET' if met else 'MISSED'} (target {sign} {target:g})"


def save_json(path: str | None, payload: dict[str, Any]) -> None:
    if not path:
        return
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"\nresults written to {out}")
