"""Side-by-side PNGs (image | ground truth | prediction) for looking at what the numbers mean."""

from __future__ import annotations

from pathlib import Path

import numpy as np

PALETTE = np.array(
    [
        [0, 0, 0],
        [0, 200, 83],
        [255, 61, 0],
        [41, 121, 255],
        [255, 214, 0],
        [170, 0, 255],
        [0, 229, 255],
        [255, 145, 0],
        [118, 255, 3],
        [245, 0, 87],
    ],
    dtype=np.float32,
)


def colourise(rgb: np.ndarray, labels: np.ndarray, ignore_index: int | None, alpha: float = 0.45) -> np.ndarray:
    """Blend class colours over the image; background (0) and ignored pixels stay as they are."""
    out = rgb.astype(np.float32).copy()
    for value in np.unique(labels):
        if value == 0 or (ignore_index is not None and value == ignore_index):
            continue
        mask = labels == value
        out[mask] = (1 - alpha) * out[mask] + alpha * PALETTE[1 + (int(value) - 1) % (len(PALETTE) - 1)]
    return out.clip(0, 255).astype(np.uint8)


def save_overlay(path: Path, rgb: np.ndarray, truth: np.ndarray, prediction: np.ndarray, num_classes: int,
                 ignore_index: int | None) -> None:
    from PIL import Image

    gap = np.full((rgb.shape[0], 8, 3), 255, dtype=np.uint8)
    panel = np.concatenate(
        [rgb, gap, colourise(rgb, truth, ignore_index), gap, colourise(rgb, prediction, ignore_index)], axis=1
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(panel).save(path)
