"""The first stage's quality record: PSNR and SSIM on whole held-out tiles, and a rim seen as a border PSNR."""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import pytest
import torch
from pathseg.pretrain import quality
from pathseg.pretrain.quality import first_stage_quality, quality_tiles

from tests.pretrain.test_pretraining import pretrain_config, pretrained  # noqa: F401


def test_a_bright_rim_shows_as_a_border_psnr_below_the_interior(monkeypatch):
    tiles = np.random.default_rng(0).integers(40, 200, (3, 64, 64, 3), dtype=np.uint8)

    def with_rim(model, images):
        out = images.clone()
        out[..., :4, :] = 1.0
        out[..., -4:, :] = 1.0
        return out

    monkeypatch.setattr(quality, "reconstruct", with_rim)
    measured = first_stage_quality(None, tiles, torch.device("cpu"), 2, nullcontext)
    assert measured["border_px"] == 4 and measured["tiles"] == 3 and measured["tile_size"] == 64
    assert measured["interior_psnr_db"] == float("inf") and measured["border_psnr_db"] < 15
    assert measured["ssim"] < 1.0 and measured["psnr_db"] > measured["border_psnr_db"]
    monkeypatch.setattr(quality, "reconstruct", lambda model, images: images)
    perfect = first_stage_quality(None, tiles, torch.device("cpu"), 2, nullcontext)
    assert perfect["psnr_db"] == float("inf") and perfect["ssim"] == pytest.approx(1.0, abs=1e-5)


def test_quality_tiles_come_from_the_held_out_split_or_say_they_do_not(tmp_path):
    config = pretrain_config(tmp_path, **{"pretrain.quality_tiles": 3})
    tiles, source = quality_tiles(config, lambda count: np.zeros((count, 64, 64, 3), np.uint8))
    assert source == {"split": "val", "held_out": True} and tiles.shape == (3, 64, 64, 3) and tiles.any()
    config.pretrain.quality_split = "nope"
    tiles, source = quality_tiles(config, lambda count: np.zeros((count, 64, 64, 3), np.uint8))
    assert source == {"split": "training tiles", "held_out": False} and not tiles.any()


def test_the_record_holds_the_first_stage_quality_at_extraction_size(pretrained):  # noqa: F811
    config, _, summary = pretrained
    measured = summary.record["first_stage_quality"]
    assert measured["split"] == "val" and measured["held_out"] and measured["tile_size"] == config.tiling.tile_size
    assert 0 < measured["psnr_db"] < 60 and -1 <= measured["ssim"] <= 1 and measured["border_psnr_db"] > 0
