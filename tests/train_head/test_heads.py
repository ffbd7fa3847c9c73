"""Head kinds: the registry, the three heads, and the pixel-MLP's streaming shortcuts checked against the original."""

from __future__ import annotations

import pytest
import torch
from pathseg.train_head.evaluate import evaluate_run
from pathseg.train_head.fit import fit_head, segmentation_loss
from pathseg.train_head.head import SegmentationHead
from pathseg.train_head.head_base import ConvHead
from pathseg.train_head.heads import build_head, head_kinds
from pathseg.train_head.linear_head import LinearProbeHead
from pathseg.train_head.pixel_mlp import PixelMLP, PixelMLPEnsemble, pixel_grid, sample_pixels
from pathseg.train_head.runs import Run, load_run, save_head
from torch import nn
from torch.nn import functional as F

from pathseg.errors import PathsegError

SMALL_MLP = {"mlp_hidden": [16, 8], "ensemble": 2, "pixels_per_tile": 256}
CHANNELS = [6, 5, 3, 4]
SIZES = [4, 12, 16, 12]


def features(batch: int = 2, seed: int = 0) -> list[torch.Tensor]:
    """Maps of three sizes, one of which (12) does not divide the tile sizes used, so interpolation is not trivial,
    and two of which share a size, as one block at two timesteps does."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, s, s, generator=generator) for c, s in zip(CHANNELS, SIZES, strict=True)]


def upsampled(maps: list[torch.Tensor], size: int) -> torch.Tensor:
    """What ddpm-segmentation holds in RAM: every map at the tile size, concatenated per pixel."""
    return torch.cat([F.interpolate(m, size=(size, size), mode="bilinear", align_corners=False) for m in maps], 1)


@pytest.mark.parametrize("kind", ["conv", "linear", "pixel-mlp"])
def test_every_kind_builds_from_the_registry_and_gives_tile_logits(kind):
    torch.manual_seed(0)
    head = build_head(kind, CHANNELS, 3, SMALL_MLP)
    assert head.num_classes == 3
    logits = head.eval()(features(), output_size=32)
    assert logits.shape == (2, 3, 32, 32) and torch.isfinite(logits).all()
    head.train()
    labels = torch.randint(0, 3, (2, 32, 32))
    out, targets = head.training_outputs(features(), labels, 32, torch.Generator().manual_seed(0), None)
    loss = segmentation_loss(out, targets, "ce+dice", None)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in head.parameters())


def test_registry_lists_the_kinds_and_refuses_others_in_one_line():
    assert head_kinds() == ["conv", "linear", "pixel-mlp", "conv-image", "unet-resnet18", "fcn8-vgg16"]
    assert isinstance(build_head("linear", CHANNELS, 2, {}), LinearProbeHead)
    with pytest.raises(PathsegError) as error:
        build_head("x", CHANNELS, 2, {})
    kinds = "conv, linear, pixel-mlp, conv-image, unet-resnet18, fcn8-vgg16"
    assert str(error.value) == f"head.kind 'x' is not one of {kinds}"


def test_cli_refuses_an_unknown_head_kind_in_one_line(monkeypatch, capsys, tmp_path):
    from tests.conftest import run_cli

    monkeypatch.chdir(tmp_path)
    for flags in (["--head-kind", "mlp"], ["--set", "head.kind=mlp"]):
        code, _, err = run_cli(monkeypatch, capsys, "fit-head", "--quiet", *flags)
        assert code == 2 and "head.kind 'mlp' is not one of conv, linear, pixel-mlp" in err
        assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_conv_kind_is_the_segmentation_head_and_old_runs_load_as_conv(tmp_path):
    """A run.json from before head kinds (no head.kind, no pixel-mlp keys) loads into the same numbers."""
    torch.manual_seed(3)
    old = SegmentationHead(CHANNELS, 3, width=8, depth=1, dropout=0.0, projection_width=4).eval()
    torch.manual_seed(3)
    new = build_head("conv", CHANNELS, 3, {"width": 8, "depth": 1, "dropout": 0.0, "projection_width": 4}).eval()
    assert isinstance(new, ConvHead) and isinstance(new, SegmentationHead)
    assert old.state_dict().keys() == new.state_dict().keys()
    assert torch.equal(old(features(), 32), new(features(), 32))

    save_head(old, tmp_path / "head.safetensors")
    old_head = {"timesteps": None, "blocks": None, "width": 8, "projection_width": 4, "depth": 1, "dropout": 0.0}
    record = {"in_channels": CHANNELS, "class_names": ["a", "b", "c"], "head": old_head}
    loaded = Run(tmp_path, record).load_head()
    assert isinstance(loaded, ConvHead)
    assert torch.equal(loaded(features(), 32), old(features(), 32))


@pytest.mark.parametrize("size", [16, 48])  # 16: one map is already at the tile size
def test_pixel_mlp_first_layer_at_native_resolution_equals_upsample_then_linear(size):
    torch.manual_seed(0)
    head = PixelMLPEnsemble(CHANNELS, 3, [16, 8], ensemble=2).eval()
    maps = features()
    naive = upsampled(maps, size).permute(0, 2, 3, 1)  # (B, T, T, C_total)
    for member in head.members:
        for channels_last in (False, True):
            native = member.native_first_layer(maps, channels_last)
            assert [m.shape[-1] for m in native] == [4, 12, 16]  # native sizes only, one per size
            before = [m.clone() for m in native]
            reference = member.first(naive)
            for tile in range(2):
                hidden = member.tile_hidden(native, tile, size).view(size, size, -1)
                assert torch.allclose(hidden, reference[tile], atol=1e-5)
            assert all(torch.equal(a, b) for a, b in zip(before, native, strict=True))
    # the whole head: the mean of the members' softmax over the original per-pixel MLPs, as log-probabilities
    with torch.no_grad():
        mean = torch.stack([member.rest(member.first(naive.reshape(-1, sum(CHANNELS)))).softmax(1)
                            for member in head.members]).mean(0)
        expected = mean.log().view(2, size, size, 3).permute(0, 3, 1, 2)
        assert torch.allclose(head(maps, size), expected, atol=1e-5)


@pytest.mark.parametrize("size", [32, 48])
def test_grid_sample_at_sampled_pixels_equals_interpolate(size):
    maps = features(batch=3, seed=1)
    labels = torch.zeros(3, size, size, dtype=torch.long)
    index, _ = sample_pixels(labels, 200, torch.Generator().manual_seed(0), None)
    corners = torch.tensor([0, size - 1, size * (size - 1), size * size - 1, size // 2])  # the clamped edges
    index = torch.cat([index, corners.expand(3, -1)], dim=1)
    grid = pixel_grid(index, size)
    for mapped in maps:
        sampled = F.grid_sample(mapped, grid, mode="bilinear", padding_mode="border", align_corners=False)[..., 0]
        dense = F.interpolate(mapped, size=(size, size), mode="bilinear", align_corners=False).flatten(2)
        expected = dense.gather(2, index[:, None, :].expand(-1, mapped.shape[1], -1))
        assert torch.allclose(sampled, expected, atol=1e-5)
    torch.manual_seed(0)
    head = PixelMLPEnsemble(CHANNELS, 3, [16, 8], ensemble=1)
    member = head.members[0]
    native = member.native_first_layer(maps)
    dense_hidden = torch.stack([member.tile_hidden(native, tile, size) for tile in range(3)])
    expected = dense_hidden.gather(1, index[..., None].expand(-1, -1, 16))
    assert torch.allclose(member.sampled_hidden(native, grid), expected, atol=1e-5)


def test_ignore_index_pixels_are_never_sampled():
    labels = torch.full((3, 32, 32), 255, dtype=torch.long)
    labels[0] = torch.randint(0, 3, (32, 32))  # fully labelled
    labels[1, 5:9, 10:15] = 1  # 20 labelled pixels, fewer than asked
    # labels[2] stays unlabelled
    index, keep = sample_pixels(labels, 64, torch.Generator().manual_seed(0), 255)
    picked = labels.flatten(1).gather(1, index)
    assert (picked[keep] != 255).all()
    assert keep.sum(1).tolist() == [64, 20, 0]
    assert len(set(index[0].tolist())) == 64  # without replacement

    torch.manual_seed(0)
    head = PixelMLPEnsemble(CHANNELS, 3, [16, 8], ensemble=2, pixels_per_tile=64)
    logits, targets = head.training_outputs(features(3), labels, 32, torch.Generator().manual_seed(1), 255)
    assert logits.shape == (2, 3, 84, 1) and targets.shape == (2, 84, 1)
    assert (targets != 255).all()
    assert not torch.equal(targets[0], targets[1])  # each member draws its own pixels
    again = head.training_outputs(features(3), labels, 32, torch.Generator().manual_seed(1), 255)[1]
    assert torch.equal(targets, again)  # the generator alone decides the pixels


def test_pixel_mlp_cross_entropy_is_the_mean_of_independent_member_losses():
    torch.manual_seed(0)
    head = PixelMLPEnsemble(CHANNELS, 3, [16, 8], ensemble=3, pixels_per_tile=64)
    labels = torch.randint(0, 3, (2, 32, 32))
    logits, targets = head.training_outputs(features(), labels, 32, torch.Generator().manual_seed(0), None)
    joint = segmentation_loss(logits, targets, "ce", None)
    own = [F.cross_entropy(logits[m : m + 1], targets[m : m + 1]) for m in range(3)]
    assert torch.allclose(joint, torch.stack(own).mean())
    others = [p for member in head.members[1:] for p in member.parameters()]
    grads = torch.autograd.grad(own[0], others, allow_unused=True)
    assert all(g is None or not g.any() for g in grads)  # nothing shared: member 0's loss moves only member 0


def test_pixel_mlp_forward_holds_one_tile_per_member_at_a_time(monkeypatch):
    """Every tile-size tensor in the forward pass is one tile's: the batch and the ensemble are looped over."""
    torch.manual_seed(0)
    head = PixelMLPEnsemble(CHANNELS, 3, [16, 8], ensemble=3).eval()
    size, batch = 40, 4
    hidden_shapes: list[tuple[int, ...]] = []
    tile_hidden = PixelMLP.tile_hidden

    def recording_hidden(self, native, tile, size):
        out = tile_hidden(self, native, tile, size)
        hidden_shapes.append(tuple(out.shape))
        return out

    upsampled_sizes: list[int] = []
    interpolate = F.interpolate

    def recording_interpolate(tensor, *args, **kwargs):
        out = interpolate(tensor, *args, **kwargs)
        upsampled_sizes.append(out.numel())
        return out

    monkeypatch.setattr(PixelMLP, "tile_hidden", recording_hidden)
    monkeypatch.setattr(F, "interpolate", recording_interpolate)
    with torch.no_grad():
        logits = head(features(batch), size)
    assert hidden_shapes == [(size * size, 16)] * (3 * batch)  # 3 members x 4 tiles, one tile's hidden map each
    assert max(upsampled_sizes) == 16 * size * size  # one tile's first-layer map, never the batch's
    assert torch.allclose(logits.exp().sum(1), torch.ones(batch, size, size), atol=1e-5)  # log mean probabilities


def test_pixel_mlp_eval_folds_batchnorm_into_the_next_linear_exactly():
    torch.manual_seed(0)
    member = PixelMLPEnsemble(CHANNELS, 3, [16, 8], ensemble=1).members[0]
    for module in member.modules():  # running statistics away from the identity, so folding has work to do
        if isinstance(module, nn.BatchNorm1d):
            module.running_mean.uniform_(-1, 1), module.running_var.uniform_(0.5, 2)
            module.weight.data.uniform_(0.5, 2), module.bias.data.uniform_(-1, 1)
    hidden = torch.randn(100, 16)
    member.eval()
    with torch.no_grad():
        assert torch.allclose(member.tail(hidden), member.rest(hidden), atol=1e-5)


@pytest.mark.parametrize("kind", ["conv", "linear", "pixel-mlp"])
def test_each_kind_trains_and_is_evaluated(extracted_small, tmp_path, kind):
    config, _ = extracted_small
    config = config.model_copy(update={"runs_dir": tmp_path / "runs"}, deep=True)
    config.head.kind = kind
    config.head.mlp_hidden, config.head.ensemble, config.head.pixels_per_tile = [32, 16], 2, 256
    result = fit_head(config, show_progress=False)
    assert len(result.history) == 2
    run = load_run(result.run_dir)
    assert run.record["head"]["kind"] == kind
    head = run.load_head()
    assert type(head) is {"conv": ConvHead, "linear": LinearProbeHead, "pixel-mlp": PixelMLPEnsemble}[kind]
    evaluation = evaluate_run(config, run, show_progress=False)
    metrics = evaluation.metrics["splits"]["test"]
    assert metrics["images"] == 2 and 0.0 <= metrics["pixel_accuracy"] <= 1.0


def test_predict_runs_a_pixel_mlp_at_the_tile_size(extracted_small, tmp_path):
    """Slides keep conv/linear logits at the finest map's size (exact: their last step is a bilinear upsampling);
    a per-pixel MLP has no such last step, so predict must run it at the tile size."""
    from pathseg.predict.predictor import Predictor
    from pathseg.train_head.fit import fit_head

    config, _ = extracted_small
    sizes = {}
    for kind in ("conv", "pixel-mlp"):
        cfg = config.model_copy(update={"runs_dir": tmp_path / kind}, deep=True)
        cfg.head.kind, cfg.head.ensemble, cfg.head.mlp_hidden, cfg.head.pixels_per_tile = kind, 1, [8], 64
        cfg.head.blocks, cfg.train.epochs, cfg.evaluate.overlays = ["up1"], 1, 0
        sizes[kind] = Predictor(fit_head(cfg, show_progress=False).run_dir).logits_size()
    assert sizes["conv"] < config.tiling.tile_size and sizes["pixel-mlp"] == config.tiling.tile_size
