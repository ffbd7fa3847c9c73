"""`pathseg predict RUN INPUT... --out DIR`: images and slides, mixed, in this process or on dask workers.

Each input is predicted by `one_input.predict_one` into its own folder, so a rerun skips the inputs
that are finished and redoes any that a crash interrupted. A finished image is skipped only when its
`predict.json` (head, run, backbone, input and settings) equals this command's; otherwise the command
refuses, naming it, and `--overwrite` redoes it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pathseg.predict.cluster import predict_on_cluster
from pathseg.predict.images import expand_inputs
from pathseg.predict.one_input import FINISHED_MARK, PredictOptions, predict_one
from pathseg.predict.outputs import (
    fraction_of,
    output_record,
    read_record,
    record_differences,
)
from pathseg.predict.predictor import Predictor, run_config
from pathseg.predict.slide_command import is_slide
from pathseg.train_head.runs import load_run

from pathseg.errors import PathsegError
from pathseg.progress import say


@dataclass
class PredictionSummary:
    written: list[Path]
    skipped: list[Path]


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise PathsegError(f"--out {out} cannot be created ({error.strerror}); choose a folder you can write") from None
    if not os.access(out, os.W_OK):
        raise PathsegError(f"--out {out} is not writable; choose a folder you can write")


def _output_names(paths: list[Path]) -> dict[Path, str]:
    names: dict[str, Path] = {}
    for path in paths:
        if path.stem in names:
            raise PathsegError(f"{path} and {names[path.stem]} would write the same outputs ({path.stem}/); "
                               "predict them into different --out folders")
        names[path.stem] = path
    return {path: stem for stem, path in names.items()}


def predict_images(run_dir: Path, inputs: list[str], out: Path, *, backbone: str | None = None,
                   device: str | None = None, workers: int = 1, scheduler: str | None = None,
                   show_progress: bool = True, trust_checkpoint: bool = False, trust_run: bool = False,
                   overwrite: bool = False, **options) -> PredictionSummary:
    """Images and slides, mixed, in this process or (`workers` > 1, `scheduler`) on dask workers, a whole
    input per task. `options` are those of `PredictOptions`.

    A finished input is skipped only when its record equals what this command would write; one made by
    another head, run, backbone, input file or settings is refused, or redone with `overwrite`.
    """
    settings = PredictOptions(**options)
    paths = expand_inputs(inputs)
    names = _output_names(paths)
    out = Path(out)
    _check_writable(out)
    finished = [p for p in paths if (out / names[p] / FINISHED_MARK).exists()]
    stale = _stale_outputs(finished, names, out, run_dir, backbone, device, trust_checkpoint, trust_run, settings)
    if stale and not overwrite:
        path, reasons = next(iter(stale.items()))
        more = len(stale) - 1
        others = f" ({more} more input{'s' if more > 1 else ''} like it)" if more else ""
        raise PathsegError(f"{path}: its outputs in {out / names[path]} were made {reasons}{others}; pass "
                           "--overwrite to predict it again, or choose another --out")
    todo = [p for p in paths if p not in finished or p in stale]
    skipped = [p for p in paths if p not in todo]
    if skipped:
        say(f"{len(skipped)} of {len(paths)} inputs already predicted in {out}: skipped")
    if not todo:
        return PredictionSummary([], skipped)
    jobs = [(path, out / names[path]) for path in todo]
    if workers > 1 or scheduler:
        predict_on_cluster(Path(run_dir), jobs, settings, backbone=backbone, device=device, workers=workers,
                           scheduler=scheduler, show_progress=show_progress, trust_checkpoint=trust_checkpoint,
                           trust_run=trust_run)
    else:
        predictor = Predictor(Path(run_dir), backbone=backbone, device=device, trust_checkpoint=trust_checkpoint,
                              trust_run=trust_run)
        for path, folder in jobs:
            predict_one(path, folder, predictor, settings, show_progress)
    return PredictionSummary([folder for _, folder in jobs], skipped)


def _stale_outputs(finished: list[Path], names: dict[Path, str], out: Path, run_dir: Path, backbone: str | None,
                   device: str | None, trust_checkpoint: bool, trust_run: bool,
                   settings: PredictOptions) -> dict[Path, str]:
    """Finished inputs whose record differs from what this command would write, with what differs."""
    if not finished:
        return {}
    run = load_run(Path(run_dir))
    config = run_config(run, backbone, device, trust_checkpoint, trust_run)
    stale = {}
    for path in finished:
        expected = output_record(run, config, path, is_slide(path), settings)
        reasons = record_differences(read_record(out / names[path]), expected)
        if reasons:
            stale[path] = reasons
    return stale


def area_table(folders: list[Path]) -> str:
    """Every finished input's per-class areas as one printed table (read back from their area tables)."""
    import csv

    from pathseg.reports import table

    rows = []
    for folder in folders:
        with (folder / FINISHED_MARK).open() as handle:
            for row in csv.DictReader(handle):
                rows.append([folder.name, row["class"], row["pixels"], row["area_mm2"] or "-",
                             f"{100 * fraction_of(row):.1f}%"])
    return table(["input", "class", "pixels", "mm2", "share"], rows)


