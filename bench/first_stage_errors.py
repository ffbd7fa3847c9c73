"""Where a pretrained first stage's reconstruction error lies on held-out tiles: colour, coarse structure or detail.

Splits the squared error on `pretrain.quality_split` tiles (cut and decoded as pretrain.json's first_stage_quality does)
into a low-pass part (Gaussian, sigma 4 px: colour casts and tissue layout) and the rest (nuclei, edges,
texture), and gives the PSNR a per-tile, per-channel affine colour correction would reach (and one shared by
all tiles). A first stage whose
error is mostly low-pass is undertrained in a way more steps or a higher learning rate fix; one whose error is
detail needs capacity or a perceptual loss.

    python bench/first_stage_errors.py --data-root ../shared/data/glas BACKBONE_DIR [BACKBONE_DIR ...]
"""

from __future__ import annotations

import argparse
import json
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from pathseg.extract.backbone import load_first_stage
from pathseg.pretrain.quality import decoded_batches, psnr, quality_tiles
from scipy.ndimage import gaussian_filter

from pathseg.config import load_config


def fitted(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """x mapped onto y by the least-squares gain and offset, in float64 (np.polyfit on float32 pixels misfits)."""
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    gain = np.mean((x64 - x64.mean()) * (y64 - y64.mean())) / max(float(np.var(x64)), 1e-12)
    return (gain * (x64 - x64.mean()) + y64.mean()).astype(np.float32)


def affine_corrected(decoded: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Each tile's channels fitted to the target by least squares (gain and offset)."""
    out = np.empty_like(decoded)
    for i in range(len(decoded)):
        for c in range(3):
            out[i, ..., c] = fitted(decoded[i, ..., c], target[i, ..., c])
    return out


def globally_corrected(decoded: np.ndarray, target: np.ndarray) -> np.ndarray:
    """One gain and offset per channel over all tiles: a cast shared by every tile, not tile by tile."""
    out = np.empty_like(decoded)
    for c in range(3):
        out[..., c] = fitted(decoded[..., c], target[..., c])
    return out


def error_split(directory: str, tiles: np.ndarray) -> dict:
    first_stage = load_first_stage(Path(directory) / "first_stage").eval()
    batches = decoded_batches(first_stage, tiles, torch.device("cpu"), 8, nullcontext)
    decoded_tiles = np.concatenate([decoded.permute(0, 2, 3, 1).numpy() for _, decoded in batches])
    target = tiles.astype(np.float32) / 255.0
    error = decoded_tiles - target
    low = gaussian_filter(error, sigma=(0, 4, 4, 0))
    return {
        "backbone": directory,
        "psnr_db": psnr(error),
        "low_pass_share_of_mse": float(np.mean(low**2) / np.mean(error**2)),
        "psnr_if_low_pass_error_were_gone_db": psnr(error - low),
        "psnr_after_affine_colour_fit_db": psnr(affine_corrected(decoded_tiles, target) - target),
        "psnr_after_one_colour_fit_for_all_tiles_db": psnr(globally_corrected(decoded_tiles, target) - target),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("backbones", nargs="+")
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--tiles", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = load_config(None, {"dataset.name": "glas", "dataset.root": args.data_root,
                                "pretrain.quality_tiles": args.tiles})
    tiles, origin = quality_tiles(config, lambda count: (_ for _ in ()).throw(SystemExit("no quality split")))
    for directory in args.backbones:
        print(json.dumps({**error_split(directory, tiles), **origin}))


if __name__ == "__main__":
    main()
