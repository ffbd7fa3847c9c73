"""The paper's ablation figure (timestep x block heatmap) and each metric against the timestep, as PNGs.

Drawn with matplotlib's Agg backend, so no display is needed; files are written atomically.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from pathseg.train_head.leaderboard import METRICS, CellSummary

from pathseg.files import atomic_write_bytes
from pathseg.store import is_z0, pair_label
from pathseg.store.names import has_timestep


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot


def _save(figure, path: Path) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    _pyplot().close(figure)
    atomic_write_bytes(path, buffer.getvalue())


def _by_settings(summaries: list[CellSummary]) -> dict[tuple, list[CellSummary]]:
    groups: dict[tuple, list[CellSummary]] = {}
    for summary in summaries:
        groups.setdefault(summary.cell.settings, []).append(summary)
    return groups


def _baseline(group: list[CellSummary], split: str, metric: str) -> float | None:
    z0 = [s for s in group if s.cell.single and is_z0(s.cell.single[1])]
    return z0[0].mean(split, metric) if z0 else None


def heatmap(summaries: list[CellSummary], timesteps: list[int], blocks: list[str], grid: str, split: str,
            metric: str, path: Path, note: str = "") -> bool:
    """Timestep x block (`each`) or map x map (`pairs`) of the mean over seeds; one panel per swept setting.

    Returns False (and writes nothing) for an `all` grid, which has one cell and nothing to map.
    """
    if grid == "all" or not blocks or not timesteps:
        return False
    pyplot = _pyplot()
    groups = _by_settings(summaries)
    maps = [(t, b) for t in timesteps for b in blocks]
    n_rows, n_columns = (len(timesteps), len(blocks)) if grid == "each" else (len(maps), len(maps))
    size = (2.0 + 1.3 * n_columns * len(groups), 1.6 + 0.8 * n_rows)
    figure, axes = pyplot.subplots(1, len(groups), figsize=size, squeeze=False)
    for axis, (settings, group) in zip(axes[0], groups.items(), strict=True):
        if grid == "each":
            values = np.full((len(timesteps), len(blocks)), np.nan)
            for s in group:
                if s.cell.single and has_timestep(s.cell.single[1]):
                    t, b = s.cell.single
                    values[timesteps.index(t), blocks.index(b)] = s.mean(split, metric) or np.nan
            rows, columns = [f"t={t}" for t in timesteps], blocks
        else:
            values = np.full((len(maps), len(maps)), np.nan)
            for s in group:
                if len(s.cell.pairs) == 2:
                    i, j = (maps.index(p) for p in s.cell.pairs)
                    values[i, j] = values[j, i] = s.mean(split, metric) or np.nan
            rows = columns = [pair_label(*p) for p in maps]
        image = axis.imshow(values, cmap="viridis", aspect="auto")
        axis.set_xticks(range(len(columns)), columns, rotation=30, ha="right")
        axis.set_yticks(range(len(rows)), rows)
        finite = values[np.isfinite(values)]
        middle = float(finite.mean()) if finite.size else 0.0
        for (i, j), value in np.ndenumerate(values):
            if np.isfinite(value):
                axis.text(j, i, f"{value:.3f}", ha="center", va="center", fontsize=8,
                          color="black" if value > middle else "white")
        baseline = _baseline(group, split, metric)
        title = f"{split} {METRICS[metric]}"
        if settings:
            title += "\n" + ", ".join(f"{k}={v}" for k, v in settings)
        if baseline is not None:
            title += f"\nz0 baseline (no diffusion): {baseline:.3f}"
        axis.set_title(title, fontsize=9)
        figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04)
    if note:
        figure.text(0.01, -0.02, note, fontsize=7, ha="left", va="top")
    _save(figure, path)
    return True


def lines(summaries: list[CellSummary], timesteps: list[int], blocks: list[str], split: str, path: Path) -> bool:
    """Each metric against the timestep, one line per block (and swept setting); z0 as a dashed level."""
    singles = [s for s in summaries if s.cell.single and has_timestep(s.cell.single[1])]
    if not singles or not timesteps:
        return False
    pyplot = _pyplot()
    metrics = [m for m in METRICS if any(s.mean(split, m) is not None for s in singles)]
    figure, axes = pyplot.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    for axis, metric in zip(axes[0], metrics, strict=True):
        for settings, group in _by_settings(summaries).items():
            suffix = f" [{', '.join(f'{k}={v}' for k, v in settings)}]" if settings else ""
            for block in blocks:
                points = [(s.cell.single[0], s.stats.get((split, metric))) for s in group
                          if s.cell.single and s.cell.single[1] == block]
                points = sorted((t, st) for t, st in points if st is not None and st[0] is not None)
                if points:
                    xs = [t for t, _ in points]
                    means = np.array([st[0] for _, st in points])
                    stds = np.array([st[1] or 0.0 for _, st in points])
                    line = axis.plot(xs, means, marker="o", label=block + suffix)[0]
                    axis.fill_between(xs, means - stds, means + stds, color=line.get_color(), alpha=0.15)
            baseline = _baseline(group, split, metric)
            if baseline is not None:
                axis.axhline(baseline, linestyle="--", color="gray", label="z0 (no diffusion)" + suffix)
        axis.set_xlabel("noise timestep t")
        axis.set_title(f"{split} {METRICS[metric]} (mean ± std over seeds)", fontsize=9)
        axis.set_xticks(timesteps)
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    _save(figure, path)
    return True
