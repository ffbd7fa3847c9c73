"""`paper_table.md`: the ablation in PathSegDiff's own format, one row per method, each chosen on validation.

The paper compares methods (its diffusion features, supervised FCN-8s and U-Net) by test accuracy, mIoU and
Dice; GlaS is scored by object F1 as well. A method here is every diffusion cell together (the ablation's
choice among them), or one named baseline (z0, an encoder, rgb, a supervised network) with its swept
settings. Within each method, validation alone picks the row, so no figure is the best of several test scores.
"""

from __future__ import annotations

from pathseg.train_head.ablation_grid import Cell
from pathseg.train_head.leaderboard import CellSummary, markdown, ranked

from pathseg.store import is_z0, pair_label
from pathseg.store.names import is_encoder

COLUMNS = {"pixel_accuracy": "accuracy", "miou": "mIoU", "mean_dice": "Dice", "object_f1": "object F1",
           "inst_f1": "inst F1"}
DIFFUSION = "diffusion features (LDM decoder)"


def method_of(cell: Cell) -> str:
    if cell.baseline:
        return cell.baseline
    if all(is_z0(b) for _, b in cell.pairs):
        return "z0 (first-stage latent)"
    if all(is_encoder(b) for _, b in cell.pairs):
        return " + ".join(pair_label(t, b) for t, b in cell.pairs)
    return DIFFUSION


def _pm(summary: CellSummary, split: str, metric: str) -> str:
    mean, std = summary.stats.get((split, metric), (None, None))
    return "-" if mean is None else f"{mean:.3f} ± {std:.3f}"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def paper_table(summaries: list[CellSummary], val_split: str, test_splits: list[str], select_on: str,
                random_encoders: set[str]) -> str:
    """Markdown: per test split, one row per method (its cell chosen on `val_split` by `select_on`)."""
    methods: dict[str, list[CellSummary]] = {}
    for summary in summaries:
        methods.setdefault(method_of(summary.cell), []).append(summary)
    chosen = {method: ranked(group, val_split, select_on)[0] for method, group in methods.items()}
    order = sorted(chosen.values(), key=lambda s: -(s.mean(val_split, select_on) or float("-inf")))
    parts = [
        "# Methods in the paper's format",
        f"Each row is one method; where it has several cells (diffusion blocks and timesteps, swept settings), "
        f"{val_split} {select_on} chose one, and its test scores are shown. Mean ± sample std over seeds. "
        "Feature seconds are per tile (0: the network reads pixels); head seconds are per training epoch.",
    ]
    for split in test_splits or [val_split]:
        headers = ["method", "chosen cell", "seeds", *(f"{split} {label}" for label in COLUMNS.values()),
                   "feature s/tile", "head s/epoch"]
        rows = []
        for summary in order:
            method = method_of(summary.cell)
            flagged = any(name in method for name in random_encoders)
            rows.append([method + (" (random weights)" if flagged else ""), summary.cell.name,
                         str(len(summary.seeds)), *(_pm(summary, split, m) for m in COLUMNS),
                         _seconds(summary.feature_seconds), _seconds(summary.head_seconds)])
        parts += [f"## {split}", markdown(headers, rows)]
    return "\n\n".join(parts) + "\n"
