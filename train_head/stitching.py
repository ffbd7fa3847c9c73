"""Whole-image logits from cached tiles: what evaluate scores, and what fit-head selects its epoch on.

Both go through here so the epoch fit-head keeps is the one that maximises the figure evaluate reports:
the same tiles, the same head, the same blending (`evaluate.blend`), the padding cropped.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from pathseg.train_head.contours import fold_prediction
from pathseg.train_head.loader import StoreLoader
from pathseg.train_head.tile_images import TileImages
from pathseg.train_head.tile_sources import InMemoryFeatures
from torch import nn

from pathseg.imaging.tiling import Stitcher
from pathseg.metrics.pixel import ConfusionMatrix, background_index_of, pixel_metrics
from pathseg.store import FeatureStore


def stitched_logits(head: nn.Module, store: FeatureStore, pairs: list[tuple[int, str]], images: list[int],
                    device: torch.device, batch_size: int, blend: str = "mean",
                    prefetch: int = 0, memory: InMemoryFeatures | None = None,
                    threads: int = 0) -> Iterator[tuple[int, np.ndarray]]:
    """(image index, (classes, H, W) blended logits) for each of `images`, in storage order.

    One loader streams the tiles of all the images in storage order, so an image's stitcher is finished and
    handed out as soon as its last tile is in: memory holds one image (two at a boundary), never a split.
    """
    entries = store.images
    tiles = np.concatenate([np.arange(entries[i].first_tile, entries[i].first_tile + entries[i].n_tiles)
                            for i in images]) if images else np.zeros(0, dtype=np.int64)
    origins = store.tile_origins()
    tile_image = store.tile_images()
    # an image-skip head's pixels: from `memory` when fit-head's plan holds them, else cut from the store
    pixels = TileImages(store) if getattr(head, "needs_image", False) else None
    loader = StoreLoader(store, pairs, tiles, batch_size, prefetch=prefetch, with_labels=False, memory=memory,
                         threads=threads, device=device, images=pixels)
    open_images: dict[int, Stitcher] = {}
    head.eval()
    for batch in loader:
        # Inference mode around the forward only, never across a yield: a consumer that raises would leave the
        # suspended generator holding it, and grad disabled in this thread until the generator is collected.
        with torch.inference_mode():
            logits = head(batch.features, store.tile_size).float().cpu().numpy()
        for tile, tile_logits in zip(batch.tiles, logits, strict=True):
            index = int(tile_image[tile])
            if index not in open_images:
                open_images[index] = Stitcher(store.image_grid(index), head.num_classes, blend)
            stitcher = open_images[index]
            stitcher.add(tuple(origins[tile]), tile_logits)
            if stitcher.complete:
                yield index, open_images.pop(index).result()


def stitched_pixel_metrics(head: nn.Module, store: FeatureStore, pairs: list[tuple[int, str]],
                           images: list[int], device: torch.device, batch_size: int, blend: str,
                           memory: InMemoryFeatures | None = None, threads: int = 0,
                           fold: tuple[int, int] | None = None) -> dict:
    """Pixel metrics of whole stitched images, pooled over `images`, exactly as evaluate computes them: on the
    store's classes, a contour head's contour folded back (`fold`, see contours.py)."""
    matrix = ConfusionMatrix(len(store.class_names), store.ignore_index)
    for index, logits in stitched_logits(head, store, pairs, images, device, batch_size, blend, memory=memory,
                                         threads=threads):
        matrix.update(store.image_labels(index), fold_prediction(logits.argmax(axis=0).astype(np.uint8), fold))
    return pixel_metrics(matrix, store.class_names, background_index_of(store.class_names))
