"""Side-by-side PNGs (image | ground truth | prediction) for looking at what the numbers mean.

Where the store has instances, every gland is outlined in a colour of its own on the truth and prediction
panels, so merged and split glands (what the object metrics count) can be seen, not only class colours.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

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


def instance_colours(count: int) -> np.ndarray:
    """(count + 1, 3) uint8 colours, row k for instance k: hues a golden angle apart, so neighbours differ."""
    hues = (np.arange(count + 1) * 0.618033988749895) % 1.0
    sector = (hues * 6).astype(int) % 6
    rise = hues * 6 - np.floor(hues * 6)
    full, low = np.ones_like(hues), np.full_like(hues, 0.15)
    up, down = low + (1 - low) * rise, 1 - (1 - low) * rise
    table = [(full, up, low), (down, full, low), (low, full, up), (low, down, full), (up, low, full), (full, low, down)]
    rgb = np.stack([np.choose(sector, [t[c] for t in table]) for c in range(3)], axis=1)
    return (rgb * 255).astype(np.uint8)


def outline_instances(panel: np.ndarray, instances: np.ndarray, width: int = 2) -> np.ndarray:
    """`panel` with the inner `width` px of every instance's edge drawn in that instance's colour."""
    grow = 2 * width + 1
    edge = (ndimage.grey_dilation(instances, size=grow) != ndimage.grey_erosion(instances, size=grow)) & (instances > 0)
    out = panel.copy()
    out[edge] = instance_colours(int(instances.max()))[instances[edge]]
    return out


def save_overlay(path: Path, rgb: np.ndarray, truth: np.ndarray, prediction: np.ndarray, num_classes: int,
                 ignore_index: int | None, truth_instances: np.ndarray | None = None,
                 predicted_instances: np.ndarray | None = None) -> None:
    from PIL import Image

    truth_panel = colourise(rgb, truth, ignore_index)
    predicted_panel = colourise(rgb, prediction, ignore_index)
    if truth_instances is not None:
        truth_panel = outline_instances(truth_panel, truth_instances)
    if predicted_instances is not None:
        predicted_panel = outline_instances(predicted_panel, predicted_instances)
    gap = np.full((rgb.shape[0], 8, 3), 255, dtype=np.uint8)
    panel = np.concatenate([rgb, gap, truth_panel, gap, predicted_panel], axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(panel).save(path)
