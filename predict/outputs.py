"""What predict leaves for each input: a label map, an overlay with a legend, a per-class area table, and the
record of what made them (`predict.json`: run, head, backbone, input and settings).

Every file is written under a temporary name and renamed into place, so a file that exists is whole.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from pathseg.train_head.overlays import PALETTE, colourise
from PIL import Image, ImageDraw

from pathseg.files import atomic_write_bytes
from pathseg.store import digest

RECORD = "predict.json"  # beside areas.csv, written before it: what made the outputs, for a rerun to compare
# what the files hold; 2: areas.csv counts slides by the tissue mask, GeoJSON merged exactly; 3: glands as objects
# (instances.*, an objects column in areas.csv) and a contour head's contour folded into the class it covers
OUTPUTS_VERSION = 3
# What of a run record decides its labels; its time taken, loader and software versions do not.
RUN_RESULT_KEYS = ("store_fingerprint", "store_compute_precision", "extraction", "pairs",
                   "class_names", "head", "blend", "config")
_run_identities: dict[tuple, dict] = {}


def publish_directory(building: Path, final: Path) -> None:
    """Put a finished directory (a Zarr store) in place of any older one by renaming it."""
    if final.exists():
        shutil.rmtree(final)
    building.rename(final)


def write_probabilities(path: Path, logits: np.ndarray) -> None:
    """Per-class probabilities of an image, (classes, H, W) float16 Zarr, made beside `path` and renamed in."""
    import zarr

    shifted = np.exp(logits - logits.max(axis=0, keepdims=True))
    chances = (shifted / shifted.sum(axis=0, keepdims=True)).astype(np.float16)
    building = path.with_name(f".{path.name}.building")
    if building.exists():
        shutil.rmtree(building)
    zarr.create_array(str(building), data=chances, chunks=(chances.shape[0], 512, 512))
    publish_directory(building, path)


def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def class_colour(index: int) -> tuple[int, int, int]:
    """The overlay's colour of a class (class 0 is left uncoloured in overlays, black in the legend)."""
    colour = PALETTE[0] if index == 0 else PALETTE[1 + (index - 1) % (len(PALETTE) - 1)]
    return tuple(int(c) for c in colour)


def write_label_map(path: Path, labels: np.ndarray) -> None:
    """Class index per pixel, 8-bit grey PNG: opens anywhere, counts exactly."""
    atomic_write_bytes(path, _png_bytes(labels.astype(np.uint8)))


def write_overlay(path: Path, rgb: np.ndarray, labels: np.ndarray, class_names: list[str]) -> None:
    """image | prediction overlay, with a legend of the classes present below."""
    gap = np.full((rgb.shape[0], 8, 3), 255, dtype=np.uint8)
    panel = np.concatenate([rgb, gap, colourise(rgb, labels, None)], axis=1)
    present = [i for i in range(len(class_names)) if (labels == i).any()]
    legend = Image.new("RGB", (panel.shape[1], 18 * max(1, len(present)) + 6), "white")
    draw = ImageDraw.Draw(legend)
    for row, index in enumerate(present):
        y = 3 + 18 * row
        draw.rectangle([4, y, 18, y + 14], fill=class_colour(index), outline="black")
        draw.text((24, y + 1), class_names[index], fill="black")
    atomic_write_bytes(path, _png_bytes(np.concatenate([panel, np.asarray(legend)], axis=0)))


def area_rows(labels: np.ndarray, class_names: list[str], mpp: float | None) -> list[dict]:
    """Pixels, mm² (when the microns per pixel are known) and share of the whole image, per class."""
    counts = np.bincount(labels.ravel(), minlength=len(class_names))[: len(class_names)]
    total = max(int(labels.size), 1)
    return [{"class": name, "pixels": int(pixels), "area_mm2": _mm2(int(pixels), mpp),
             "fraction_of_image": round(int(pixels) / total, 6)}
            for name, pixels in zip(class_names, counts, strict=True)]


def tissue_area_rows(inside: np.ndarray, outside: np.ndarray, class_names: list[str], mpp: float) -> list[dict]:
    """Per class: pixels and mm² inside the tissue mask, their share of the tissue, and pixels outside it.

    Counted by the mask, not by the label: pixels outside the tissue are labelled background (glass), and
    counting them would make every class's share depend on how much glass the scan holds. The background
    inside the tissue (lumen, gaps) stays a class like the others; values past the classes (255: no tissue
    tile reached) are in no row.
    """
    tissue = int(inside[: len(class_names)].sum())
    return [{"class": name, "pixels": int(inside[index]), "area_mm2": _mm2(int(inside[index]), mpp),
             "fraction_of_tissue": round(int(inside[index]) / tissue, 6) if tissue else 0.0,
             "outside_tissue_pixels": int(outside[index])} for index, name in enumerate(class_names)]


def with_object_counts(rows: list[dict], class_names: list[str], count: int) -> list[dict]:
    """The area rows with an `objects` column: the number of glands on the gland class's row, empty elsewhere."""
    from pathseg.metrics.instances import gland_index

    gland = gland_index(class_names)
    return [{**row, "objects": count if index == gland else ""} for index, row in enumerate(rows)]


def _mm2(pixels: int, mpp: float | None) -> float | str:
    return float(f"{pixels * (mpp / 1000.0) ** 2:.6g}") if mpp else ""


def fraction_of(row: dict) -> float:
    """A row's share, of the tissue (slides) or of the image (plain images), from either kind of table."""
    return float(row.get("fraction_of_tissue") or row.get("fraction_of_image") or 0.0)


def write_area_table(path: Path, rows: list[dict]) -> None:
    """The rows as CSV, columns in the rows' order; written last, it marks the input finished."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["class", "pixels", "area_mm2"])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, buffer.getvalue().encode())


def run_identity(run: Any, config: Any) -> dict:
    """What of the run and its backbone decides the logits: the record's head digest (the head is checked
    against it when loaded) and settings, and the backbone's weights by content or preset, not by path, so a
    backbone that moved (`--backbone`) still matches. Hashed once per process."""
    from pathseg.extract.backbone_sources import backbone_fingerprint

    b = config.backbone
    key = (str(Path(run.directory).resolve()), run.record.get("head_sha256"), b.name, str(b.config), b.seed)
    if key not in _run_identities:
        weights = backbone_fingerprint(b.name, b.config, b.seed)
        _run_identities[key] = {
            "head_sha256": run.record.get("head_sha256"),
            "run": digest({name: run.record.get(name) for name in RUN_RESULT_KEYS}),
            "backbone": {k: v for k, v in weights.items() if k not in ("directory", "checkpoint")},
        }
    return _run_identities[key]


def input_identity(path: Path, slide: bool) -> dict:
    """An image by its bytes' sha256; a slide (gigabytes) by its size and time stamp, as its working store is."""
    if slide:
        stat = path.stat()
        return {"name": path.name, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    import hashlib

    return {"name": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def output_record(run: Any, config: Any, path: Path, slide: bool, options: Any) -> dict:
    """Everything that changes an input's outputs; a rerun skips the input only when all of it is equal.
    The device and worker count are left out: they change rounding, not what was asked."""
    return {"outputs_version": OUTPUTS_VERSION, "run": run_identity(run, config),
            "input": input_identity(path, slide), "settings": asdict(options), "glands": gland_decoding(run, config)}


def gland_decoding(run: Any, config: Any) -> dict | None:
    """The values glands are decoded with and where they came from: a val choice evaluate records after these
    outputs were written changes the glands, so a rerun must not keep the old ones."""
    from pathseg.predict.glands import has_glands
    from pathseg.train_head.instance_choice import decoding_settings

    if not has_glands(list(run.record["class_names"])):
        return None
    settings, _, source = decoding_settings(run, config)
    return {"instances": settings.model_dump(mode="json"), "source": source}


OPTION_NAMES = {"mpp": "--mpp", "object_type": "--object-type", "simplify": "--simplify",
                "use_tissue_mask": "--no-tissue-mask", "tissue_threshold": "--tissue-threshold",
                "probabilities": "--probabilities"}


def record_differences(found: dict | None, expected: dict) -> str:
    """'' when `found` (a folder's record) equals `expected` in every part; otherwise what differs, in words."""
    if found is not None and all(found.get(key) == value for key, value in expected.items()):
        return ""
    if found is None:
        return "before pathseg recorded what made them (no readable predict.json)"
    if found.get("outputs_version") != expected["outputs_version"]:
        return f"by an older pathseg (outputs version {found.get('outputs_version')}, now {OUTPUTS_VERSION})"
    reasons = []
    run, ours = found.get("run") or {}, expected["run"]
    parts = (("head_sha256", "by another head"), ("run", "by another run's settings"),
             ("backbone", "with another backbone"))
    for key, words in parts:
        if run.get(key) != ours[key]:
            reasons.append(words)
    if found.get("input") != expected["input"]:
        reasons.append("from another version of the input file")
    if found.get("glands") != expected.get("glands"):
        reasons.append("with other gland decoding values (instances.* or the run's instances.json)")
    settings, wanted = found.get("settings") or {}, expected["settings"]
    changed = [OPTION_NAMES.get(k, "--" + k.replace("_", "-")) for k in sorted(set(settings) | set(wanted))
               if settings.get(k) != wanted.get(k)]
    if changed:
        reasons.append("with other " + ", ".join(changed))
    return ", ".join(reasons) or "with other settings"


def read_record(folder: Path) -> dict | None:
    try:
        value = json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def write_record(folder: Path, record: dict) -> None:
    atomic_write_bytes(folder / RECORD, json.dumps(record, indent=2, sort_keys=True).encode())
