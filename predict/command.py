"""`pathseg predict RUN INPUT... --out DIR` for plain images: label map, QuPath GeoJSON, overlay and area
table per image.

An image is taken to be at the resolution the head was trained at, unless `--mpp` says what it is; then
it is resampled to the training resolution, predicted, and the labels brought back to its own size.
Each image's files appear whole (renamed into place), its area table last, so a rerun skips the images
that are finished and redoes any that a crash interrupted. A finished image is skipped only when its
`predict.json` (head, run, backbone, input and settings) equals this command's; otherwise the command
refuses, naming it, and `--overwrite` redoes it.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pathseg.predict.geojson import label_features, write_geojson
from pathseg.predict.images import expand_inputs, read_rgb, resample, resize_labels
from pathseg.predict.outputs import (
    area_rows,
    fraction_of,
    output_record,
    read_record,
    record_differences,
    write_area_table,
    write_label_map,
    write_overlay,
    write_probabilities,
    write_record,
)
from pathseg.predict.predictor import Predictor, run_config
from pathseg.predict.slide_command import is_slide, predict_slide
from pathseg.train_head.runs import load_run

from pathseg.errors import PathsegError
from pathseg.metrics import background_index_of
from pathseg.progress import progress_bar, say

FINISHED_MARK = "areas.csv"  # written last: its presence means every file of that image is whole


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


@dataclass(frozen=True)
class PredictOptions:
    """How each input is predicted and written; the same for every input of a command."""

    mpp: float | None = None  # the inputs' resolution (a slide's level 0) when they do not say
    force_mpp: bool = False  # slides: `mpp` even where the file records its own
    object_type: str = "annotation"
    simplify: float = 0.0
    use_tissue_mask: bool = True
    tissue_threshold: float | None = None
    probabilities: bool = False


def predict_one(path: Path, folder: Path, predictor: Predictor, options: PredictOptions,
                show_progress: bool) -> None:
    """One image or slide, all its outputs written: the record of what made them, then the area table last.

    Called for unfinished inputs and for those `--overwrite` redoes: their old area table goes first, so a
    redo killed half way is unfinished, not finished by another run; old probabilities not asked for go too.
    """
    slide = is_slide(path)
    record = output_record(predictor.run, predictor.config, path, slide, options)
    (folder / FINISHED_MARK).unlink(missing_ok=True)
    if not options.probabilities and (folder / "probabilities.zarr").exists():
        shutil.rmtree(folder / "probabilities.zarr")
    if slide:
        predict_slide(path, folder, predictor, slide_mpp=options.mpp, force_mpp=options.force_mpp,
                      use_tissue_mask=options.use_tissue_mask,
                      tissue_threshold=options.tissue_threshold, object_type=options.object_type,
                      simplify=options.simplify, show_progress=show_progress, probabilities=options.probabilities,
                      record=record)
    else:
        _predict_image(path, folder, predictor, options.mpp, options.object_type, options.simplify, show_progress,
                       options.probabilities, record)


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
        from pathseg.predict.cluster import predict_on_cluster

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


def _predict_image(path: Path, folder: Path, predictor: Predictor, mpp: float | None, object_type: str,
                   simplify: float, show_progress: bool, probabilities: bool = False,
                   record: dict | None = None) -> None:
    if mpp is not None and predictor.mpp is None:
        raise PathsegError(f"--mpp {mpp} given, but run {predictor.run.directory} does not know the resolution it "
                           f"was trained at (dataset {predictor.config.dataset.name!r}); leave --mpp out to take "
                           "images as they are")
    rgb = read_rgb(path)
    scale = mpp / predictor.mpp if mpp is not None else 1.0
    working = resample(rgb, scale) if scale != 1.0 else rgb
    with progress_bar(path.name, _tile_count(working.shape[:2], predictor), "tiles", show_progress) as advance:
        logits = predictor.image_logits(working, path.stem, advance)
    labels = logits.argmax(axis=0).astype(np.uint8)
    if labels.shape != rgb.shape[:2]:
        labels = resize_labels(labels, rgb.shape[:2])
    write_label_map(folder / "labels.png", labels)
    if probabilities:
        write_probabilities(folder / "probabilities.zarr", logits)  # at the prediction (training) resolution
    write_overlay(folder / "overlay.png", rgb, labels, predictor.class_names)
    source_mpp = mpp if mpp is not None else predictor.mpp
    background = background_index_of(predictor.class_names)
    write_geojson(folder / "regions.geojson", label_features(
        labels, predictor.class_names, image_id=path.stem, skip=set() if background is None else {background},
        object_type=object_type, simplify=simplify, mpp=source_mpp))
    rows = area_rows(labels, predictor.class_names, source_mpp)
    if record is not None:
        write_record(folder, record)
    write_area_table(folder / FINISHED_MARK, rows)
    shares = ", ".join(f"{row['class']} {100 * row['fraction_of_image']:.1f}%" for row in rows)
    say(f"{path.name}: {shares} -> {folder}")


def _tile_count(shape: tuple[int, int], predictor: Predictor) -> int:
    from pathseg.tiling import tile_grid

    t = predictor.config.tiling
    return len(tile_grid(shape[0], shape[1], t.tile_size, t.stride))
