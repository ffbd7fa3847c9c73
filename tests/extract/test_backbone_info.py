"""FLOPs per tile from `pathseg backbone info`: counted on the meta device, they must equal a real forward's."""

from __future__ import annotations

import json

import pytest
import torch
from pathseg.extract.backbone_info import ComputeCost, compute_per_tile
from pathseg.extract.backbone_sources import load_backbone
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from tests.conftest import run_cli


@torch.inference_mode()
def test_meta_count_equals_the_count_of_a_real_forward():
    """The math attention kernel decomposes into matmuls the counter sees (CPU's fused kernel it would miss)."""
    tile = 64
    backbone = load_backbone("tiny")
    images = torch.rand(1, 3, tile, tile) * 2 - 1
    context = backbone.projector.null_context(1)
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as encoder:
            latents = backbone.encode(images)
        with FlopCounterMode(display=False) as unet:
            backbone.unet(latents, torch.tensor([50]), encoder_hidden_states=context)
    cost = compute_per_tile("tiny", None, tile)
    assert (cost.first_stage_flops, cost.unet_flops) == (encoder.get_total_flops(), unet.get_total_flops())
    assert cost.unet_flops > 0 and cost.first_stage_flops > 0


def test_paper_sized_encoder_outweighs_one_unet_forward():
    """Why a first extraction cannot run at the bare UNet's speed: VQ-f4 at full tile resolution."""
    cost = compute_per_tile("paper-random")
    # The VQ-f4 encoder's convolutions alone, counted by hand (2 x k^2 x C_in x C_out x H x W per conv).
    def conv(c_in: int, c_out: int, side: int, k: int = 3) -> int:
        return 2 * k * k * c_in * c_out * side * side

    resnets = 4 * conv(128, 128, 256) + conv(128, 256, 128) + 3 * conv(256, 256, 128) + conv(128, 256, 128, 1) \
        + conv(256, 512, 64) + 3 * conv(512, 512, 64) + conv(256, 512, 64, 1) + 4 * conv(512, 512, 64)
    downsamplers = conv(128, 128, 128) + conv(256, 256, 64)
    ends = conv(3, 128, 256) + conv(512, 3, 64) + conv(3, 3, 64, 1)
    attention = 4 * conv(512, 512, 64, 1) + 2 * 2 * 512 * 4096 * 4096
    assert cost.first_stage_flops == resnets + downsamplers + ends + attention
    assert cost.first_stage_flops > cost.unet_flops
    assert cost.unet_share(3) == pytest.approx(3 * cost.unet_flops / (cost.first_stage_flops + 3 * cost.unet_flops))
    assert cost.unet_share(1) < cost.unet_share(3) < cost.unet_share(10) < 1


def test_unet_share_arithmetic():
    cost = ComputeCost(tile_size=256, first_stage_flops=300, unet_flops=100)
    assert cost.first_extraction_flops(3) == 600
    assert cost.unet_share(3) == 0.5
    assert cost.as_dict(timesteps=(3,))["unet_share_of_first_extraction"] == {"3": 0.5}


def test_cli_prints_blocks_and_compute(monkeypatch, capsys):
    code, out, _ = run_cli(monkeypatch, capsys, "backbone", "info", "--backbone", "tiny", "--tile-size", "128")
    assert code == 0
    assert "output_blocks.11" in out and "compute per 128 px tile" in out and "GFLOP" in out
    code, out, _ = run_cli(monkeypatch, capsys, "backbone", "info", "--backbone", "tiny", "--json")
    report = json.loads(out)
    assert {row["name"] for row in report["blocks"]} >= {"mid", "up3.2"}
    assert report["compute"]["first_stage_gflop"] == pytest.approx(compute_per_tile("tiny").first_stage_flops / 1e9)


def test_cli_without_a_first_stage_config_still_lists_blocks(tmp_path, monkeypatch, capsys):
    directory = tmp_path / "backbone"
    load_backbone("tiny").save(directory)
    (directory / "first_stage" / "config.json").unlink()
    code, out, err = run_cli(monkeypatch, capsys, "backbone", "info", "--backbone", str(directory))
    assert code == 0, err
    assert "up3.2" in out and "compute per tile not counted" in out and "first_stage/config.json" in out
