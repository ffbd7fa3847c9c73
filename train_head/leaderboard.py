"""An ablation's results as tables: mean +/- std over seeds, the cell validation chose, and its test scores.

Selection uses the validation split only. Test scores are read for the chosen cell; the test scores of every
cell go in a separate table that says it must not be used to choose, because picking the best of N cells on
the test split reports the maximum of N noisy estimates, not a held-out figure.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pathseg.train_head.ablation_costs import feature_seconds_per_tile, head_seconds_per_epoch
from pathseg.train_head.ablation_grid import Cell

from pathseg.store import FeatureStore

# obj F1: connected components of the predicted map; inst F1: instances decoded by pathseg.metrics.instances (the
# watershed from interior markers for a contour head), each with its own val-chosen minimum area
METRICS = {"miou": "mIoU", "mean_dice": "Dice", "object_f1": "obj F1", "inst_f1": "inst F1"}
STATS = [*METRICS, "pixel_accuracy"]  # what summaries hold: the tables' figures, and accuracy for paper_table.md
OBJECT_METRICS = {"object_f1", "inst_f1"}  # only a store with instances (GlaS, synthetic) has them
_OBJECT_SOURCES = {"object_f1": "objects", "inst_f1": "objects_decoded"}


def metric_value(split_metrics: dict, key: str) -> float | None:
    """One figure of an evaluate report's split; None where the split has no such figure (no objects)."""
    if key in _OBJECT_SOURCES:
        return split_metrics.get(_OBJECT_SOURCES[key], {}).get("object_f1")
    return split_metrics.get(key)


@dataclass
class RunScore:
    cell: Cell
    seed: int
    run_dir: Path
    splits: dict  # split -> evaluate's metrics of that split
    computed: bool  # False when the run and its scores were reused from an earlier sweep


@dataclass
class CellSummary:
    cell: Cell
    seeds: list[int]
    stats: dict[tuple[str, str], tuple[float | None, float | None]]  # (split, metric) -> (mean, std)
    feature_seconds: float | None = None  # per tile, to compute the cell's inputs (0 for pixels)
    head_seconds: float | None = None  # per epoch of training, mean over seeds

    def mean(self, split: str, metric: str) -> float | None:
        return self.stats.get((split, metric), (None, None))[0]


def summarise(cells: list[Cell], scores: list[RunScore], splits: list[str],
              store: FeatureStore | None = None) -> list[CellSummary]:
    """Mean and sample std over seeds (std 0 with one seed) of every figure, per cell, and what it cost."""
    summaries = []
    for cell in cells:
        runs = [s for s in scores if s.cell == cell]
        stats: dict[tuple[str, str], tuple[float | None, float | None]] = {}
        for split in splits:
            for metric in STATS:
                values = [metric_value(r.splits[split], metric) for r in runs if split in r.splits]
                values = [v for v in values if v is not None]
                if values:
                    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
                    stats[(split, metric)] = (float(np.mean(values)), std)
        epochs = [head_seconds_per_epoch(r.run_dir) for r in runs]
        known = [e for e in epochs if e is not None]
        summaries.append(CellSummary(cell, [r.seed for r in runs], stats,
                                     feature_seconds_per_tile(store, cell) if store is not None else None,
                                     float(np.mean(known)) if known else None))
    return summaries


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def ranked(summaries: list[CellSummary], val_split: str, select_on: str) -> list[CellSummary]:
    """Best validation mean first; cells without the figure last, in grid order."""
    def key(summary: CellSummary) -> float:
        value = summary.mean(val_split, select_on)
        return -math.inf if value is None else value

    return sorted(summaries, key=key, reverse=True)


def _pm(stats: tuple[float | None, float | None] | None) -> str:
    if stats is None or stats[0] is None:
        return "-"
    return f"{stats[0]:.3f} ± {stats[1]:.3f}"


def leaderboard_rows(order: list[CellSummary], val_split: str, test_splits: list[str]) -> tuple[list[str], list]:
    """All cells on validation; test columns only for the chosen (first) cell."""
    headers = ["rank", "cell", "seeds", "feature s/tile", "head s/epoch"]
    headers += [f"{val_split} {label}" for label in METRICS.values()]
    headers += [f"{split} {label}" for split in test_splits for label in METRICS.values()]
    rows = []
    for rank, summary in enumerate(order, start=1):
        row = [str(rank), summary.cell.name, str(len(summary.seeds)), _seconds(summary.feature_seconds),
               _seconds(summary.head_seconds)]
        row += [_pm(summary.stats.get((val_split, m))) for m in METRICS]
        for split in test_splits:
            row += [_pm(summary.stats.get((split, m))) if rank == 1 else "" for m in METRICS]
        rows.append(row)
    return headers, rows


def test_rows(summaries: list[CellSummary], test_splits: list[str]) -> tuple[list[str], list]:
    """Every cell's test scores, in grid order (not ranked, so the table does not invite choosing on it)."""
    headers = ["cell", "seeds"] + [f"{split} {label}" for split in test_splits for label in METRICS.values()]
    rows = [[s.cell.name, str(len(s.seeds))] + [_pm(s.stats.get((split, m))) for split in test_splits for m in METRICS]
            for s in summaries]
    return headers, rows


def csv_text(headers: list[str], rows: list[list[str]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(headers)
    writer.writerows(rows)
    return buffer.getvalue()


def markdown(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def plain(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(lines)


def csv_numbers(order: list[CellSummary], val_split: str, selected: CellSummary) -> str:
    """The leaderboard as numbers (mean and std columns), for spreadsheets and plots of your own.

    Validation only: every cell's test figures in the table people sort would invite choosing on them; they are
    in test_all_cells.csv, and the chosen cell's in leaderboard.md and the printed table.
    """
    splits = [val_split]
    headers = ["cell", "features", "settings", "seeds", "selected", "feature_seconds_per_tile",
               "head_seconds_per_epoch"]
    headers += [f"{split}_{m}_{kind}" for split in splits for m in METRICS for kind in ("mean", "std")]
    rows = []
    for summary in order:
        row = [summary.cell.name, summary.cell.features,
               "; ".join(f"{k}={v}" for k, v in summary.cell.settings), len(summary.seeds), summary is selected,
               "" if summary.feature_seconds is None else f"{summary.feature_seconds:.6f}",
               "" if summary.head_seconds is None else f"{summary.head_seconds:.3f}"]
        for split in splits:
            for m in METRICS:
                mean, std = summary.stats.get((split, m), (None, None))
                row += ["" if mean is None else f"{mean:.6f}", "" if std is None else f"{std:.6f}"]
        rows.append(row)
    return csv_text(headers, [[str(c) for c in r] for r in rows])
