"""What a part reports, the machine it ran on, and the two files: `gpu_suite.json` and `gpu_suite.md`.

The Markdown is what goes into docs/benchmarks.md as it is: a header naming the command, device, driver,
versions and date, one row per part with its status, and one row per figure with its unit. A part either
reports figures or says why it stopped; a part that finishes with neither is marked failed, so nothing is
ever silently missing.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

COMPLETE = "complete"
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Figure:
    figure: str
    value: float | int | None
    unit: str
    note: str = ""


@dataclass
class Part:
    """One part's outcome. `status` is complete, `stopped at limit ...`, `skipped: ...` or `failed: ...`."""

    name: str
    limit_s: float = 0.0
    seconds: float = 0.0
    status: str = COMPLETE
    figures: list[Figure] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def add(self, figure: str, value: float | int | None, unit: str, note: str = "") -> None:
        self.figures.append(Figure(figure, value, unit, note))

    def stop(self, status: str) -> None:
        """The first stop is the one reported: later steps of a stopped part are not run."""
        if self.status == COMPLETE:
            self.status = status

    @property
    def failed(self) -> bool:
        return self.status.startswith("failed")

    def settle(self) -> None:
        """A part that says it completed but measured nothing has failed: never a silent gap in the table."""
        if self.status == COMPLETE and not self.figures:
            self.status = "failed: completed without a figure"


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator is not None and denominator else None


def _command_output(command: list[str]) -> str | None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=True, cwd=ROOT)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def driver_version() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:  # noqa: BLE001 - no library or no driver: ask nvidia-smi
        output = _command_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        return output.splitlines()[0] if output else None


def environment(device: torch.device) -> dict[str, Any]:
    """Everything a reader needs to place the figures: device, driver, versions, the code measured."""
    cuda = device.type == "cuda"
    cpu = platform.processor() or "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    commit = _command_output(["git", "rev-parse", "--short", "HEAD"])
    changed = _command_output(["git", "status", "--porcelain", "--untracked-files=no"])
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else f"CPU: {cpu}",
        "gpu_memory_gib": round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1) if cuda else None,
        "driver": driver_version() if cuda else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "python": platform.python_version(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "pathseg_commit": (commit + (" + uncommitted changes" if changed else "")) if commit else "unknown",
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def fmt(value: Any) -> str:
    """Three significant figures, thousands separated: what a table reader compares."""
    if value is None:
        return "null"
    if isinstance(value, bool) or isinstance(value, int):
        return f"{value:,}" if not isinstance(value, bool) else str(value)
    if isinstance(value, float):
        if value == 0 or abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.3g}"
    return str(value)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    versions = f"{env['torch']} / {env['cuda'] or '-'} / {env['cudnn'] or '-'}"
    lines = [
        f"#### GPU suite on {env['device_name']}, {result['date']}",
        "",
        f"`{result['command']}`",
        "",
        "| | |",
        "|---|---|",
        f"| device | {_cell(env['device_name'])} (`{env['device']}`"
        + (f", {env['gpu_memory_gib']} GiB" if env["gpu_memory_gib"] else "") + ") |",
        f"| driver | {env['driver'] or '-'} |",
        f"| torch / CUDA / cuDNN | {versions} |",
        f"| Python | {env['python']} ({env['cpu_cores']} CPU cores, {env['torch_threads']} torch threads) |",
        f"| pathseg | {env['pathseg_commit']} |",
        f"| mode | {result['mode']}, budget {result['budget_s']:.0f} s, ran {result['wall_s']:.0f} s |",
        "",
        "| part | status | seconds | limit (s) |",
        "|---|---|---:|---:|",
    ]
    lines += [f"| {p['name']} | {_cell(p['status'])} | {p['seconds']:.1f} | {p['limit_s']:.0f} |"
              for p in result["parts"]]
    lines += ["", "| part | figure | value | unit | note |", "|---|---|---:|---|---|"]
    for p in result["parts"]:
        lines += [f"| {p['name']} | {_cell(f['figure'])} | {fmt(f['value'])} | {_cell(f['unit'])} | "
                  f"{_cell(f['note'])} |" for f in p["figures"]]
    return "\n".join(lines) + "\n"


def build_result(command: str, mode: str, budget_s: float, wall_s: float, env: dict[str, Any],
                 parts: list[Part], settings: dict[str, Any]) -> dict[str, Any]:
    return {
        "suite": "pathseg bench/gpu_suite.py",
        "schema": 1,
        "command": command,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "mode": mode,
        "budget_s": budget_s,
        "wall_s": round(wall_s, 1),
        "environment": env,
        "settings": settings,
        "parts": [asdict(p) for p in parts],
    }


def write(out: Path, result: dict[str, Any]) -> tuple[Path, Path]:
    """Both files, each written whole (a reader never sees half a table)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "gpu_suite.json", out / "gpu_suite.md"
    for path, text in zip(paths, (json.dumps(result, indent=2, default=str) + "\n", markdown(result)), strict=True):
        partial = path.with_name(path.name + ".partial")
        partial.write_text(text)
        partial.replace(path)
    return paths
