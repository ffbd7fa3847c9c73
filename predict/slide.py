"""A whole slide through the run's backbone and head: tissue tiles only, resumable, memory bounded by a strip.

The slide is tiled at the run's training resolution on the grid extraction uses (tile size, stride, the
padding around the image; past the slide's edge the padding is white glass). Tiles without tissue on
the thumbnail never reach the backbone. Tile logits go to a working store batch by batch (`SlideWork`),
then are blended strip by strip (one stride of rows at a time, weights as `evaluate.blend`) into the
label map, so memory follows the slide's width, never its area.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import zarr
from pathseg.predict.predictor import Predictor
from pathseg.predict.slide_work import SlideWork
from pathseg.train_head.contours import fold_prediction
from torch.nn import functional as F

from pathseg.imaging.slides import Slide, tissue_mask
from pathseg.imaging.tiling import TileGrid, tile_grid, tile_weights

NO_TISSUE = 255  # label of pixels no tissue tile covered, when the classes have no background


@dataclass
class SlidePlan:
    grid: TileGrid  # at the prediction mpp
    mpp: float
    thumbnail: np.ndarray
    mask: np.ndarray  # tissue on the thumbnail
    tissue_tiles: np.ndarray  # indices into grid.origins() of the tiles that go through the backbone


def plan_slide(slide: Slide, predictor: Predictor, mpp: float, use_tissue_mask: bool = True,
               threshold: float | None = None) -> SlidePlan:
    width, height = slide.size_at(mpp)
    t = predictor.config.tiling
    grid = tile_grid(height, width, t.tile_size, t.stride)
    thumbnail = slide.thumbnail()
    mask = tissue_mask(thumbnail, threshold) if use_tissue_mask else np.ones(thumbnail.shape[:2], dtype=bool)
    return SlidePlan(grid, mpp, thumbnail, mask, tiles_on_tissue(grid, mask))


def tiles_on_tissue(grid: TileGrid, mask: np.ndarray) -> np.ndarray:
    """Tiles whose footprint touches tissue on the mask (the mask spans the image, at any scale)."""
    scale_y, scale_x = mask.shape[0] / grid.height, mask.shape[1] / grid.width
    summed = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
    summed[1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1)
    keep = []
    for index, (y, x) in enumerate(grid.origins()):
        top, left = y - grid.pad_top, x - grid.pad_left
        r0 = int(np.clip(np.floor(top * scale_y), 0, mask.shape[0]))
        r1 = int(np.clip(np.ceil((top + grid.tile_size) * scale_y), 0, mask.shape[0]))
        c0 = int(np.clip(np.floor(left * scale_x), 0, mask.shape[1]))
        c1 = int(np.clip(np.ceil((left + grid.tile_size) * scale_x), 0, mask.shape[1]))
        if summed[r1, c1] - summed[r0, c1] - summed[r1, c0] + summed[r0, c0] > 0:
            keep.append(index)
    return np.asarray(keep, dtype=np.int64)


def compute_tiles(slide: Slide, slide_id: str, predictor: Predictor, plan: SlidePlan, work: SlideWork,
                  advance: Callable[[int], object]) -> int:
    """Backbone and head over every unflagged batch of tissue tiles; returns the tiles computed.

    A reader thread reads and resamples batch k+1 from the slide while the model runs batch k (OpenSlide
    and the resampling release the GIL), so the model does not wait on the file.
    """
    grid, size = plan.grid, predictor.tile_size
    origins = np.asarray(grid.origins()).reshape(-1, 2)
    tiles = work.tiles
    output_size = predictor.logits_size()
    pending = work.pending_batches()

    def read(batch: int) -> tuple[np.ndarray, list[str]]:
        start, stop = work.batch_range(batch)
        chosen = origins[tiles[start:stop]]
        pixels = np.stack([slide.read(int(x) - grid.pad_left, int(y) - grid.pad_top, size, size, plan.mpp)
                           for y, x in chosen])
        return pixels, [f"{slide_id}:{y}:{x}" for y, x in chosen]

    computed = 0
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pathseg-slide-read") as reader:
        upcoming = reader.submit(read, pending[0]) if pending else None
        for position, batch in enumerate(pending):
            pixels, keys = upcoming.result()
            if position + 1 < len(pending):
                upcoming = reader.submit(read, pending[position + 1])
            work.write_batch(batch, predictor.tile_logits(pixels, keys, output_size))
            computed += len(keys)
            advance(len(keys))
    return computed


def softmax(logits: np.ndarray) -> np.ndarray:
    """Class probabilities along axis 0."""
    shifted = np.exp(logits - logits.max(axis=0, keepdims=True))
    return shifted / shifted.sum(axis=0, keepdims=True)


def blend_labels(plan: SlidePlan, work: SlideWork, predictor: Predictor, labels: zarr.Array,
                 empty_label: int, probabilities: zarr.Array | None = None,
                 fold: tuple[int, int] | None = None) -> None:
    """Blend the stored tile logits strip by strip into `labels` (height, width) at the prediction mpp, and
    into `probabilities` (the head's classes, height, width; 0 where no tissue tile reached) when given.
    `fold` puts a contour head's contour back into the class it covers in `labels` (contours.py)."""
    grid = plan.grid
    size, stride = grid.tile_size, grid.stride
    weights = tile_weights(size, predictor.config.evaluate.blend)
    position = {int(tile): k for k, tile in enumerate(work.tiles)}
    classes = len(predictor.class_names)
    for top in range(0, grid.height, stride):
        bottom = min(top + stride, grid.height)
        padded_top, padded_bottom = top + grid.pad_top, bottom + grid.pad_top
        total = np.zeros((classes, padded_bottom - padded_top, grid.padded_width), dtype=np.float32)
        count = np.zeros((padded_bottom - padded_top, grid.padded_width), dtype=np.float32)
        rows = [r for r in range(grid.rows) if r * stride < padded_bottom and r * stride + size > padded_top]
        wanted = [(r, c) for r in rows for c in range(grid.cols) if r * grid.cols + c in position]
        if wanted:
            stored = work.read(np.asarray([position[r * grid.cols + c] for r, c in wanted]))
            upsampled = F.interpolate(torch.from_numpy(stored), size=(size, size), mode="bilinear",
                                      align_corners=False).numpy()
            for (r, c), tile_logits in zip(wanted, upsampled, strict=True):
                y0, y1 = max(padded_top, r * stride), min(padded_bottom, r * stride + size)
                inside = slice(y0 - r * stride, y1 - r * stride)
                band = slice(y0 - padded_top, y1 - padded_top)
                columns = slice(c * stride, c * stride + size)
                total[:, band, columns] += tile_logits[:, inside] * weights[inside]
                count[band, columns] += weights[inside]
        covered = count > 0
        strip = np.where(covered, fold_prediction(total.argmax(axis=0), fold), empty_label).astype(np.uint8)
        labels[top:bottom] = strip[:, grid.pad_left : grid.pad_left + grid.width]
        if probabilities is not None:
            blended = total / np.where(covered, count, 1.0)
            chances = np.where(covered, softmax(blended), 0.0)[:, :, grid.pad_left : grid.pad_left + grid.width]
            probabilities[:, top:bottom] = chances.astype(np.float16)
