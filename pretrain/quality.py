"""How well the frozen first stage gives tiles back, measured where it matters: held-out tiles at extraction size.

Every diffusion feature is computed from z_0, so a first stage that loses nuclei or paints a bright rim at
tile borders caps what any head can do. The record gives PSNR and SSIM on whole tiles of a split not
trained on (`pretrain.quality_split`, `val` by default), cut exactly as extraction cuts them. It also gives
PSNR apart for the border band and the interior, because a rim shows as a border PSNR well below the interior's.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from pathseg.pretrain.data import DatasetTiles, to_unit_tensor
from pathseg.pretrain.first_stage import reconstruct, ssim

from pathseg.config import PipelineConfig
from pathseg.errors import PathsegError

BORDER_FRACTION = 1 / 16  # 16 px of a 256 px tile


def quality_tiles(config: PipelineConfig, training_tiles) -> tuple[np.ndarray, dict[str, Any]]:
    """Up to `pretrain.quality_tiles` whole tiles spread over the quality split, and where they come from.

    Slides, a dataset without that split, or a null split fall back to training tiles, and the record says so.
    """
    s = config.pretrain
    count = s.quality_tiles
    if s.quality_split is not None and s.slides is None:
        held_out = s.quality_split not in s.splits
        split_config = config.model_copy(deep=True)
        split_config.pretrain.splits = [s.quality_split]
        try:
            reader = DatasetTiles(split_config)
        except PathsegError:
            reader = None
        if reader is not None and len(reader.image_of):
            picked = np.linspace(0, len(reader.image_of) - 1, min(count, len(reader.image_of))).round()
            return reader.read(picked.astype(np.int64)), {"split": s.quality_split, "held_out": held_out}
    return training_tiles(count), {"split": "training tiles", "held_out": False}


def psnr(error: np.ndarray) -> float:
    mse = float(np.mean(error**2))
    return float(10 * math.log10(1.0 / mse)) if mse > 0 else float("inf")


def decoded_batches(first_stage, tiles: np.ndarray, device: torch.device, batch_size: int,
                    autocast) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(tiles, what the frozen first stage gives back), batch by batch, both (B, 3, H, W) in [0, 1]; the
    reconstruction rounded to what a uint8 picture of it holds."""
    for start in range(0, len(tiles), batch_size):
        images = to_unit_tensor(tiles[start : start + batch_size], device)
        with torch.no_grad(), autocast():
            decoded = reconstruct(first_stage, images * 2.0 - 1.0).float()
        yield images, ((decoded.clamp(-1, 1) + 1) * 127.5).round() / 255.0


def first_stage_quality(first_stage, tiles: np.ndarray, device: torch.device, batch_size: int,
                        autocast) -> dict[str, Any] | None:
    """L1, PSNR and SSIM over `tiles` (uint8, whole tiles), and PSNR of the border band against the interior."""
    if not len(tiles):
        return None
    rebuilt, similarity = [], []
    for images, decoded01 in decoded_batches(first_stage, tiles, device, batch_size, autocast):
        similarity.append(float(ssim(decoded01, images)) * len(images))
        rebuilt.append(decoded01.permute(0, 2, 3, 1).cpu().numpy())
    error = np.concatenate(rebuilt) - tiles.astype(np.float32) / 255.0
    size = tiles.shape[1]
    band = max(1, round(size * BORDER_FRACTION))
    border = np.ones((size, size), dtype=bool)
    border[band:-band, band:-band] = False
    return {
        "tiles": len(tiles),
        "tile_size": size,
        "l1": float(np.mean(np.abs(error))),
        "psnr_db": psnr(error),
        "ssim": sum(similarity) / len(tiles),
        "border_px": band,
        "border_psnr_db": psnr(error[:, border]),
        "interior_psnr_db": psnr(error[:, ~border]),
    }
