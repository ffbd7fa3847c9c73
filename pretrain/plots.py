"""What a person looks at to judge a pretraining: the loss curves, reconstructions and samples, as PNGs.

Written atomically (encoded in memory, then `atomic_write_bytes`); curves through matplotlib's Agg
backend, image grids with PIL.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from pathseg.files import atomic_write_bytes


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot


def moving_average(values: list[float], width: int) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if len(array) == 0 or width <= 1:
        return array
    width = min(width, len(array))
    kernel = np.ones(width) / width
    padded = np.concatenate([np.full(width - 1, array[0]), array])
    return np.convolve(padded, kernel, mode="valid")


def loss_plot(history: dict[str, list[float]], path: Path) -> None:
    """Both phases on one step axis (the UNet's steps follow the first stage's), raw and smoothed, log scale."""
    pyplot = _pyplot()
    figure, axes = pyplot.subplots(1, 2, figsize=(11, 3.8))
    offset = 0
    for axis, (name, title) in zip(axes, (("first_stage", "first stage"), ("unet", "UNet (eps MSE)")), strict=True):
        values = history.get(name, [])
        steps = np.arange(offset + 1, offset + len(values) + 1)
        offset += len(values)
        if values:
            axis.plot(steps, values, color="tab:blue", alpha=0.3, linewidth=0.8, label="per step")
            axis.plot(steps, moving_average(values, max(1, len(values) // 20)), color="tab:blue", label="smoothed")
            for term, colour in (("reconstruction", "tab:green"), ("regulariser", "tab:red")):
                logged = history.get(f"{name}/{term}", [])
                if logged and min(logged) > 0:  # smoothed, ending at the phase's last step (older runs logged none)
                    at = np.arange(offset - len(logged) + 1, offset + 1)
                    axis.plot(at, moving_average(logged, max(1, len(logged) // 20)), color=colour,
                              linewidth=1.0, label=f"{term} (smoothed)")
            if min(values) > 0:
                axis.set_yscale("log")
            axis.legend(loc="upper right")
        axis.set_title(title)
        axis.set_xlabel("optimiser step")
        axis.set_ylabel("loss")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    pyplot.close(figure)
    atomic_write_bytes(path, buffer.getvalue())


def to_uint8(images: np.ndarray) -> np.ndarray:
    """(n, 3, H, W) floats in [-1, 1] -> (n, H, W, 3) uint8."""
    return ((np.clip(images, -1, 1) + 1) * 127.5).round().astype(np.uint8).transpose(0, 2, 3, 1)


def image_grid(rows: list[np.ndarray], path: Path, gap: int = 2) -> None:
    """Rows of (n, H, W, 3) uint8 tiles, white gaps between them."""
    rows = [row for row in rows if len(row)]
    if not rows:
        return
    height, width = rows[0].shape[1:3]
    columns = max(len(row) for row in rows)
    canvas = np.full((len(rows) * (height + gap) - gap, columns * (width + gap) - gap, 3), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            top, left = r * (height + gap), c * (width + gap)
            canvas[top : top + height, left : left + width] = tile
    buffer = io.BytesIO()
    Image.fromarray(canvas).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
