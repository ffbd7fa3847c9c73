"""`pathseg ablate`: the paper's timestep x block ablation (and any head/train sweep) from one feature store.

Every run is an ordinary fit-head run directory, named by the same key fit-head uses, so a sweep that was
interrupted resumes where it stopped, a repeated sweep computes nothing, and a run fitted by hand is reused.
The store is opened once for the whole sweep. Validation alone chooses; test scores are reported for the
chosen cell, and for all cells only in a table that says not to choose on it.
"""

from __future__ import annotations

import gc
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pathseg.train_head import leaderboard as board
from pathseg.train_head.ablation_grid import AblationPlan, plan_ablation, run_config
from pathseg.train_head.ablation_plots import heatmap, lines
from pathseg.train_head.evaluate import METRICS_VERSION, default_splits, encoders_differ, evaluate_run
from pathseg.train_head.fit import fit_head
from pathseg.train_head.instance_choice import search_settings
from pathseg.train_head.paper_table import paper_table
from pathseg.train_head.runs import Run, default_run_dir, load_run, locate_store

from pathseg.config import PipelineConfig, config_to_dict
from pathseg.errors import PathsegError
from pathseg.files import atomic_write_text
from pathseg.progress import progress_bar, say
from pathseg.store import FeatureStore, digest, software_versions

ABLATION_SCHEMA = 1
TEST_NOTE = ("Test scores of every cell, for the record only: choosing a cell on these would report the best of "
             "{n} noisy test estimates, not a held-out figure. The leaderboard's choice uses {val} alone.")


@dataclass
class AblationResult:
    directory: Path
    plan: AblationPlan
    scores: list[board.RunScore]
    selected: board.CellSummary
    computed_runs: int


def _finished_run(run_dir: Path, store: FeatureStore) -> Run | None:
    """The run of this store in `run_dir`, if its record is current and its head is the one the record describes;
    anything else (no run, an old record, a head of another fit) is fitted again, which replaces the folder."""
    if not (run_dir / "run.json").exists():
        return None
    try:
        run = load_run(run_dir)
        run.head_bytes()
    except PathsegError:
        return None
    same = run.record.get("store_fingerprint") == store.fingerprint and not encoders_differ(run, store)
    return run if same else None


def _eval_name(cell) -> str:
    """The run's folder for this cell's scores: cells that sweep instances.* share the run (the same head) but
    not its scores, so each decoding setting keeps its own report and a rerun reuses every one of them."""
    decoding = {key: value for key, value in cell.settings if key.startswith("instances.")}
    return f"eval-{digest(decoding)[:8]}" if decoding else "eval"


def _cached_scores(run: Run, config: PipelineConfig, splits: list[str], store: FeatureStore,
                   eval_name: str = "eval") -> dict | None:
    """The run's evaluate report, if it scored these splits of this store, by today's metric definitions, with
    the head the run holds now."""
    path = run.directory / eval_name / "metrics.json"
    if not path.exists():
        return None
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    same = (report.get("metrics_version") == METRICS_VERSION and report.get("store_fingerprint") == store.fingerprint
            and report.get("head_sha256") == run.record["head_sha256"] and report.get("blend") == config.evaluate.blend
            and report.get("decoding_settings") == search_settings(config))
    return report["splits"] if same and all(split in report.get("splits", {}) for split in splits) else None


def baseline_budgets(config: PipelineConfig, plan: AblationPlan) -> dict[str, int]:
    from pathseg.train_head.heads import PIXEL_ONLY_KINDS

    kinds = sorted({cell.baseline for cell in plan.cells if cell.baseline in PIXEL_ONLY_KINDS})
    return {kind: config.ablate.epochs_of(kind, config.train.epochs) for kind in kinds}


def ablation_dir(config: PipelineConfig, store: FeatureStore, plan: AblationPlan) -> Path:
    """runs/<store>/ablate-<key>: the key covers the grid, the seeds, the sweep and the base head, train, evaluate
    and decoding settings, so an ablation rescored with other decoding grids keeps its first leaderboard."""
    key = digest({"store": store.fingerprint, "cells": [c.key for c in plan.cells],
                  "seeds": plan.seeds, "head": config.head.model_dump(mode="json"),
                  "train": config.train.model_dump(mode="json"), "evaluate": config.evaluate.model_dump(mode="json"),
                  "instances": config.instances.model_dump(mode="json"),
                  # only where a supervised network is trained, so keys of ablations without one are unchanged
                  **({"baseline_epochs": epochs} if (epochs := baseline_budgets(config, plan)) else {})})
    return Path(config.runs_dir) / store.path.stem / f"ablate-{plan.grid}-{key[:8]}"


def _score_run(config: PipelineConfig, store: FeatureStore, cell, seed: int,
               splits: list[str]) -> board.RunScore:
    cfg = run_config(config, cell, seed)
    pairs = list(cell.pairs)
    run_dir = default_run_dir(cfg, store, pairs)
    run = _finished_run(run_dir, store)
    eval_name = _eval_name(cell)
    cached = _cached_scores(run, cfg, splits, store, eval_name) if run is not None else None
    if cached is not None:
        return board.RunScore(cell, seed, run_dir, cached, computed=False)
    if run is None:
        fit_head(cfg, store=store, pairs=pairs, run_dir=run_dir, show_progress=False, announce=False)
    report = evaluate_run(cfg, run_dir, splits=splits, store=store, show_progress=False, echo=False,
                          out_name=eval_name).metrics
    gc.collect()  # one head, loader and optimizer at a time: memory stays flat over the sweep
    return board.RunScore(cell, seed, run_dir, report["splits"], computed=True)


def run_ablation(config: PipelineConfig, *, swept: dict[str, list[Any]] | None = None, store_path: Path | None = None,
                 out: Path | None = None, show_progress: bool = True) -> AblationResult:
    store = locate_store(config, store_path)
    select_on = config.ablate.select_on
    if select_on in board.OBJECT_METRICS and not store.has_instances:
        raise PathsegError(f"ablate.select_on {select_on!r} (--select-on) needs gland instances and {store.path} has "
                           "none: every cell would score nothing and the first would be chosen; use --select-on miou "
                           "or mean_dice")
    plan = plan_ablation(config, store, swept or {})
    val_split = config.train.val_split
    if not any(entry.split == val_split for entry in store.images):
        raise PathsegError(f"{store.path} has no images in split {val_split!r} (splits: {store.splits()}); "
                           "ablate chooses on validation, so set train.val_split to a split the store holds")
    test_splits = [s for s in default_splits(store, config) if s != val_split]
    splits = [val_split, *test_splits]
    directory = Path(out) if out is not None else ablation_dir(config, store, plan)
    say(f"ablate: {len(plan.cells)} cells x {len(plan.seeds)} seeds = {plan.runs} runs on {store.path}; "
        f"choosing on {val_split} {board.METRICS[config.ablate.select_on]}")
    started = time.perf_counter()
    scores: list[board.RunScore] = []
    with progress_bar(f"ablate ({len(plan.cells)} cells x {len(plan.seeds)} seeds)", plan.runs, "runs",
                      show_progress) as advance:
        for cell in plan.cells:
            for seed in plan.seeds:
                scores.append(_score_run(config, store, cell, seed, splits))
                advance(1)
    computed = sum(score.computed for score in scores)
    summaries = board.summarise(plan.cells, scores, splits, store)
    order = board.ranked(summaries, val_split, config.ablate.select_on)
    selected = order[0]
    _write_outputs(directory, config, store, plan, scores, summaries, order, val_split, test_splits,
                   time.perf_counter() - started)
    what = "nothing computed: every run and score was already there" if computed == 0 else \
        f"{computed} of {plan.runs} runs computed, {plan.runs - computed} reused"
    say(f"ablate: {what}; outputs in {directory}")
    return AblationResult(directory, plan, scores, selected, computed)


def _write_outputs(directory: Path, config: PipelineConfig, store: FeatureStore, plan: AblationPlan,
                   scores: list[board.RunScore], summaries: list[board.CellSummary],
                   order: list[board.CellSummary], val_split: str, test_splits: list[str], seconds: float) -> None:
    select_on = config.ablate.select_on
    headers, rows = board.leaderboard_rows(order, val_split, test_splits)
    test_headers, test_table = board.test_rows(summaries, test_splits)
    note = TEST_NOTE.format(n=len(plan.cells), val=val_split)
    selected = order[0]
    chosen = (f"Chosen on {val_split} {board.METRICS[select_on]} (mean over {len(plan.seeds)} seeds): "
              f"{selected.cell.name}")
    random_encoders = {block for block, info in store.attrs.get("encoders", {}).items() if info.get("random")}
    atomic_write_text(directory / "leaderboard.csv", board.csv_numbers(order, val_split, selected))
    atomic_write_text(directory / "leaderboard.md", "\n\n".join([
        "# Ablation leaderboard",
        f"Store `{store.path}` (fingerprint `{store.fingerprint[:12]}`), grid `{plan.grid}`, seeds {plan.seeds}. "
        f"Mean ± sample std over seeds. Test columns are filled for the chosen cell only.",
        chosen + ".",
        *([f"Encoders with random weights (not a pretrained model's features): {', '.join(sorted(random_encoders))}."]
          if random_encoders else []),
        board.markdown(headers, rows),
        "## Test scores of all cells (not for selection)",
        note,
        board.markdown(test_headers, test_table),
        "Object F1 follows the GlaS contest: TP/FP/FN pooled over all images of the split.",
    ]) + "\n")
    atomic_write_text(directory / "paper_table.md",
                      paper_table(summaries, val_split, test_splits, select_on, random_encoders))
    atomic_write_text(directory / "test_all_cells.csv", "# " + note + "\n" + board.csv_text(test_headers, test_table))
    figures = []
    if heatmap(summaries, plan.timesteps, plan.blocks, plan.grid, val_split, select_on,
               directory / f"heatmap_{val_split}_{select_on}.png"):
        figures.append(f"heatmap_{val_split}_{select_on}.png")
    for split in test_splits:
        name = f"heatmap_{split}_{select_on}_not_for_selection.png"
        if heatmap(summaries, plan.timesteps, plan.blocks, plan.grid, split, select_on, directory / name,
                   note="test split: for the record, not for choosing a cell"):
            figures.append(name)
    if plan.grid == "each" and lines(summaries, plan.timesteps, plan.blocks, val_split,
                                     directory / f"metrics_vs_timestep_{val_split}.png"):
        figures.append(f"metrics_vs_timestep_{val_split}.png")
    record = {
        "schema": ABLATION_SCHEMA,
        "metrics_version": METRICS_VERSION,
        "store": str(store.path.resolve()),
        "store_fingerprint": store.fingerprint,
        "grid": plan.grid,
        "timesteps": plan.timesteps,
        "blocks": plan.blocks,
        "seeds": plan.seeds,
        "sweep": plan.sweep,
        "select_on": f"{val_split} {select_on}",
        "selected": selected.cell.name,
        "runs": [{"cell": s.cell.name, "pairs": [list(p) for p in s.cell.pairs], "settings": dict(s.cell.settings),
                  "baseline": s.cell.baseline,
                  "seed": s.seed, "run": str(s.run_dir), "computed": s.computed, "splits": s.splits} for s in scores],
        "figures": figures,
        "config": config_to_dict(config),
        "versions": software_versions(),
        "seconds": round(seconds, 2),
    }
    atomic_write_text(directory / "ablation.json", json.dumps(record, indent=2))
    print(board.plain(headers, rows))
    print(f"\n{chosen}")
    if test_splits:
        print(f"\nTest scores of all cells (not for selection): {directory / 'test_all_cells.csv'}")
