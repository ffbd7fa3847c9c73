"""The plain-torch timm ViT has timm's parameter counts, computes a ViT forward written out by hand, loads the
file layouts timm ViT weights come in, and fails on the wrong file in one line; HIPT gives token maps too.

No timm here (it cannot be imported against this CPU torch): the reference forward below is written from the
ViT's published structure with an explicit attention matrix, using the module's parameters by name.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from pathseg.extract.hipt import HIPTViT
from pathseg.extract.ssl_encoders import weights_digest
from pathseg.extract.timm_vit import TIMM_VIT_ARCHS, TimmViT, load_timm_vit, weights_identity
from safetensors.torch import save_file
from torch.nn import functional as F

from pathseg.errors import PathsegError

TINY = "vit_tiny_patch16_224"
# Published totals with the 1000-class ImageNet head: timm's model cards give 5.7M / 22.1M / 86.6M / 304.3M;
# the exact figures are torchvision's vit_b_16 / vit_l_16 `num_params` (same layout) and DeiT-Ti/S's.
PUBLISHED_WITH_HEAD = {
    "vit_tiny_patch16_224": (5_717_416, 5.7),
    "vit_small_patch16_224": (22_050_664, 22.1),
    "vit_base_patch16_224": (86_567_656, 86.6),
    "vit_large_patch16_224": (304_326_632, 304.3),
}


def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter moved off its init (zero biases, unit norms, 1e-6 tokens) so each one matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model


def images(size: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def reference_tokens(model: TimmViT, x: torch.Tensor, pos: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each block's raw output and the final normed tokens, computed from the parameters by hand."""
    p = dict(model.named_parameters())
    dim, heads = model.arch.embed_dim, model.arch.heads
    tokens = F.conv2d(x, p["patch_embed.proj.weight"], p["patch_embed.proj.bias"], stride=model.arch.patch)
    tokens = tokens.flatten(2).transpose(1, 2)
    prefix = [p[name].expand(len(x), -1, -1) for name in ("cls_token", "reg_token") if name in p]
    if model.arch.no_embed_class:  # timm's register models: positions for patches only, added before the concat
        tokens = torch.cat([*prefix, tokens + pos], dim=1)
    else:
        tokens = torch.cat([*prefix, tokens], dim=1) + pos
    b, n, _ = tokens.shape
    outputs = []
    for i in range(model.arch.depth):
        k = f"blocks.{i}."
        h = F.layer_norm(tokens, (dim,), p[k + "norm1.weight"], p[k + "norm1.bias"], eps=1e-6)
        qkv = F.linear(h, p[k + "attn.qkv.weight"], p[k + "attn.qkv.bias"])
        q, key, v = qkv.reshape(b, n, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        attention = (q @ key.transpose(-2, -1) * (dim // heads) ** -0.5).softmax(dim=-1)
        h = F.linear((attention @ v).transpose(1, 2).reshape(b, n, dim), p[k + "attn.proj.weight"],
                     p[k + "attn.proj.bias"])
        tokens = tokens + h * p.get(k + "ls1.gamma", 1.0)
        h = F.layer_norm(tokens, (dim,), p[k + "norm2.weight"], p[k + "norm2.bias"], eps=1e-6)
        h = F.linear(F.gelu(F.linear(h, p[k + "mlp.fc1.weight"], p[k + "mlp.fc1.bias"])), p[k + "mlp.fc2.weight"],
                     p[k + "mlp.fc2.bias"])
        tokens = tokens + h * p.get(k + "ls2.gamma", 1.0)
        outputs.append(tokens)
    return outputs, F.layer_norm(tokens, (dim,), p["norm.weight"], p["norm.bias"], eps=1e-6)


def as_map(tokens: torch.Tensor, side: int, prefix: int = 1) -> torch.Tensor:
    return tokens[:, prefix:].transpose(1, 2).reshape(len(tokens), -1, side, side)


@pytest.fixture(scope="module")
def tiny() -> TimmViT:
    return perturbed(load_timm_vit(TINY, "random", seed=3))


def test_parameter_counts_are_timms_without_the_head():
    for arch, (with_head, card_millions) in PUBLISHED_WITH_HEAD.items():
        assert round(with_head / 1e6, 1) == card_millions
        spec = TIMM_VIT_ARCHS[arch]
        with torch.device("meta"):  # shapes only: no memory, no init time for ViT-L
            model = TimmViT(spec)
            uni = TimmViT(dataclasses.replace(spec, init_values=1e-5))
        count = sum(p.numel() for p in model.parameters())
        assert count == with_head - (spec.embed_dim * 1000 + 1000), arch
        assert sum(p.numel() for p in uni.parameters()) == count + 2 * spec.depth * spec.embed_dim


@torch.no_grad()
def test_token_maps_match_a_hand_written_forward_at_224_and_256(tiny):
    x = images(224)
    blocks, final = reference_tokens(tiny, x, tiny.pos_embed)
    (out,) = tiny.token_maps(x)
    assert out.shape == (2, 192, 14, 14)
    torch.testing.assert_close(out, as_map(final, 14), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(tiny(x), out)

    x = images(256)
    assert tiny.pos_antialias  # timm's default
    patches = tiny.pos_embed[:, 1:].reshape(1, 14, 14, 192).permute(0, 3, 1, 2)
    for antialias in (True, False):  # timm's resample_abs_pos_embed, and its older resize_pos_embed
        grid = F.interpolate(patches, size=(16, 16), mode="bicubic", antialias=antialias)
        pos = torch.cat([tiny.pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, 256, 192)], dim=1)
        tiny.pos_antialias = antialias
        try:
            (out,) = tiny.token_maps(x)
        finally:
            tiny.pos_antialias = True
        assert out.shape == (2, 192, 16, 16)
        torch.testing.assert_close(out, as_map(reference_tokens(tiny, x, pos)[1], 16), rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_intermediate_layers_are_raw_and_minus_one_is_the_normed_output(tiny):
    x = images(224, batch=1)
    blocks, final = reference_tokens(tiny, x, tiny.pos_embed)
    third, last = tiny.token_maps(x, [3, -1])
    assert third.shape == last.shape == (1, 192, 14, 14)
    torch.testing.assert_close(last, tiny.token_maps(x)[0])
    torch.testing.assert_close(third, as_map(blocks[3], 14), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(tiny.token_maps(x, [-12])[0], as_map(blocks[0], 14), rtol=1e-4, atol=1e-4)
    for bad in ([12], [-13], []):
        with pytest.raises(PathsegError, match="out of range"):
            tiny.token_maps(x, bad)
    with pytest.raises(PathsegError, match="multiples of 16"):
        tiny.token_maps(images(200, batch=1))


def _timm_files(model: TimmViT, tmp_path):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    plain, wrapped, safe = tmp_path / "plain.pth", tmp_path / "wrapped.pth", tmp_path / "model.safetensors"
    torch.save(state, plain)
    head = {"head.weight": torch.zeros(1000, 192), "head.bias": torch.zeros(1000)}
    torch.save({"model": {f"module.{k}": v for k, v in {**state, **head}.items()}, "epoch": 3}, wrapped)
    save_file({**state, **head}, str(safe))
    return plain, wrapped, safe


@torch.no_grad()
def test_weight_files_in_timms_layouts_reproduce_the_saved_module(tiny, tmp_path):
    x = images(224, batch=1)
    expected = tiny.token_maps(x, [5, -1])
    for path in _timm_files(tiny, tmp_path):
        loaded = load_timm_vit(TINY, path)
        assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
        assert (loaded.grid, loaded.input_size, loaded.arch.init_values) == (14, 224, None)
        for got, want in zip(loaded.token_maps(x, [5, -1]), expected, strict=True):
            torch.testing.assert_close(got, want)
        assert weights_identity(TINY, path) == f"timm:{TINY}:{weights_digest(path)}"


@torch.no_grad()
def test_layer_scale_registers_and_other_grids_round_trip(tmp_path):
    spec = TIMM_VIT_ARCHS[TINY]
    variants = {
        "uni_style": (TimmViT(dataclasses.replace(spec, init_values=1e-5)), 224),  # ls1/ls2.gamma
        "grid16": (TimmViT(spec, grid=16), 256),  # pos_embed trained on 256 px tiles
        "reg4": (TimmViT(dataclasses.replace(spec, reg_tokens=4, no_embed_class=True)), 224),  # timm's reg models
        "reg4_embedded": (TimmViT(dataclasses.replace(spec, reg_tokens=4)), 224),  # pos covers cls and registers
    }
    for name, (model, size) in variants.items():
        perturbed(model.eval(), seed=7)
        path = tmp_path / f"{name}.pth"
        torch.save(model.state_dict(), path)
        loaded = load_timm_vit(TINY, path)
        assert loaded.arch == model.arch, name
        assert loaded.input_size == size
        x = images(size, batch=1)
        torch.testing.assert_close(loaded.token_maps(x, [2, -1]), model.token_maps(x, [2, -1]))
        (out,) = loaded.token_maps(x)
        assert out.shape == (1, 192, size // 16, size // 16)
        reference = reference_tokens(loaded, x, loaded.pos_embed)[1]
        torch.testing.assert_close(out, as_map(reference, size // 16, loaded.num_prefix_tokens), rtol=1e-4, atol=1e-4)
    with pytest.raises(PathsegError, match=r"24 missing: blocks\.0\.ls1\.gamma"):
        load_timm_vit(TINY, tmp_path / "grid16.pth", init_values=1e-5)


def test_wrong_files_and_names_fail_in_one_line(tiny, tmp_path):
    state = dict(tiny.state_dict())
    del state["blocks.3.attn.qkv.weight"]
    state["norm.weight"] = torch.zeros(384)
    broken = tmp_path / "broken.pth"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in state.items()}}, broken)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"nope")
    failures = {
        "1 missing: blocks.3.attn.qkv.weight": lambda: load_timm_vit(TINY, broken),
        f"1 mis-shaped: norm.weight [384] ({TINY} needs [192])": lambda: load_timm_vit(TINY, broken),
        "unknown timm ViT 'vit_huge_patch14_224'; known: vit_tiny": lambda: load_timm_vit("vit_huge_patch14_224",
                                                                                        "random"),
        "nope.safetensors does not exist": lambda: load_timm_vit(TINY, tmp_path / "nope.safetensors"),
        "nope.pth does not exist": lambda: load_timm_vit(TINY, tmp_path / "nope.pth"),
        "not a readable safetensors file": lambda: load_timm_vit(TINY, junk),
    }
    for needle, call in failures.items():
        with pytest.raises(PathsegError) as caught:
            call()
        assert needle in str(caught.value) and "\n" not in str(caught.value), needle
    small = tmp_path / "small.pth"  # a real timm file of another size: every block is mis-shaped
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in TimmViT(TIMM_VIT_ARCHS["vit_small_patch16_224"], grid=2).state_dict().items()}
    torch.save({k: torch.zeros(shape) for k, shape in shapes.items()}, small)
    with pytest.raises(PathsegError, match=r"is not a timm vit_tiny_patch16_224 checkpoint: .*mis-shaped"):
        load_timm_vit(TINY, small)


def test_random_weights_are_seeded_and_leave_the_global_generator_alone():
    before = torch.random.get_rng_state()
    first, second = load_timm_vit(TINY, "random"), load_timm_vit(TINY, "random")
    assert torch.equal(torch.random.get_rng_state(), before)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    other = load_timm_vit(TINY, "random", seed=1)
    assert not torch.equal(other.pos_embed, first.pos_embed)
    uni = load_timm_vit(TINY, "random", init_values=1e-5)
    assert torch.equal(uni.blocks[0].ls1.gamma, torch.full((192,), 1e-5))
    assert weights_identity(TINY, "random") == f"timm:{TINY}:random"


@torch.no_grad()
def test_hipt_token_maps_are_its_normed_patch_tokens():
    torch.manual_seed(0)
    model = perturbed(HIPTViT(grid=14).eval())
    x = images(256, batch=1)
    tokens = torch.cat([model.cls_token, model.patch_embed(x)], dim=1) + model.position_embedding(16, 16)
    raw = []
    for block in model.blocks:
        tokens = block(tokens)
        raw.append(tokens)
    normed = model.norm(tokens)
    torch.testing.assert_close(normed[:, 0], model(x))  # the hand-run sequence is HIPT's own forward
    last, fourth = model.token_maps(x, [-1, 4])
    assert last.shape == fourth.shape == (1, 384, 16, 16)
    torch.testing.assert_close(last, as_map(normed, 16))
    torch.testing.assert_close(fourth, as_map(raw[4], 16))
    torch.testing.assert_close(model.token_maps(x)[0], last)
