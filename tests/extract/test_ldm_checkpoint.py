"""The paper's original checkpoint format, converted and checked number for number.

The checkpoints here are built from a compact re-implementation of the original modules (openaimodel's
UNet with spatial transformers, the taming VQ autoencoder, the SSL embedder, the LatentDiffusion schedule
buffers), written from their published structure with their original parameter names. Every parameter is
perturbed away from its default init (including the usually zero-initialised output convolutions and the
norm affines), so a swapped or misplaced tensor shows up as a numeric difference, not just a load.
"""

from __future__ import annotations

import argparse
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from pathseg.extract.backbone import PAPER, Backbone, ldm_scheduler, load_backbone_dir
from pathseg.extract.backbone_info import build_from_ldm_yaml, describe_blocks, describe_ldm_yaml, format_block_table
from pathseg.extract.backbone_sources import load_backbone
from pathseg.extract.blocks import FeatureCapture, canonical_block
from pathseg.extract.ldm_checkpoint import convert_ldm, convert_ldm_state_dict, load_ldm_checkpoint
from pathseg.extract.ldm_yaml import backbone_configs_from_yaml, ldm_schedule_buffers, read_ldm_yaml
from torch import nn
from torch.nn import functional as F

from pathseg.errors import PathsegError

FIXTURES = Path(__file__).parents[1] / "fixtures" / "ldm"
SMALL_YAML = FIXTURES / "small_only_ssl.yaml"
PAPER_YAML = FIXTURES / "paper_only_ssl.yaml"

# ---------------------------------------------------------------------------------------------------------
# A compact reference of the original modules (original parameter names, original forward semantics)
# ---------------------------------------------------------------------------------------------------------


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, cin: int, emb: int, cout: int) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(32, cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb, cout))
        self.out_layers = nn.Sequential(nn.GroupNorm(32, cout), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(cout, cout, 3, padding=1))
        self.skip_connection = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    def __init__(self, dim: int, context_dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        self.heads, self.scale = heads, dim_head**-0.5
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_k = nn.Linear(context_dim, heads * dim_head, bias=False)
        self.to_v = nn.Linear(context_dim, heads * dim_head, bias=False)
        self.to_out = nn.Sequential(nn.Linear(heads * dim_head, dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        b, n, _ = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, t.shape[1], self.heads, -1).transpose(1, 2)

        q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
        attention = (q @ k.transpose(-1, -2) * self.scale).softmax(dim=-1)
        return self.to_out((attention @ v).transpose(1, 2).reshape(b, n, -1))


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int) -> None:
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, dim_head)
        self.ff = nn.Module()
        self.ff.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Dropout(0.0), nn.Linear(4 * dim, dim))
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff.net(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    def __init__(self, channels: int, heads: int, dim_head: int, context_dim: int) -> None:
        super().__init__()
        inner = heads * dim_head
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(inner, heads, dim_head, context_dim)])
        self.proj_out = nn.Conv2d(inner, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        return self.proj_out(tokens.transpose(1, 2).reshape(b, -1, h, w)) + x


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """openaimodel.UNetModel with use_spatial_transformer, legacy head sizing, conv resampling."""

    def __init__(self, p: dict) -> None:
        super().__init__()
        mc, mults, nrb = p["model_channels"], p["channel_mult"], p["num_res_blocks"]
        heads, ctx, attn = p["num_heads"], p["context_dim"], set(p["attention_resolutions"])
        ted = 4 * mc
        self.model_channels = mc
        self.time_embed = nn.Sequential(nn.Linear(mc, ted), nn.SiLU(), nn.Linear(ted, ted))
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(p["in_channels"], mc, 3, padding=1))])
        chans, ch, ds = [mc], mc, 1
        for level, mult in enumerate(mults):
            for _ in range(nrb):
                layers: list[nn.Module] = [ResBlock(ch, ted, mult * mc)]
                ch = mult * mc
                if ds in attn:
                    layers.append(SpatialTransformer(ch, heads, ch // heads, ctx))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                chans.append(ch)
            if level != len(mults) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                chans.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, ted, ch), SpatialTransformer(ch, heads, ch // heads, ctx), ResBlock(ch, ted, ch)
        )
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(mults))):
            for i in range(nrb + 1):
                layers = [ResBlock(ch + chans.pop(), ted, mc * mult)]
                ch = mc * mult
                if ds in attn:
                    layers.append(SpatialTransformer(ch, heads, ch // heads, ctx))
                if level and i == nrb:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(nn.GroupNorm(32, ch), nn.SiLU(), nn.Conv2d(mc, p["out_channels"], 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor):
        emb = self.time_embed(timestep_embedding(t, self.model_channels))
        skips, h = [], x
        for module in self.input_blocks:
            h = module(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        middle, outputs = h, []
        for module in self.output_blocks:
            h = module(torch.cat([h, skips.pop()], dim=1), emb, context)
            outputs.append(h)
        return self.out(h), middle, outputs


def normalize(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = normalize(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.dropout, self.conv2 = normalize(cout), nn.Dropout(0.0), nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm = normalize(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        b, c, hh, ww = x.shape
        q = self.q(h).reshape(b, c, -1).permute(0, 2, 1)
        k, v = self.k(h).reshape(b, c, -1), self.v(h).reshape(b, c, -1)
        weights = torch.softmax(torch.bmm(q, k) * c**-0.5, dim=2)
        return x + self.proj_out(torch.bmm(v, weights.permute(0, 2, 1)).reshape(b, c, hh, ww))


class VQDownsample(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


def mid_block(c: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)
    return mid


class Encoder(nn.Module):
    def __init__(self, dd: dict) -> None:
        super().__init__()
        ch, mults, nrb = dd["ch"], dd["ch_mult"], dd["num_res_blocks"]
        self.conv_in = nn.Conv2d(dd["in_channels"], ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = ch
        for level, mult in enumerate(mults):
            down = nn.Module()
            down.block = nn.ModuleList()
            for _ in range(nrb):
                down.block.append(ResnetBlock(block_in, ch * mult))
                block_in = ch * mult
            down.attn = nn.ModuleList()
            if level != len(mults) - 1:
                down.downsample = VQDownsample(block_in)
            self.down.append(down)
        self.mid = mid_block(block_in)
        self.norm_out, self.conv_out = normalize(block_in), nn.Conv2d(block_in, dd["z_channels"], 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for down in self.down:
            for block in down.block:
                h = block(h)
            if hasattr(down, "downsample"):
                h = down.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, dd: dict) -> None:
        super().__init__()
        ch, mults, nrb = dd["ch"], dd["ch_mult"], dd["num_res_blocks"]
        block_in = ch * mults[-1]
        self.conv_in = nn.Conv2d(dd["z_channels"], block_in, 3, padding=1)
        self.mid = mid_block(block_in)
        self.up = nn.ModuleList()
        for level in reversed(range(len(mults))):
            up = nn.Module()
            up.block = nn.ModuleList()
            for _ in range(nrb + 1):
                up.block.append(ResnetBlock(block_in, ch * mults[level]))
                block_in = ch * mults[level]
            up.attn = nn.ModuleList()
            if level != 0:
                up.upsample = Upsample(block_in)
            self.up.insert(0, up)
        self.norm_out, self.conv_out = normalize(block_in), nn.Conv2d(block_in, dd["out_ch"], 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(range(len(self.up))):
            for block in self.up[level].block:
                h = block(h)
            if level != 0:
                h = self.up[level].upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VQModelInterface(nn.Module):
    def __init__(self, p: dict) -> None:
        super().__init__()
        dd = p["ddconfig"]
        self.encoder, self.decoder = Encoder(dd), Decoder(dd)
        self.quantize = nn.Module()
        self.quantize.embedding = nn.Embedding(p["n_embed"], p["embed_dim"])
        self.quant_conv = nn.Conv2d(dd["z_channels"], p["embed_dim"], 1)
        self.post_quant_conv = nn.Conv2d(p["embed_dim"], dd["z_channels"], 1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))

    def decode(self, h: torch.Tensor) -> torch.Tensor:
        codebook = self.quantize.embedding.weight
        flat = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])
        nearest = torch.cdist(flat, codebook).argmin(dim=1)
        quant = codebook[nearest].reshape(h.shape[0], h.shape[2], h.shape[3], -1).permute(0, 3, 1, 2)
        return self.decoder(self.post_quant_conv(quant))


class SSLEmbedder(nn.Module):
    def __init__(self, patch_dim: int, region_dim: int, context_dim: int) -> None:
        super().__init__()
        self.patch_fc, self.region_fc = nn.Linear(patch_dim, context_dim), nn.Linear(region_dim, context_dim)

    def forward(self, patch: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
        patch, region = F.normalize(patch, dim=-1), F.normalize(region, dim=-1)
        return torch.stack([self.patch_fc(patch), self.region_fc(region)], dim=1)


def reference_schedule(start: float, end: float, n: int) -> dict[str, np.ndarray]:
    """LatentDiffusion.register_schedule for the "linear" schedule, in numpy as the original computes it."""
    betas = np.linspace(start**0.5, end**0.5, n, dtype=np.float64) ** 2
    alphas = 1.0 - betas
    cumprod = np.cumprod(alphas)
    prev = np.append(1.0, cumprod[:-1])
    posterior = betas * (1.0 - prev) / (1.0 - cumprod)
    return {
        "betas": betas,
        "alphas_cumprod": cumprod,
        "alphas_cumprod_prev": prev,
        "sqrt_alphas_cumprod": np.sqrt(cumprod),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - cumprod),
        "log_one_minus_alphas_cumprod": np.log(1.0 - cumprod),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / cumprod),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / cumprod - 1),
        "posterior_variance": posterior,
        "posterior_log_variance_clipped": np.log(np.maximum(posterior, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(prev) / (1.0 - cumprod),
        "posterior_mean_coef2": (1.0 - prev) * np.sqrt(alphas) / (1.0 - cumprod),
    }


class LatentDiffusion(nn.Module):
    """Just the state the Lightning module saves: model.diffusion_model, first/cond stage, buffers, extras."""

    def __init__(self, raw: dict, linear_end: float | None = None) -> None:
        super().__init__()
        p = raw["model"]["params"]
        self.model = nn.Module()
        self.model.diffusion_model = UNetModel(p["unet_config"]["params"])
        self.first_stage_model = VQModelInterface(p["first_stage_config"]["params"])
        cond = p["cond_stage_config"]["params"]
        self.cond_stage_model = SSLEmbedder(cond["patch_embed_dim"], cond["region_embed_dim"],
                                            p["unet_config"]["params"]["context_dim"])
        end = p["linear_end"] if linear_end is None else linear_end
        for name, value in reference_schedule(p["linear_start"], end, p["timesteps"]).items():
            self.register_buffer(name, torch.tensor(value, dtype=torch.float32))
        self.inception = nn.Conv2d(3, 4, 1)  # the FID tracker the Lightning module carries along


def build_reference(yaml_path: Path = SMALL_YAML, seed: int = 0, **kwargs) -> LatentDiffusion:
    import yaml

    raw = yaml.safe_load(yaml_path.read_text())
    torch.manual_seed(seed)
    model = LatentDiffusion(raw, **kwargs)
    with torch.no_grad():
        for parameter in model.parameters():  # away from zero-init outputs and unit/zero norm affines
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model.eval()


def save_ckpt(path: Path, state: dict, **extra) -> Path:
    torch.save({"state_dict": state, "epoch": 3, "global_step": 1200, **extra}, path)
    return path


@pytest.fixture(scope="module")
def reference() -> LatentDiffusion:
    return build_reference()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, reference) -> Path:
    state = dict(reference.state_dict())
    state["model_ema.decay"] = torch.tensor(0.9999)
    state["model_ema.num_updates"] = torch.tensor(1200)
    return save_ckpt(tmp_path_factory.mktemp("ckpt") / "model.ckpt", state)


@pytest.fixture(scope="module")
def backbone(ckpt) -> Backbone:
    return load_ldm_checkpoint(ckpt, SMALL_YAML)


def inputs(seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 3, 16, 16, generator=generator)
    timesteps = torch.tensor([50, 700])
    patch, region = torch.randn(2, 24, generator=generator), torch.randn(2, 40, generator=generator)
    return latents, timesteps, patch, region


ALL_BLOCKS = [f"output_blocks.{k}" for k in range(12)] + ["mid"]

# ---------------------------------------------------------------------------------------------------------
# 1. Numbers: the converted backbone computes what the original modules compute
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_converted_unet_matches_original_eps_and_every_decoder_block(reference, backbone):
    latents, timesteps, patch, region = inputs()
    context = reference.cond_stage_model(patch, region)
    eps_ref, middle_ref, outputs_ref = reference.model.diffusion_model(latents, timesteps, context)

    eps = backbone.unet(latents, timesteps, encoder_hidden_states=context).sample
    torch.testing.assert_close(eps, eps_ref, rtol=1e-4, atol=1e-4)
    assert eps.abs().mean() > 0.1  # a real signal, not a vanishing output

    features = FeatureCapture(backbone.unet, ALL_BLOCKS)(latents, timesteps, context)
    torch.testing.assert_close(features["mid"], middle_ref, rtol=1e-4, atol=1e-4)
    for k in range(12):
        name = canonical_block(f"output_blocks.{k}", backbone.unet)
        torch.testing.assert_close(features[name], outputs_ref[k], rtol=1e-4, atol=1e-4, msg=f"output_blocks.{k}")


@torch.no_grad()
def test_projector_and_null_context_match_the_original_ssl_embedder(reference, backbone):
    _, _, patch, region = inputs()
    torch.testing.assert_close(backbone.projector(patch, region), reference.cond_stage_model(patch, region))
    zeros = reference.cond_stage_model(torch.zeros(3, 24), torch.zeros(3, 40))  # what p_uncond training saw
    torch.testing.assert_close(backbone.projector.null_context(3), zeros)
    biases = torch.stack([reference.cond_stage_model.patch_fc.bias, reference.cond_stage_model.region_fc.bias])
    torch.testing.assert_close(backbone.projector.null_context(1)[0], biases)


@torch.no_grad()
def test_first_stage_encode_is_prequant_latent_and_decode_matches(reference, backbone):
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    z_ref = reference.first_stage_model.encode(images)
    z = backbone.encode(images)
    assert z.shape == (2, 3, 16, 16)
    torch.testing.assert_close(z, z_ref, rtol=1e-4, atol=1e-4)
    decoded = backbone.first_stage.decode(z_ref).sample  # through the codebook, as VQModelInterface.decode
    torch.testing.assert_close(decoded, reference.first_stage_model.decode(z_ref), rtol=1e-4, atol=1e-4)


def test_schedule_and_identity(backbone, ckpt):
    assert backbone.scheduler.config.beta_schedule == "scaled_linear"
    torch.testing.assert_close(backbone.scheduler.alphas_cumprod.double(),
                               torch.tensor(reference_schedule(0.0015, 0.0195, 1000)["alphas_cumprod"]),
                               rtol=1e-5, atol=1e-6)
    assert backbone.source == str(ckpt.resolve())
    from pathseg.extract.backbone import file_digest

    assert backbone.digest == file_digest([ckpt])
    assert backbone.latent_scale == 1.0


def test_load_backbone_routes_ckpt_with_its_yaml(ckpt, backbone):
    loaded = load_backbone(str(ckpt), config_path=SMALL_YAML)
    assert loaded.digest == backbone.digest
    for a, b in zip(loaded.unet.state_dict().values(), backbone.unet.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_bare_state_dict_and_lightning_extras_load(tmp_path, reference):
    bare = tmp_path / "bare.ckpt"
    torch.save(reference.state_dict(), bare)
    assert load_ldm_checkpoint(bare, SMALL_YAML).unet is not None
    # Lightning may pickle hyper-parameters (Namespace, OmegaConf): read as inert placeholders, no warning needed.
    extras = save_ckpt(tmp_path / "extras.ckpt", reference.state_dict(), hyper_parameters=argparse.Namespace(lr=1e-4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_ldm_checkpoint(extras, SMALL_YAML).unet is not None


# ---------------------------------------------------------------------------------------------------------
# 2. Wrong checkpoints fail with one line that names the keys
# ---------------------------------------------------------------------------------------------------------


def one_line_error(state: dict, **kwargs) -> str:
    configs = backbone_configs_from_yaml(read_ldm_yaml(SMALL_YAML))
    with pytest.raises(PathsegError) as caught:
        convert_ldm_state_dict(state, configs, source="bad.ckpt", **kwargs)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("bad.ckpt")
    return message


def test_missing_and_unexpected_keys_are_listed(reference):
    state = dict(reference.state_dict())
    del state["model.diffusion_model.output_blocks.3.0.in_layers.2.weight"]
    del state["first_stage_model.encoder.mid.attn_1.q.weight"]
    state["model.diffusion_model.extra_head.weight"] = torch.zeros(2)
    message = one_line_error(state)
    assert "2 missing" in message
    assert "model.diffusion_model.output_blocks.3.0.in_layers.2.weight" in message
    assert "first_stage_model.encoder.mid.attn_1.q.weight" in message
    assert "1 unexpected: model.diffusion_model.extra_head.weight" in message


def test_many_missing_keys_are_counted_not_dumped(reference):
    state = {k: v for k, v in reference.state_dict().items() if not k.startswith("model.diffusion_model.out")}
    message = one_line_error(state)
    missing = sum(k.startswith("model.diffusion_model.out") for k in reference.state_dict())
    assert f"{missing} missing" in message and f"(+{missing - 5} more)" in message


def test_misshaped_key_is_listed_with_both_shapes(reference):
    state = dict(reference.state_dict())
    state["cond_stage_model.patch_fc.weight"] = torch.zeros(64, 384)
    message = one_line_error(state)
    assert "1 mis-shaped: cond_stage_model.patch_fc.weight [64, 384] (YAML gives [64, 24])" in message


def test_schedule_buffers_are_checked_against_the_yaml():
    wrong = build_reference(linear_end=0.012)
    message = one_line_error(dict(wrong.state_dict()))
    assert "betas" in message and "alphas_cumprod" in message


def test_ignorable_prefixes_are_accepted_and_reported(tmp_path, reference):
    state = dict(reference.state_dict())
    state["model_ema.diffusion_modelinput_blocks00weight"] = torch.zeros(1)
    state["first_stage_model.loss.discriminator.main.0.weight"] = torch.zeros(1)
    state["discriminator.head.weight"] = torch.zeros(1)  # unknown: needs an explicit ignore
    assert "unexpected: discriminator.head.weight" in one_line_error(state)
    ckpt_path = save_ckpt(tmp_path / "extras.ckpt", state)
    report = convert_ldm(ckpt_path, SMALL_YAML, tmp_path / "out", ignore_prefixes=["discriminator."])
    assert report["ignored"]["inception."]["count"] == 2
    assert report["ignored"]["model_ema."]["count"] == 1
    assert report["ignored"]["first_stage_model.loss."]["count"] == 1
    assert report["ignored"]["discriminator."]["count"] == 1
    assert len(report["schedule_buffers_checked"]) == 12
    n_unet = sum(k.startswith("model.diffusion_model.") for k in state)
    assert report["used"]["model.diffusion_model."] == n_unet
    assert report["used"]["cond_stage_model."] == 4
    accounted = report["used_total"] + sum(v["count"] for v in report["ignored"].values())
    assert accounted + len(report["schedule_buffers_checked"]) == len(state)


# ---------------------------------------------------------------------------------------------------------
# 3. convert-ldm writes a directory that loads back to the same features
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_convert_ldm_directory_gives_identical_features(tmp_path, ckpt, backbone):
    out = tmp_path / "paper-backbone"
    report = convert_ldm(ckpt, SMALL_YAML, out)
    assert json.loads((out / "conversion_report.json").read_text())["used"] == report["used"]
    assert not (tmp_path / "paper-backbone.partial").exists()
    loaded = load_backbone_dir(out)
    latents, timesteps, patch, region = inputs(3)
    context = loaded.projector(patch, region)
    torch.testing.assert_close(context, backbone.projector(patch, region), rtol=0, atol=0)
    a = FeatureCapture(loaded.unet, ALL_BLOCKS)(latents, timesteps, context)
    b = FeatureCapture(backbone.unet, ALL_BLOCKS)(latents, timesteps, context)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    images = torch.rand(1, 3, 64, 64) * 2 - 1
    assert torch.equal(loaded.encode(images), backbone.encode(images))
    public = {k: v for k, v in backbone.scheduler.config.items() if not k.startswith("_")}
    assert {k: loaded.scheduler.config[k] for k in public} == public
    with pytest.raises(PathsegError, match="not empty"):
        convert_ldm(ckpt, SMALL_YAML, out)


# ---------------------------------------------------------------------------------------------------------
# 4. The YAML: the paper's values give the paper's backbone; bad YAMLs fail in one line
# ---------------------------------------------------------------------------------------------------------


def test_paper_yaml_gives_the_paper_configs_and_schedule():
    configs = backbone_configs_from_yaml(read_ldm_yaml(PAPER_YAML))
    assert configs["unet"] == PAPER["unet"]
    assert configs["first_stage"] == PAPER["first_stage"]
    assert configs["projector"] == PAPER["projector"]
    assert DDPMScheduler(**configs["scheduler"]).config == ldm_scheduler().config
    betas = ldm_schedule_buffers(configs["ldm_schedule"])["betas"]
    torch.testing.assert_close(ldm_scheduler().betas.double(), betas, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(betas, torch.tensor(reference_schedule(0.0015, 0.0195, 1000)["betas"]))


def test_unet_config_agrees_with_diffusers_own_ldm_config_reader():
    import yaml
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm

    raw = yaml.safe_load(PAPER_YAML.read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # image_size is a deprecated argument there
        theirs = create_unet_diffusers_config_from_ldm(raw, {}, image_size=256)
    ours = backbone_configs_from_yaml(read_ldm_yaml(PAPER_YAML))["unet"]
    for key in ("sample_size", "in_channels", "out_channels", "down_block_types", "up_block_types",
                "block_out_channels", "layers_per_block", "cross_attention_dim", "attention_head_dim",
                "use_linear_projection"):
        assert ours[key] == theirs[key], key


def test_paper_yaml_builds_and_describes_reference_blocks():
    backbone = build_from_ldm_yaml(PAPER_YAML, seed=0)
    assert 390e6 < sum(p.numel() for p in backbone.unet.parameters()) < 410e6
    rows = {row["name"]: row for row in describe_blocks(backbone, tile_size=256)}
    by_alias = {row["alias"]: row for row in rows.values() if row["alias"]}
    expected = {0: (960, 8), 1: (960, 8), 3: (576, 16), 4: (576, 16), 5: (576, 32), 6: (384, 32), 7: (384, 32),
                9: (192, 64), 10: (192, 64), 11: (192, 64)}
    for k, (channels, size) in expected.items():
        row = by_alias[f"output_blocks.{k}"]
        assert (row["channels"], row["resolution"]) == (channels, size), k
    # output_blocks.2 is up0: its 960-channel map after the upsampler (16 px); up0.2 is the same layer at 8 px.
    assert (by_alias["output_blocks.2"]["name"], by_alias["output_blocks.2"]["resolution"]) == ("up0", 16)
    assert (rows["up0.2"]["channels"], rows["up0.2"]["resolution"]) == (960, 8)
    assert "output_blocks.2" in rows["up0.2"]["note"]
    assert (rows["mid"]["channels"], rows["mid"]["resolution"]) == (960, 8)
    assert [r["order"] for r in describe_blocks(backbone)] == sorted(r["order"] for r in rows.values())
    table = format_block_table(describe_blocks(backbone))
    assert "output_blocks.11" in table and "960" in table
    assert describe_ldm_yaml(PAPER_YAML) == describe_blocks(backbone)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("model: [1, 2]", "model.params is missing"),
        ("model:\n  params:\n    first_stage_config: {}\n", "model.params.unet_config is missing"),
        ("model: {params: {unet_config: {params: {}}, first_stage_config: {params: {ddconfig: {}}}, "
         "cond_stage_config: {}}}", "unet_config.params.use_spatial_transformer must be true"),
        ("a: [", "is not valid YAML"),
    ],
)
def test_bad_yaml_fails_in_one_line(tmp_path, text, expected):
    path = tmp_path / "project.yaml"
    path.write_text(text)
    with pytest.raises(PathsegError) as caught:
        backbone_configs_from_yaml(read_ldm_yaml(path))
    assert expected in str(caught.value) and str(path) in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("model_channels: 32", "model_channels: wide", "model_channels is 'wide'; expected a int"),
        ("ldm.models.autoencoder.VQModelInterface", "ldm.models.autoencoder.AutoencoderKL", "supports the VQ"),
        ("normalize_ssl: true", "normalize_ssl: false", "normalize_ssl is not true"),
        ("linear_end: 0.0195", "linear_end: 0.0195\n    beta_schedule: sqrt", "beta_schedule 'sqrt'"),
        ("num_heads: 2", "num_heads: 2\n        use_scale_shift_norm: true", "use_scale_shift_norm=True"),
    ],
)
def test_unsupported_or_mistyped_settings_name_the_setting(tmp_path, old, new, expected):
    path = tmp_path / "project.yaml"
    text = SMALL_YAML.read_text()
    assert old in text
    path.write_text(text.replace(old, new))
    with pytest.raises(PathsegError) as caught:
        backbone_configs_from_yaml(read_ldm_yaml(path))
    assert expected in str(caught.value) and "\n" not in str(caught.value)


def test_missing_files_fail_in_one_line(tmp_path):
    with pytest.raises(PathsegError, match="does not exist"):
        read_ldm_yaml(tmp_path / "nope.yaml")
    with pytest.raises(PathsegError, match="does not exist"):
        load_ldm_checkpoint(tmp_path / "nope.ckpt", SMALL_YAML)
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(PathsegError, match="not a readable PyTorch file"):
        load_ldm_checkpoint(junk, SMALL_YAML)


# ---------------------------------------------------------------------------------------------------------
# 5. The command line: convert-ldm, then extract, gives the original model's features
# ---------------------------------------------------------------------------------------------------------


def invoke(args: list[str]) -> str:
    from typer.testing import CliRunner

    from pathseg.cli import app

    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


@torch.no_grad()
def test_cli_convert_then_extract_equals_the_reference_computation(tmp_path, monkeypatch, ckpt, reference):
    from pathseg.extract.tiles import PaddedView, tile_noise

    from pathseg.store import FeatureStore

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "converted"
    invoke(["convert-ldm", "--ckpt", str(ckpt), "--config", str(SMALL_YAML), "--out", str(out)])
    info = invoke(["backbone", "info", "--backbone", str(out), "--tile-size", "64"])
    assert "output_blocks.11" in info
    # The converted directory and the original checkpoint + YAML describe the same network, FLOPs included.
    assert info == invoke(["backbone", "info", "--backbone", str(ckpt), "--backbone-config", str(SMALL_YAML),
                           "--tile-size", "64"])
    settings = {"cache_dir": "cache", "dataset.synthetic.train": 1, "dataset.synthetic.val": 0,
                "dataset.synthetic.test": 0, "dataset.synthetic.height": 80, "dataset.synthetic.width": 100,
                "tiling.tile_size": 64, "tiling.stride": 48, "extract.batch_size": 3}
    sets = [item for key, value in settings.items() for item in ("--set", f"{key}={value}")]
    invoke(["extract", "--backbone", str(out), "--timesteps", "50,400", "--blocks", "output_blocks.4,mid",
            "--quiet", *sets])
    (path,) = (tmp_path / "cache").glob("*.zarr")
    store = FeatureStore.open(path)
    entry = store.images[0]
    view = PaddedView(store.image_rgb(0), store.image_grid(0), "reflect")
    origins = store.tile_origins()
    tiles = np.stack([view.tile(tuple(o), 64) for o in origins])
    images = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255.0 * 2 - 1
    z0 = reference.first_stage_model.encode(images)
    noise = tile_noise(0, [f"{entry.id}:{y}:{x}" for y, x in origins], (3, 16, 16))
    n = len(origins)
    context = reference.cond_stage_model(torch.zeros(n, 24), torch.zeros(n, 40))  # the null context
    alphas = reference_schedule(0.0015, 0.0195, 1000)["alphas_cumprod"]
    for t in (50, 400):
        zt = math.sqrt(alphas[t]) * z0 + math.sqrt(1 - alphas[t]) * noise
        _, middle, outputs = reference.model.diffusion_model(zt, torch.full((n,), t), context)
        block4 = canonical_block("output_blocks.4", json.loads((out / "unet" / "config.json").read_text()))
        for name, expected in ((block4, outputs[4]), ("mid", middle)):
            stored = torch.from_numpy(store.read_features(t, name, slice(None)).astype(np.float32))
            scale = expected.abs().max().item()
            torch.testing.assert_close(stored, expected, rtol=2e-3, atol=2e-3 * scale, msg=f"t={t} {name}")
