"""One input of `pathseg predict`, end to end: an image or a slide, its outputs whole, the area table last.

An image is taken to be at the resolution the head was trained at, unless `--mpp` says what it is; then
it is resampled to the training resolution, predicted, and the labels brought back to its own size.
Each file appears whole (renamed into place), the record of what made the outputs (`predict.json`) next
and the area table last, so its presence means the input is finished. The same function runs in this
process and on dask workers (`cluster.py`), which is why it lives apart from the command.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pathseg.predict.geojson import label_features, write_geojson
from pathseg.predict.gland_outputs import gland_features, measure, write_gland_table, write_instance_tiff
from pathseg.predict.glands import decode_image, has_glands, resize_nearest
from pathseg.predict.images import read_rgb, resample, resize_labels
from pathseg.predict.outputs import (
    area_rows,
    output_record,
    with_object_counts,
    write_area_table,
    write_label_map,
    write_overlay,
    write_probabilities,
    write_record,
)
from pathseg.predict.predictor import Predictor
from pathseg.predict.slide_command import is_slide, output_classes, predict_slide
from pathseg.train_head.contours import contour_fold, fold_prediction
from pathseg.train_head.instance_choice import decoding_settings

from pathseg.errors import PathsegError
from pathseg.metrics.instances import gland_index
from pathseg.metrics.pixel import background_index_of
from pathseg.progress import progress_bar, say

FINISHED_MARK = "areas.csv"  # written last: its presence means every file of that image is whole


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
    names = output_classes(predictor)
    labels = fold_prediction(logits.argmax(axis=0).astype(np.uint8), contour_fold(predictor.run.record))
    if labels.shape != rgb.shape[:2]:
        labels = resize_labels(labels, rgb.shape[:2])
    write_label_map(folder / "labels.png", labels)
    if probabilities:
        write_probabilities(folder / "probabilities.zarr", logits)  # at the prediction (training) resolution
    write_overlay(folder / "overlay.png", rgb, labels, names)
    source_mpp = mpp if mpp is not None else predictor.mpp
    background = background_index_of(names)
    write_geojson(folder / "regions.geojson", label_features(
        labels, names, image_id=path.stem, skip=set() if background is None else {background},
        object_type=object_type, simplify=simplify, mpp=source_mpp))
    rows = area_rows(labels, names, source_mpp)
    if has_glands(predictor.class_names):
        settings, _, _ = decoding_settings(predictor.run, predictor.config)
        instances = decode_image(logits, predictor.class_names, settings)
        if instances.shape != rgb.shape[:2]:
            instances = resize_nearest(instances, rgb.shape[:2])
        count = _write_glands(folder, instances, names, path.stem, source_mpp, object_type, simplify)
        rows = with_object_counts(rows, names, count)
    if record is not None:
        write_record(folder, record)
    write_area_table(folder / FINISHED_MARK, rows)
    shares = ", ".join(f"{row['class']} {100 * row['fraction_of_image']:.1f}%" for row in rows)
    say(f"{path.name}: {shares} -> {folder}")


def _write_glands(folder: Path, instances: np.ndarray, names: list[str], image_id: str, mpp: float | None,
                  object_type: str, simplify: float) -> int:
    """instances.tif, instances.csv and instances.geojson of one image, ids shared; returns the gland count."""
    gland = gland_index(names)
    outlines, gland_rows = measure(instances, mpp)
    features = gland_features(outlines, gland_rows, image_id=image_id, class_name=names[gland], class_index=gland,
                              scale=1.0, object_type=object_type, simplify=simplify)
    write_instance_tiff(folder / "instances.tif", instances)
    write_gland_table(folder / "instances.csv", gland_rows, mpp)
    write_geojson(folder / "instances.geojson", features)
    return len(gland_rows)


def _tile_count(shape: tuple[int, int], predictor: Predictor) -> int:
    from pathseg.imaging.tiling import tile_grid

    t = predictor.config.tiling
    return len(tile_grid(shape[0], shape[1], t.tile_size, t.stride))
