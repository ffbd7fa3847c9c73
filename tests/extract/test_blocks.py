import pytest
import torch
from pathseg.extract.backbone import TINY
from pathseg.extract.backbone_sources import load_backbone
from pathseg.extract.blocks import FeatureCapture, UNetLayout, block_module, block_table, canonical_block

from pathseg.errors import PathsegError


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("tiny")


def test_every_block_name_hooks_a_real_module_with_the_predicted_shape(tiny):
    table = block_table(tiny.unet)
    latents = torch.randn(2, 3, 32, 32)
    context = tiny.projector.null_context(2)
    with torch.inference_mode():
        captured = FeatureCapture(tiny.unet, list(table))(latents, torch.tensor([10, 10]), context)
    for name, info in table.items():
        assert captured[name].shape == (2, info.channels, 32 // info.downsample, 32 // info.downsample), name


def test_layer_names_map_to_diffusers_modules(tiny):
    unet = tiny.unet
    assert block_module(unet, "mid") is unet.mid_block
    assert block_module(unet, "up1") is unet.up_blocks[1]
    assert block_module(unet, "up1.2") is unet.up_blocks[1].attentions[2]  # cross-attention level
    assert block_module(unet, "up3.0") is unet.up_blocks[3].resnets[0]  # finest level has no attention


def test_output_blocks_aliases_follow_the_original_numbering(tiny):
    # original output_blocks[3i + j]; the last layer of blocks 0-2 carries the upsampler
    assert canonical_block("output_blocks.0", tiny.unet) == "up0.0"
    assert canonical_block("output_blocks.2", tiny.unet) == "up0"
    assert canonical_block("output_blocks[5]", tiny.unet) == "up1"
    assert canonical_block("output_blocks.7", tiny.unet) == "up2.1"
    assert canonical_block("output_blocks.11", tiny.unet) == "up3.2"
    assert canonical_block("middle_block", tiny.unet) == "mid"


def test_alias_resolves_from_config_without_a_model():
    layout = UNetLayout.of(TINY["unet"])
    assert canonical_block("output_blocks.8", layout) == "up2"


def test_unknown_block_lists_the_valid_ones(tiny):
    with pytest.raises(PathsegError, match=r"unknown block 'up7'.*up0\.0.*output_blocks\.K, K = 0\.\.11"):
        canonical_block("up7", tiny.unet)


def test_capture_stops_after_the_last_block_needed(tiny):
    calls = []
    handle = tiny.unet.conv_out.register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.inference_mode():
            FeatureCapture(tiny.unet, ["up1"])(torch.randn(1, 3, 16, 16), torch.tensor([5]),
                                               tiny.projector.null_context(1))
    finally:
        handle.remove()
    assert not calls


def test_tiny_has_the_paper_structure_at_small_width(tiny):
    config = tiny.unet.config
    assert list(config.block_out_channels) == [32, 64, 96, 160]  # model_channels 32, channel_mult [1, 2, 3, 5]
    assert config.down_block_types[0] == "DownBlock2D"  # no attention at the finest level
    assert all(t == "CrossAttnDownBlock2D" for t in config.down_block_types[1:])
    assert config.in_channels == 3 and config.cross_attention_dim == 64
    assert tiny.projector.null_context(3).shape == (3, 2, 64)
    assert tiny.encode(torch.zeros(1, 3, 64, 64)).shape == (1, 3, 16, 16)  # f4, 3 channels


def test_schedule_is_the_ldm_linear_in_sqrt_beta(tiny):
    betas = tiny.scheduler.betas
    expected = torch.linspace(0.0015**0.5, 0.0195**0.5, 1000, dtype=torch.float64) ** 2
    torch.testing.assert_close(betas.double(), expected, rtol=1e-5, atol=1e-8)


def test_null_context_is_the_projector_biases(tiny):
    context = tiny.projector.null_context(1)
    torch.testing.assert_close(context[0, 0], tiny.projector.patch_fc.bias)
    torch.testing.assert_close(context[0, 1], tiny.projector.region_fc.bias)


def test_hooks_are_registered_once_and_captures_on_one_unet_do_not_interfere(tiny):
    """A compiled UNet recompiled whenever hooks changed; two live captures must not stop each other early."""
    latents, steps = torch.randn(1, 3, 32, 32), torch.tensor([10])
    context = tiny.projector.null_context(1)
    early = FeatureCapture(tiny.unet, ["up1"])
    late = FeatureCapture(tiny.unet, ["up3.2", "mid"])
    module = block_module(tiny.unet, "up1")
    hooks = len(module._forward_hooks)
    with torch.inference_mode():
        for _ in range(2):
            assert set(late(latents, steps, context)) == {"up3.2", "mid"}  # early's hook on up1 stays silent
            assert set(early(latents, steps, context)) == {"up1"}
        assert len(module._forward_hooks) == hooks
        with FeatureCapture(tiny.unet, ["up1", "up3.2"], stop_early=False) as whole_pass:
            full = whole_pass(latents, steps, context)
        torch.testing.assert_close(full["up3.2"], late(latents, steps, context)["up3.2"])
    early.close()
    assert len(module._forward_hooks) == hooks - 1
    with pytest.raises(RuntimeError, match="closed"):
        early(latents, steps, context)
