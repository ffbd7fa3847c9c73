"""Phase 1's low-pass term: it sees what L1 + SSIM weight weakly (a tile's colour and contrast), not detail."""

from __future__ import annotations

import torch
from pathseg.pretrain.first_stage import build_first_stage, first_stage_loss, lowpass_error
from pathseg.pretrain.presets import model_configs

from pathseg.config import PretrainConfig


def test_the_low_pass_error_sees_a_colour_cast_and_not_fine_detail():
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    checker = (torch.arange(32)[:, None] + torch.arange(32)[None, :]) % 2 * 0.4 - 0.2  # zero mean in every 2 x 2
    assert float(lowpass_error(images + checker, images, pool=8)) < 1e-12
    assert abs(float(lowpass_error(images + 0.3, images, pool=8)) - 0.09) < 1e-6
    washed = images.mean() + 0.5 * (images - images.mean())  # contrast halved toward the mean
    assert float(lowpass_error(washed, images, pool=8)) > 0
    assert float(lowpass_error(images[..., :6, :6] + 0.3, images[..., :6, :6], pool=8)) > 0.08  # tile below pool


def test_the_term_is_logged_apart_and_adds_to_the_loss_only_when_weighted():
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    for kind in ("vq", "kl"):
        settings = PretrainConfig(first_stage=kind, first_stage_width=8, unet_width=8)
        configs = model_configs(settings)
        model = build_first_stage(configs["first_stage_class"], configs["first_stage"], seed=0)
        loss, parts = first_stage_loss(model, images, settings, torch.Generator().manual_seed(0))
        assert set(parts) == {"reconstruction", "regulariser"}
        weighted = settings.model_copy(update={"lowpass_weight": 2.0, "lowpass_pool": 4})
        loss2, parts2 = first_stage_loss(model, images, weighted, torch.Generator().manual_seed(0))
        assert set(parts2) == {"reconstruction", "regulariser", "lowpass"} and parts2["lowpass"] > 0
        assert abs(float(loss2.detach()) - float(loss.detach()) - parts2["lowpass"]) < 1e-5
