"""Inputs to segment, found from files, folders and globs; plain images (PNG, JPEG, TIFF, BMP) read whole."""

from __future__ import annotations

import glob
from pathlib import Path

import numpy as np
from PIL import Image

from pathseg.datasets.base import open_image
from pathseg.errors import PathsegError
from pathseg.imaging.slides import SLIDE_ONLY_SUFFIXES

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
INPUT_SUFFIXES = IMAGE_SUFFIXES | SLIDE_ONLY_SUFFIXES


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files as given, folders' images (sorted), globs' matches; each path once, in order."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if p.suffix.lower() in INPUT_SUFFIXES and p.is_file())
        elif path.is_file():
            found.append(path)
        elif glob.has_magic(item):
            found += sorted(Path(p) for p in glob.glob(item) if Path(p).is_file())
        else:
            raise PathsegError(f"{item} does not exist; give image files, folders of images or a glob")
    unique = list(dict.fromkeys(found))
    if not unique:
        raise PathsegError(f"no images found in {', '.join(inputs)} (looked for {', '.join(sorted(INPUT_SUFFIXES))})")
    unsupported = [p for p in unique if p.suffix.lower() not in INPUT_SUFFIXES]
    if unsupported:
        raise PathsegError(f"{unsupported[0]}: not a supported image or slide ({', '.join(sorted(INPUT_SUFFIXES))})")
    return unique


def read_rgb(path: Path) -> np.ndarray:
    """(H, W, 3) uint8, whatever the file's mode (grey, RGBA, palette, 16-bit); a malformed file fails in one line."""
    with open_image(path) as image:
        return np.asarray(image.convert("RGB"))


def resample(rgb: np.ndarray, scale: float) -> np.ndarray:
    """An image `scale` times its size (area-like downsampling, bicubic upsampling)."""
    height, width = (max(1, round(side * scale)) for side in rgb.shape[:2])
    method = Image.Resampling.BOX if scale < 1 else Image.Resampling.BICUBIC
    return np.asarray(Image.fromarray(rgb).resize((width, height), method))


def resize_labels(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(labels.astype(np.uint8)).resize((shape[1], shape[0]), Image.Resampling.NEAREST))
