"""What predict leaves for each input: a label map, an overlay with a legend, and a per-class area table.

Every file is written under a temporary name and renamed into place, so a file that exists is whole.
"""

from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path

import numpy as np
from pathseg.train_head.overlays import PALETTE, colourise
from PIL import Image, ImageDraw

from pathseg.files import atomic_write_bytes


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
    """Pixels, mm² (when the microns per pixel are known) and share of the image, per class."""
    counts = np.bincount(labels.ravel(), minlength=len(class_names))[: len(class_names)]
    total = max(int(labels.size), 1)
    rows = []
    for index, name in enumerate(class_names):
        pixels = int(counts[index])
        rows.append({"class": name, "pixels": pixels,
                     "area_mm2": float(f"{pixels * (mpp / 1000.0) ** 2:.6g}") if mpp else "",
                     "fraction": round(pixels / total, 6)})
    return rows


def write_area_table(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["class", "pixels", "area_mm2", "fraction"])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, buffer.getvalue().encode())
