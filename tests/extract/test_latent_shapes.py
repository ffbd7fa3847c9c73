"""Backbones whose latents are not VQ-f4's 3 channels at 1/4 of the tile: KL-f8 and VQ-f8, end to end.

`pathseg pretrain` and `convert-ldm` can make such backbones; extraction must take the latent shape from
the backbone, not assume the paper's.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel, VQModel
from pathseg.extract.backbone import Backbone, SSLProjector, ldm_scheduler, unet_config, vq_config
from pathseg.extract.runner import run_extraction
from pathseg.train_head.evaluate import evaluate_run
from pathseg.train_head.fit import fit_head

from pathseg.errors import PathsegError
from pathseg.store import FeatureStore
from tests.conftest import small_config


def _save_backbone(directory, first_stage, latent_channels: int):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_config(32, [1, 2, 3, 5], 1, [False, True, True, True], context_dim=64,
                                              in_channels=latent_channels, sample_size=16))
    projector = SSLProjector(context_dim=64)
    Backbone(unet, first_stage, ldm_scheduler(), projector, "test", "x").save(directory)
    return directory


def kl_f8(directory):
    torch.manual_seed(0)
    first_stage = AutoencoderKL(block_out_channels=[32, 32, 64, 64], down_block_types=["DownEncoderBlock2D"] * 4,
                                up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, layers_per_block=1,
                                norm_num_groups=32)
    return _save_backbone(directory, first_stage, 4)


def vq_f8(directory):
    torch.manual_seed(0)
    first_stage = VQModel(**vq_config(32, [1, 1, 2, 2], 1, z_channels=4, embed_dim=4, n_embed=64))
    return _save_backbone(directory, first_stage, 4)


@pytest.mark.parametrize("make", [kl_f8, vq_f8], ids=["kl-f8", "vq-f8"])
def test_f8_four_channel_backbones_extract_fit_and_evaluate(tmp_path, make):
    backbone = make(tmp_path / "backbone")
    config = small_config(tmp_path, **{"backbone.name": str(backbone), "extract.timesteps": [50],
                                       "extract.blocks": ["up1", "up3.1"], "train.epochs": 1})
    store = FeatureStore.open(run_extraction(config, show_progress=False).store)
    z0 = store.group["latents/z0"]
    assert z0.shape[1:] == (4, 16, 16)  # 128 px tiles, f8
    assert store.feature_array(50, "up1").shape[1:] == (96, 8, 8)  # up_blocks[1] ends upsampled: 1/2 of z_0
    assert store.feature_array(50, "up3.1").shape[1:] == (32, 16, 16)
    assert np.isfinite(store.read_features(50, "up3.1", np.arange(3))).all()
    result = fit_head(config, show_progress=False)
    metrics = evaluate_run(config, result.run_dir, show_progress=False).metrics
    assert 0.0 <= metrics["splits"]["test"]["pixel_accuracy"] <= 1.0


def test_tile_size_that_the_backbone_cannot_divide_is_refused_up_front(tmp_path):
    backbone = kl_f8(tmp_path / "backbone")
    config = small_config(tmp_path, **{"backbone.name": str(backbone), "tiling.tile_size": 96, "tiling.stride": 64})
    with pytest.raises(PathsegError, match="tile_size 96 does not fit .* need a multiple of 64"):
        run_extraction(config, show_progress=False)
    assert not list((tmp_path / "cache").glob("*.zarr"))


def test_first_stage_and_unet_that_disagree_on_channels_are_refused(tmp_path):
    backbone = vq_f8(tmp_path / "backbone")
    config_file = backbone / "unet" / "config.json"
    unet = json.loads(config_file.read_text())
    unet["in_channels"] = 3
    config_file.write_text(json.dumps(unet))
    config = small_config(tmp_path, **{"backbone.name": str(backbone)})
    with pytest.raises(PathsegError, match="4-channel latents but its UNet takes 3 channels"):
        run_extraction(config, show_progress=False)
