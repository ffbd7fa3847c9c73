"""One whole-slide image through predict: plan, compute (resumable), blend, then the outputs, renamed in whole.

Outputs in `<out>/<stem>/`: `labels.ome.tif` (class index per pixel at the prediction mpp, pyramidal, with
its physical pixel size), `regions.geojson` (level-0 coordinates), `overlay.png` (thumbnail | prediction),
for runs with a gland class `instances.ome.tif`, `instances.csv` and `instances.geojson` (one object per
gland, slide_glands.py), and `areas.csv` last (counted inside and outside the tissue mask), which marks the
slide finished. The working store `.work.zarr` beside them holds the tile logits until then, so a killed run
resumes where it stopped, with the same head, backbone, slide and tiles only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr
from pathseg.predict.glands import has_glands
from pathseg.predict.outputs import (
    publish_directory,
    run_identity,
    tissue_area_rows,
    with_object_counts,
    write_area_table,
    write_overlay,
    write_record,
)
from pathseg.predict.predictor import Predictor
from pathseg.predict.slide import NO_TISSUE, blend_labels, compute_tiles, plan_slide
from pathseg.predict.slide_glands import decode_slide, write_slide_glands
from pathseg.predict.slide_outputs import (
    labels_at,
    tissue_label_counts,
    write_label_ome_tiff,
    write_slide_geojson,
)
from pathseg.predict.slide_work import SlideWork
from pathseg.train_head.contours import contour_fold
from pathseg.train_head.instance_choice import decoding_settings

from pathseg.errors import PathsegError
from pathseg.imaging.slides import SLIDE_ONLY_SUFFIXES, Slide
from pathseg.metrics.pixel import background_index_of
from pathseg.progress import progress_bar, say
from pathseg.store import digest

FINISHED_MARK = "areas.csv"


def is_slide(path: Path) -> bool:
    """A file OpenSlide reads (SVS, NDPI, MRXS, tiled or pyramidal TIFF, OME-TIFF); plain TIFFs are images."""
    suffix = path.suffix.lower()
    if suffix in SLIDE_ONLY_SUFFIXES:
        return True
    if suffix not in {".tif", ".tiff"}:
        return False
    try:
        import openslide

        with openslide.OpenSlide(str(path)):
            return True  # OpenSlide opens tiled TIFFs only (pyramids, OME-TIFF), and reads their mpp
    except Exception:  # noqa: BLE001 - anything OpenSlide cannot open (a plain, striped TIFF) is an image
        return False


def predict_slide(path: Path, folder: Path, predictor: Predictor, *, slide_mpp: float | None, force_mpp: bool = False,
                  use_tissue_mask: bool, tissue_threshold: float | None, object_type: str, simplify: float,
                  show_progress: bool, probabilities: bool = False, record: dict | None = None) -> dict:
    """Predict the slide into `folder`; `record` (what made the outputs) is written just before the area table."""
    with Slide(path, mpp=slide_mpp, force_mpp=force_mpp) as slide:  # the file's own problems first
        if predictor.mpp is None:
            raise PathsegError(f"run {predictor.run.directory} does not know the resolution it was trained at "
                               f"(dataset {predictor.config.dataset.name!r}), so {path.name} cannot be read at "
                               "it; set dataset.folder.mpp when training on your own images")
        folder.mkdir(parents=True, exist_ok=True)
        plan = plan_slide(slide, predictor, predictor.mpp, use_tissue_mask, tissue_threshold)
        logits_size = predictor.logits_size()
        # The logits depend on the head's weights (by the digest the head was checked against when loaded,
        # not its size and time stamp, which a copied head can share) and the backbone's, never on options
        # that only shape the outputs, so a rerun with another --simplify still resumes.
        identity = {"run": str(predictor.run.directory.resolve()),
                    "weights": run_identity(predictor.run, predictor.config),
                    "run_store": predictor.run.record.get("store_fingerprint"), "slide": str(path.resolve()),
                    "slide_bytes": path.stat().st_size, "slide_mtime": path.stat().st_mtime_ns,
                    "slide_mpp": slide.mpp, "mpp": plan.mpp, "tiles": digest(plan.tissue_tiles.tolist()),
                    "blend": predictor.config.evaluate.blend}
        work = SlideWork.open_or_create(folder / ".work.zarr", identity, plan.tissue_tiles,
                                        (len(predictor.class_names), logits_size, logits_size),
                                        predictor.batch_size)
        pending = work.pending_batches()
        remaining = sum(work.batch_range(b)[1] - work.batch_range(b)[0] for b in pending)
        if len(plan.tissue_tiles) == 0:
            say(f"{path.name}: no tissue found; writing empty outputs (--no-tissue-mask to predict every tile)")
        elif remaining < len(plan.tissue_tiles):
            say(f"{path.name}: resuming, {len(plan.tissue_tiles) - remaining} of {len(plan.tissue_tiles)} tiles done")
        with progress_bar(path.name, remaining, "tiles", show_progress) as advance:
            compute_tiles(slide, path.stem, predictor, plan, work, advance)
        names = output_classes(predictor)
        background = background_index_of(names)
        empty = background if background is not None else NO_TISSUE
        shape = (plan.grid.height, plan.grid.width)
        labels = work.group.create_array("labels", shape=shape, dtype="uint8", chunks=(plan.grid.stride, 1024),
                                         fill_value=empty, overwrite=True)
        with_glands = has_glands(predictor.class_names)
        chances_shape = (len(predictor.class_names), *shape)
        chunks = (len(predictor.class_names), plan.grid.stride, 1024)
        chances = None
        if probabilities:
            chances = zarr.create_array(str(folder / ".probabilities.zarr"), shape=chances_shape, dtype="float16",
                                        chunks=chunks, fill_value=0, overwrite=True)
        elif with_glands:  # the glands are decoded from them; kept in the working store only
            chances = work.group.create_array("probabilities", shape=chances_shape, dtype="float16", chunks=chunks,
                                              fill_value=0, overwrite=True)
        blend_labels(plan, work, predictor, labels, empty, chances, contour_fold(predictor.run.record))
        instances = None
        if with_glands:
            instances = work.group.create_array("instances", shape=shape, dtype="uint32",
                                                chunks=(plan.grid.stride, 1024), fill_value=0, overwrite=True)
            settings, _, _ = decoding_settings(predictor.run, predictor.config)
            decode_slide(chances, predictor.class_names, settings, instances)
        if probabilities:
            publish_directory(folder / ".probabilities.zarr", folder / "probabilities.zarr")
        _write_outputs(folder, path, slide, plan, labels, predictor, empty, object_type, simplify, record, instances)
    work.remove()
    return {"tiles": len(plan.tissue_tiles), "grid_tiles": len(plan.grid)}


def output_classes(predictor: Predictor) -> list[str]:
    """The classes outputs are on: the store's (a contour head's contour only separates glands; it is folded)."""
    names = list(predictor.class_names)
    return names[:-1] if contour_fold(predictor.run.record) is not None else names


def _write_outputs(folder: Path, path: Path, slide: Slide, plan, labels: zarr.Array, predictor: Predictor,
                   empty: int, object_type: str, simplify: float, record: dict | None = None,
                   instances: zarr.Array | None = None) -> None:
    names = output_classes(predictor)
    write_label_ome_tiff(folder / "labels.ome.tif", labels, plan.mpp, names)
    skip = {empty} | ({b} if (b := background_index_of(names)) is not None else set())
    write_slide_geojson(folder / "regions.geojson", labels, names, slide_id=path.stem, skip=skip,
                        level0_per_px=plan.mpp / slide.mpp, object_type=object_type, simplify=simplify,
                        mpp=plan.mpp)
    thumbnail = plan.thumbnail
    small = labels_at(labels, thumbnail.shape[:2])
    write_overlay(folder / "overlay.png", thumbnail, np.where(small == NO_TISSUE, 0, small), names)
    inside, outside = tissue_label_counts(labels, plan.mask)
    rows = tissue_area_rows(inside, outside, names, plan.mpp)
    if instances is not None:
        count = write_slide_glands(folder, instances, names, slide_id=path.stem, mpp=plan.mpp,
                                   level0_per_px=plan.mpp / slide.mpp, object_type=object_type, simplify=simplify)
        rows = with_object_counts(rows, names, count)
    if record is not None:
        write_record(folder, record)
    write_area_table(folder / FINISHED_MARK, rows)
    shares = ", ".join(f"{row['class']} {row['area_mm2']:.3f} mm2" for row in rows)
    say(f"{path.name}: {shares} -> {folder}")
