"""HIPT's ViT-S/16 loads from the original DINO/HIPT file layouts and computes what the original computes.

The reference below is a compact DINO ViT written from its published structure (explicit attention
matrix, DINO's position-embedding interpolation); the weights are random, saved the way DINO saves a
teacher, and loaded through the SSL encoder registry.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pytest
import torch
from pathseg.extract.backbone import SSLProjector
from pathseg.extract.conditioning import build_conditioning
from pathseg.extract.hipt import HIPT_MEAN, HIPT_STD, load_hipt_vit_s16
from pathseg.extract.ssl_encoders import SSL_ENCODERS, weights_digest
from pathseg.extract.ssl_plugins import load_plugin_encoder
from torch import nn
from torch.nn import functional as F

from pathseg.config import ConditioningConfig
from pathseg.errors import PathsegError


class RefAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attention = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)
        return self.proj((attention @ v).transpose(1, 2).reshape(b, n, c))


class RefBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), RefAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class RefViT(nn.Module):
    """vit_small(patch_size=16) as DINO/HIPT define it: img_size 224 (14 x 14 positions), 384-d, 12 x 6 heads."""

    def __init__(self) -> None:
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, 384, 16, 16)
        self.cls_token = nn.Parameter(torch.randn(1, 1, 384) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, 197, 384) * 0.02)
        self.blocks = nn.ModuleList(RefBlock(384, 6) for _ in range(12))
        self.norm = nn.LayerNorm(384, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, w, h = x.shape
        tokens = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1)
        n = self.pos_embed.shape[1] - 1
        if tokens.shape[1] - 1 == n and w == h:  # DINO returns the trained grid untouched
            pos = self.pos_embed
        else:
            w0, h0 = w // 16 + 0.1, h // 16 + 0.1
            side = int(math.sqrt(n))
            grid = self.pos_embed[:, 1:].reshape(1, side, side, 384).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, scale_factor=(w0 / math.sqrt(n), h0 / math.sqrt(n)), mode="bicubic")
            pos = torch.cat([self.pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, 384)], dim=1)
        tokens = tokens + pos
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)[:, 0]


@pytest.fixture(scope="module")
def reference() -> RefViT:
    torch.manual_seed(0)
    model = RefViT()
    with torch.no_grad():
        for parameter in model.parameters():  # norm affines and biases away from 1 / 0
            parameter.add_(torch.randn_like(parameter) * 0.02)
    return model.eval()


def dino_checkpoint(reference: RefViT, wrap: str) -> dict:
    """The layout DINO's main_dino.py saves: student/teacher with multi-crop (and DDP) prefixes, a head, args."""
    teacher = {f"{wrap}backbone.{k}": v for k, v in reference.state_dict().items()}
    teacher[f"{wrap}head.mlp.0.weight"] = torch.zeros(8, 384)
    teacher[f"{wrap}head.last_layer.weight_g"] = torch.ones(16, 1)
    return {"teacher": teacher, "student": teacher, "epoch": 100}


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
@pytest.mark.parametrize("wrap", ["", "module."])
def test_registry_loads_dino_teacher_layout_with_equal_outputs(tmp_path, reference, images, wrap):
    path = tmp_path / "vit256_small_dino.pth"
    torch.save(dino_checkpoint(reference, wrap), path)
    encoder = SSL_ENCODERS.get("hipt_vit_s16")(path)
    assert (encoder.input_size, encoder.mean, encoder.std) == (256, HIPT_MEAN, HIPT_STD)
    assert encoder.identity == f"hipt_vit_s16:{weights_digest(path)}"
    normalised = (images - 0.5) / 0.5
    expected = reference(normalised)
    assert expected.shape == (2, 384)
    torch.testing.assert_close(encoder.embed(images), expected, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_plain_state_dict_and_other_sizes_interpolate_like_dino(tmp_path, reference):
    path = tmp_path / "plain.pth"
    torch.save(reference.state_dict(), path)
    model = load_hipt_vit_s16(path)
    for size in (224, 320):  # 224: the trained grid, no interpolation; 320: 20 x 20
        x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(size))
        torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_dino_file_with_pickled_args_loads_its_tensors(tmp_path, reference):
    path = tmp_path / "with_args.pth"
    torch.save({**dino_checkpoint(reference, ""), "args": argparse.Namespace(arch="vit_small")}, path)
    model = load_hipt_vit_s16(path)  # the Namespace becomes an inert placeholder; the teacher's weights load
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-5)


def test_conditioning_uses_hipt_through_the_config(tmp_path, reference, images):
    path = tmp_path / "vit256_small_dino.pth"
    torch.save(dino_checkpoint(reference, ""), path)
    projector = SSLProjector(384, 768, 32)
    conditioning = build_conditioning(ConditioningConfig(mode="ssl", encoder="hipt_vit_s16", encoder_weights=path),
                                      projector)
    with torch.no_grad():
        context = conditioning(images)
        expected = projector(reference((images - 0.5) / 0.5))
    assert context.shape == (2, 2, 32)
    torch.testing.assert_close(context, expected, rtol=1e-4, atol=1e-5)
    assert conditioning.identity()["patch_encoder"].startswith("hipt_vit_s16:")


def test_wrong_keys_fail_in_one_line(tmp_path, reference):
    state = dict(reference.state_dict())
    del state["blocks.3.attn.qkv.weight"]
    state["blocks.3.attn.qkv_extra.weight"] = torch.zeros(1)
    state["norm.weight"] = torch.zeros(768)
    path = tmp_path / "broken.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in state.items()}}, path)
    with pytest.raises(PathsegError) as caught:
        load_hipt_vit_s16(path)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(str(path))
    assert "1 missing: blocks.3.attn.qkv.weight" in message
    assert "1 unexpected: blocks.3.attn.qkv_extra.weight" in message
    assert "1 mis-shaped: norm.weight [768] (ViT-S/16 needs [384])" in message


def test_missing_weights_fail_in_one_line(tmp_path):
    with pytest.raises(PathsegError, match="encoder_weights"):
        SSL_ENCODERS.get("hipt_vit_s16")(None)
    with pytest.raises(PathsegError, match="does not exist"):
        load_hipt_vit_s16(tmp_path / "nope.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"nope")
    with pytest.raises(PathsegError, match="not a readable PyTorch file"):
        load_hipt_vit_s16(junk)


# ---------------------------------------------------------------------------------------------------------
# python:package.module:factory plugins
# ---------------------------------------------------------------------------------------------------------

PLUGIN = '''
import torch
from torch import nn


class Mean(nn.Module):
    input_size = 64
    mean = (0.0, 0.0, 0.0)
    std = (1.0, 1.0, 1.0)

    def forward(self, x):
        return x.mean(dim=(2, 3)).repeat(1, 4)


def build(weights):
    return Mean()


def broken(weights):
    return "not a module"
'''


@pytest.fixture
def plugin_module(tmp_path, monkeypatch) -> str:
    (tmp_path / "lab_encoders.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "lab_encoders"
    sys.modules.pop("lab_encoders", None)


def test_plugin_factory_becomes_an_encoder(plugin_module, tmp_path):
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"123")
    encoder = load_plugin_encoder(f"python:{plugin_module}:build", weights)
    assert encoder.input_size == 64 and encoder.mean == (0.0, 0.0, 0.0)
    assert encoder.identity.startswith(f"python:{plugin_module}:build:{weights_digest(weights)}:code=")
    images = torch.rand(2, 3, 80, 80)
    assert encoder.embed(images).shape == (2, 12)
    assert load_plugin_encoder(f"python:{plugin_module}:build", None).identity.split(":")[3] == "no-weights"


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("python:lab_encoders", "python:package.module:factory"),
        ("python:no_such_module_xyz:build", "cannot import no_such_module_xyz"),
        ("python:lab_encoders:missing", "has no callable missing"),
        ("python:lab_encoders:broken", "returned str"),
    ],
)
def test_plugin_errors_are_one_line(plugin_module, spec, expected):
    with pytest.raises(PathsegError) as caught:
        load_plugin_encoder(spec, None)
    assert expected in str(caught.value) and "\n" not in str(caught.value)


def test_hipt_is_listed_in_the_registry():
    assert "hipt_vit_s16" in SSL_ENCODERS.names()
    assert Path(__file__).exists()
