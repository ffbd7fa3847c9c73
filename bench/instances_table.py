"""The GlaS instance table of docs/instances.md from one `pathseg ablate` directory (issue 23, item 7).

Reads `ablation.json` (every run's evaluate scores per split) and each run's `instances.json` (the decoding
values chosen on val), and writes, per cell and split, mean ± sample std over seeds of pixel mIoU and Dice
and of object F1, Dice and Hausdorff for both decodings: connected components of the predicted map with
their own val-chosen minimum area (`cc`), and the decoded instances (`inst`: the watershed from interior
markers for a contour head, components with holes filled for a semantic head). Nothing is recomputed.

    python bench/instances_table.py runs/<store>/ablate-<grid>-<key> [--json bench/results/FILE.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

FIGURES = [("mIoU", None, "miou"), ("Dice", None, "mean_dice"),
           ("cc F1", "objects", "object_f1"), ("cc Dice", "objects", "object_dice"),
           ("cc Hausdorff", "objects", "object_hausdorff"),
           ("inst F1", "objects_decoded", "object_f1"), ("inst Dice", "objects_decoded", "object_dice"),
           ("inst Hausdorff", "objects_decoded", "object_hausdorff")]


def _value(split: dict, group: str | None, key: str) -> float | None:
    source = split if group is None else split.get(group, {})
    value = source.get(key)
    return None if value is None else float(value)


def _pm(values: list[float], digits: int) -> str:
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"


def summarise(directory: Path) -> dict:
    record = json.loads((directory / "ablation.json").read_text())
    cells: dict[str, dict] = {}
    for run in record["runs"]:
        cell = cells.setdefault(run["cell"], {"settings": run["settings"], "runs": [], "chosen": []})
        cell["runs"].append(run)
        choice = Path(run["run"]) / "instances.json"
        if choice.exists():
            cell["chosen"].append(json.loads(choice.read_text())["chosen"])
    splits = list(record["runs"][0]["splits"]) if record["runs"] else []
    table = {}
    for name, cell in cells.items():
        rows = {}
        for split in splits:
            rows[split] = {label: [v for r in cell["runs"] if (v := _value(r["splits"][split], group, key)) is not None]
                           for label, group, key in FIGURES}
        table[name] = {"settings": cell["settings"], "seeds": len(cell["runs"]), "splits": rows,
                       "chosen": cell["chosen"]}
    return {"ablation": str(directory), "store": record["store"], "splits": splits, "cells": table}


def markdown(summary: dict) -> str:
    headers = ["cell", "split", *[label for label, _, _ in FIGURES]]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * len(FIGURES)) + "|"]
    for name, cell in summary["cells"].items():
        for split, values in cell["splits"].items():
            row = [name, split] + [_pm(values[label], 1 if "Hausdorff" in label else 3) for label, _, _ in FIGURES]
            lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append("Decoding values chosen on val, per seed (marker threshold / inst min area / cc min area):")
    for name, cell in summary["cells"].items():
        chosen = ", ".join(f"{c['marker_threshold']}/{c['min_area']}/{c['baseline_min_area']}" for c in cell["chosen"])
        lines.append(f"- {name}: {chosen or 'none recorded'}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ablation", type=Path, help="a `pathseg ablate` output directory")
    parser.add_argument("--json", type=Path, help="also write the summary as JSON here")
    args = parser.parse_args()
    summary = summarise(args.ablation)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    print(markdown(summary))


if __name__ == "__main__":
    main()
