"""The paper's original backbone: a PyTorch Lightning LDM checkpoint plus its project YAML, as a `Backbone`.

The original `.ckpt` holds the whole `LatentDiffusion` module (UNet, VQ first stage, SSL projector, noise
schedule buffers and training-only extras such as an FID Inception net). diffusers' single-file converters
rename the UNet and the autoencoder; the quantizer codebook and the projector are mapped here. Every tensor
in the checkpoint is accounted for: converted, checked (schedule buffers against the YAML's schedule), or
ignored under a named prefix, so a checkpoint that does not match its YAML fails with one line instead of
loading half-random weights.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel, VQModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from pathseg.extract.backbone import Backbone, SSLProjector, file_digest, unet_config, vq_config
from torch import nn

from pathseg.checkpoint_loading import load_checkpoint
from pathseg.data_files import read_yaml
from pathseg.errors import PathsegError

UNET_PREFIX = "model.diffusion_model."
FIRST_STAGE_PREFIX = "first_stage_model."
COND_PREFIX = "cond_stage_model."
COMPONENT_PREFIXES = {"unet": UNET_PREFIX, "first_stage": FIRST_STAGE_PREFIX, "projector": COND_PREFIX}

# `DDPM.register_schedule` buffers: all derived from betas, so all are checked against the YAML's schedule.
SCHEDULE_BUFFERS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "lvlb_weights",
)

# Training-only state that a frozen feature extractor does not need; checked before the component prefixes.
IGNORED_PREFIXES: dict[str, str] = {
    "model_ema.": "EMA copy of the UNet (the training weights in model.diffusion_model are used)",
    "inception.": "InceptionV3 used to track FID during training",
    "first_stage_model.loss.": "autoencoder training loss (LPIPS, discriminator)",
    "first_stage_model.model_ema.": "EMA copy of the autoencoder",
    "first_stage_model.quantize.used": "codebook remap table (pathseg uses pre-quantisation latents)",
    "first_stage_model.colorize": "segmentation colouring buffer",
    "loss.": "training loss",
    "lpips.": "LPIPS perceptual loss",
    "logvar": "learned per-timestep log-variance (training loss weighting)",
    "cond_ids": "conditioning schedule (training only)",
}

BETA_SCHEDULES = {"linear": "scaled_linear", "sqrt_linear": "linear", "cosine": "squaredcos_cap_v2"}
PARAMETERIZATIONS = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}

# openaimodel settings whose non-default values change the network in ways the diffusers UNet does not mirror.
UNET_UNSUPPORTED = {
    "use_scale_shift_norm": False,
    "resblock_updown": False,
    "conv_resample": True,
    "dims": 2,
    "num_classes": None,
    "disable_self_attentions": None,
    "num_attention_blocks": None,
    "disable_middle_self_attn": False,
    "n_embed": None,
    "adm_in_channels": None,
}

SHOWN = 5  # keys listed per problem kind in an error line


# --------------------------------------------------------------------------------------------------------
# The YAML
# --------------------------------------------------------------------------------------------------------


def read_ldm_yaml(path: Path | str) -> dict:
    """The parts of a latent-diffusion project YAML that define the backbone, with the file named for errors."""
    path = Path(path)
    if not path.is_file():
        raise PathsegError(f"{path} does not exist; pass the checkpoint's latent-diffusion project YAML (--config)")
    # `target:` entries name classes the original code imports; here they are strings, never imported.
    raw = read_yaml(path, "pass the LDM project YAML", settings=False)
    return _yaml_pieces(raw, str(path))


def _yaml_pieces(raw: Any, source: str) -> dict:
    params = _mapping(raw, "model.params", source)
    unet = _mapping(raw, "model.params.unet_config.params", source)
    first_stage = _mapping(raw, "model.params.first_stage_config", source)
    first_stage_params = _mapping(raw, "model.params.first_stage_config.params", source)
    ddconfig = _mapping(raw, "model.params.first_stage_config.params.ddconfig", source)
    cond_stage = _mapping(raw, "model.params.cond_stage_config", source)
    return {
        "source": source,
        "diffusion": {k: v for k, v in params.items() if not str(k).endswith("_config")},
        "unet": dict(unet),
        "first_stage_target": str(first_stage.get("target", "")),
        "first_stage": dict(first_stage_params),
        "ddconfig": dict(ddconfig),
        "cond_stage_target": str(cond_stage.get("target", "")),
        "cond_stage": dict(cond_stage.get("params") or {}),
    }


def _mapping(raw: Any, dotted: str, source: str) -> dict:
    node, parts = raw, dotted.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            raise PathsegError(
                f"{source}: {'.'.join(parts[:depth + 1])} is missing; expected a latent-diffusion project YAML "
                "(model.params with unet_config, first_stage_config, cond_stage_config)"
            )
        node = node[part]
    if not isinstance(node, dict):
        raise PathsegError(f"{source}: {dotted} should be a mapping, not {type(node).__name__}")
    return node


_MISSING = object()


def _setting(params: dict, key: str, where: str, source: str, kind: type, default: Any = _MISSING,
             allow_empty: bool = False) -> Any:
    """One typed YAML value; a missing or mistyped one names its full dotted path in the file.

    Integers here are sizes and counts, so they must be at least 1 (or -1 where -1 is the default, meaning
    "not set"); lists of them must hold at least one (unless `allow_empty`), so a wrong YAML fails here in one
    line rather than when a model of that shape is built.
    """
    if key not in params or params[key] is None:
        if default is _MISSING:
            raise PathsegError(f"{source}: {where}.{key} is missing; the converter needs it")
        return default
    value = params[key]
    try:
        if kind is bool:
            if not isinstance(value, bool):
                raise ValueError
            return value
        if kind is int:
            if isinstance(value, bool) or int(value) != float(value) or (int(value) < 1 and not value == default == -1):
                raise ValueError
            return int(value)
        if kind is float:
            return float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string; float() accepts it
        if kind is list:
            if not isinstance(value, list | tuple) or not all(isinstance(v, int) and v >= 1 for v in value) or (
                    not value and not allow_empty):
                raise ValueError
            return [int(v) for v in value]
        return kind(value)
    except (TypeError, ValueError, OverflowError):
        expected = "a list of positive integers" if kind is list else f"a {kind.__name__}"
        expected += " of at least 1" if kind is int else ""
        raise PathsegError(f"{source}: {where}.{key} is {value!r}; expected {expected}") from None


def backbone_configs_from_yaml(yaml_dict: dict) -> dict:
    """diffusers constructor arguments for every part of the backbone described by the YAML.

    Accepts `read_ldm_yaml`'s pieces or a raw parsed YAML. Keys: `unet`, `first_stage` (VQModel), `projector`
    (SSLProjector), `scheduler` (DDPMScheduler), `ldm_schedule` (the original schedule settings, to check
    the checkpoint's buffers against), `source`.
    """
    pieces = yaml_dict if "unet" in yaml_dict else _yaml_pieces(yaml_dict, "project YAML")
    source = pieces["source"]
    unet = _unet_args(pieces["unet"], source)
    first_stage = _first_stage_args(pieces, source)
    diffusion = pieces["diffusion"]
    where = "model.params"
    conditioning_key = diffusion.get("conditioning_key", "crossattn")
    if conditioning_key != "crossattn":
        raise PathsegError(
            f"{source}: {where}.conditioning_key is {conditioning_key!r}; pathseg supports cross-attention "
            "conditioning only ('crossattn')"
        )
    if unet["in_channels"] != first_stage["vq_embed_dim"]:
        raise PathsegError(
            f"{source}: unet_config in_channels {unet['in_channels']} differs from first_stage_config embed_dim "
            f"{first_stage['vq_embed_dim']}; the UNet must denoise the VQ latents"
        )
    scale_factor = _setting(diffusion, "scale_factor", where, source, float, 1.0)
    first_stage["scaling_factor"] = scale_factor
    schedule = _ldm_schedule(diffusion, source)
    return {
        "source": source,
        "unet": unet,
        "first_stage": first_stage,
        "projector": _projector_args(pieces, unet["cross_attention_dim"], source),
        "scheduler": _scheduler_args(schedule),
        "ldm_schedule": schedule,
        "scale_by_std": _setting(diffusion, "scale_by_std", where, source, bool, False),
    }


def _unet_args(params: dict, source: str) -> dict:
    where = "model.params.unet_config.params"
    for key, default in UNET_UNSUPPORTED.items():
        if params.get(key, default) != default:
            raise PathsegError(
                f"{source}: {where}.{key}={params[key]!r} is not supported by the converter (only {default!r})"
            )
    if params.get("use_spatial_transformer") is not True:
        raise PathsegError(
            f"{source}: {where}.use_spatial_transformer must be true; pathseg needs the cross-attention UNet"
        )
    for key in ("context_dim", "transformer_depth", "num_res_blocks"):
        if isinstance(params.get(key), list | tuple):
            raise PathsegError(f"{source}: {where}.{key} as a per-level list is not supported; give one integer")
    model_channels = _setting(params, "model_channels", where, source, int)
    channel_mult = _setting(params, "channel_mult", where, source, list)
    attention_resolutions = set(_setting(params, "attention_resolutions", where, source, list, allow_empty=True))
    num_heads = _setting(params, "num_heads", where, source, int, -1)
    num_head_channels = _setting(params, "num_head_channels", where, source, int, -1)
    in_channels = _setting(params, "in_channels", where, source, int)
    out_channels = _setting(params, "out_channels", where, source, int)
    if num_heads == -1 and num_head_channels == -1:
        raise PathsegError(f"{source}: {where} sets neither num_heads nor num_head_channels; set one of them")
    # Level l of openaimodel runs at downsample factor ds = 2**l; attention_resolutions lists such ds values.
    attention_levels = [2**level in attention_resolutions for level in range(len(channel_mult))]
    heads: int | list[int] = num_heads
    if num_head_channels != -1:
        heads = [model_channels * mult // num_head_channels for mult in channel_mult]
    args = unet_config(
        model_channels,
        channel_mult,
        _setting(params, "num_res_blocks", where, source, int),
        attention_levels,
        context_dim=_setting(params, "context_dim", where, source, int),
        num_heads=heads,  # an int, or heads per level when the YAML fixes num_head_channels
        in_channels=in_channels,
        sample_size=_setting(params, "image_size", where, source, int, 64),
    )
    # Only settings that differ from unet_config's defaults are added, so the paper YAML gives exactly PAPER.
    if out_channels != in_channels:
        args["out_channels"] = out_channels
    depth = _setting(params, "transformer_depth", where, source, int, 1)
    if depth != 1:
        args["transformer_layers_per_block"] = depth
    if _setting(params, "use_linear_in_transformer", where, source, bool, False):
        args["use_linear_projection"] = True
    return args


def _first_stage_args(pieces: dict, source: str) -> dict:
    target = pieces["first_stage_target"]
    if not target.endswith(("VQModelInterface", "VQModel")):
        raise PathsegError(
            f"{source}: model.params.first_stage_config.target is {target!r}; the converter supports the VQ "
            "autoencoder (ldm.models.autoencoder.VQModelInterface)"
        )
    params, dd = pieces["first_stage"], pieces["ddconfig"]
    where, dd_where = "model.params.first_stage_config.params", "model.params.first_stage_config.params.ddconfig"
    if _setting(dd, "double_z", dd_where, source, bool, True):
        raise PathsegError(f"{source}: {dd_where}.double_z must be false for a VQ autoencoder")
    if _setting(dd, "attn_resolutions", dd_where, source, list, [], allow_empty=True):
        raise PathsegError(
            f"{source}: {dd_where}.attn_resolutions must be [] (diffusers' VQModel has attention only in its "
            "middle block)"
        )
    args = vq_config(
        _setting(dd, "ch", dd_where, source, int),
        _setting(dd, "ch_mult", dd_where, source, list),
        _setting(dd, "num_res_blocks", dd_where, source, int),
        z_channels=_setting(dd, "z_channels", dd_where, source, int),
        embed_dim=_setting(params, "embed_dim", where, source, int),
        n_embed=_setting(params, "n_embed", where, source, int),
    )
    for key, ldm_key in (("in_channels", "in_channels"), ("out_channels", "out_ch")):
        value = _setting(dd, ldm_key, dd_where, source, int, 3)
        if value != args[key]:
            args[key] = value
    return args


def _projector_args(pieces: dict, context_dim: int, source: str) -> dict:
    target, params = pieces["cond_stage_target"], pieces["cond_stage"]
    where = "model.params.cond_stage_config"
    if not target.endswith("SSLEmbedder"):
        raise PathsegError(
            f"{source}: {where}.target is {target!r}; pathseg supports the SSL conditioning of "
            "ldm.modules.encoders.modules.SSLEmbedder (patch + region embeddings)"
        )
    if _setting(params, "normalize_ssl", f"{where}.params", source, bool, False) is not True:
        raise PathsegError(
            f"{source}: {where}.params.normalize_ssl is not true; pathseg's SSL projector always L2-normalises "
            "the embeddings as the paper's model does"
        )
    return {
        "patch_dim": _setting(params, "patch_embed_dim", f"{where}.params", source, int, 384),
        "region_dim": _setting(params, "region_embed_dim", f"{where}.params", source, int, 768),
        "context_dim": context_dim,
    }


def _ldm_schedule(diffusion: dict, source: str) -> dict:
    where = "model.params"
    if diffusion.get("given_betas") is not None:
        raise PathsegError(f"{source}: {where}.given_betas is not supported; use a named beta_schedule")
    beta_schedule = str(diffusion.get("beta_schedule", "linear"))
    if beta_schedule not in BETA_SCHEDULES:
        raise PathsegError(
            f"{source}: {where}.beta_schedule {beta_schedule!r} is not supported; use one of "
            f"{', '.join(BETA_SCHEDULES)}"
        )
    parameterization = str(diffusion.get("parameterization", "eps"))
    if parameterization not in PARAMETERIZATIONS:
        raise PathsegError(f"{source}: {where}.parameterization {parameterization!r} is not one of eps, x0, v")
    schedule = {
        "beta_schedule": beta_schedule,
        "linear_start": _setting(diffusion, "linear_start", where, source, float, 1e-4),
        "linear_end": _setting(diffusion, "linear_end", where, source, float, 2e-2),
        "timesteps": _setting(diffusion, "timesteps", where, source, int, 1000),
        "cosine_s": _setting(diffusion, "cosine_s", where, source, float, 8e-3),
        "v_posterior": _setting(diffusion, "v_posterior", where, source, float, 0.0),
        "parameterization": parameterization,
    }
    if beta_schedule == "cosine" and not math.isclose(schedule["cosine_s"], 8e-3):
        raise PathsegError(f"{source}: {where}.cosine_s must be 0.008 for the cosine schedule (diffusers fixes it)")
    return schedule


def _scheduler_args(schedule: dict) -> dict:
    """The LDM's "linear" schedule is linear in sqrt(beta), which diffusers calls scaled_linear."""
    return {
        "num_train_timesteps": schedule["timesteps"],
        "beta_start": schedule["linear_start"],
        "beta_end": schedule["linear_end"],
        "beta_schedule": BETA_SCHEDULES[schedule["beta_schedule"]],
        "prediction_type": PARAMETERIZATIONS[schedule["parameterization"]],
        "clip_sample": False,
    }


def ldm_schedule_buffers(schedule: dict) -> dict[str, torch.Tensor]:
    """The buffers `DDPM.register_schedule` stores, recomputed in float64 from the YAML's schedule settings."""
    n, kind = schedule["timesteps"], schedule["beta_schedule"]
    start, end = schedule["linear_start"], schedule["linear_end"]
    if kind == "linear":
        betas = torch.linspace(start**0.5, end**0.5, n, dtype=torch.float64) ** 2
    elif kind == "sqrt_linear":
        betas = torch.linspace(start, end, n, dtype=torch.float64)
    else:
        s = schedule["cosine_s"]
        steps = torch.arange(n + 1, dtype=torch.float64) / n + s
        alphas = torch.cos(steps / (1 + s) * math.pi / 2) ** 2
        alphas = alphas / alphas[0]
        betas = (1 - alphas[1:] / alphas[:-1]).clamp(0, 0.999)
    alphas = 1.0 - betas
    cumprod = torch.cumprod(alphas, dim=0)
    cumprod_prev = torch.cat([cumprod.new_ones(1), cumprod[:-1]])
    v = schedule["v_posterior"]
    posterior_variance = (1 - v) * betas * (1.0 - cumprod_prev) / (1.0 - cumprod) + v * betas
    buffers = {
        "betas": betas,
        "alphas_cumprod": cumprod,
        "alphas_cumprod_prev": cumprod_prev,
        "sqrt_alphas_cumprod": cumprod.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - cumprod).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - cumprod).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / cumprod).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / cumprod - 1).sqrt(),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * cumprod_prev.sqrt() / (1.0 - cumprod),
        "posterior_mean_coef2": (1.0 - cumprod_prev) * alphas.sqrt() / (1.0 - cumprod),
    }
    if schedule["parameterization"] == "eps":
        lvlb = betas**2 / (2 * posterior_variance * alphas * (1 - cumprod))
        lvlb[0] = lvlb[1]
        buffers["lvlb_weights"] = lvlb
    return buffers


# --------------------------------------------------------------------------------------------------------
# Key tables: the original name of every diffusers parameter, so problems are reported in the user's terms
# --------------------------------------------------------------------------------------------------------

_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_VQ_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _resnet(rest: str, names: dict[str, str]) -> str:
    head, _, tail = rest.partition(".")
    return f"{names.get(head, head)}.{tail}"


def _ldm_unet_key(key: str, layers: int, attention_up: list[bool]) -> str:
    """openaimodel's name for a diffusers UNet2DConditionModel parameter (input/middle/output_blocks numbering)."""
    per = layers + 1
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    module, _, leaf = key.rpartition(".")
    if module in fixed:
        return f"{fixed[module]}.{leaf}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"input_blocks.{1 + int(m[1]) * per + int(m[2])}.0.{_resnet(m[3], _RESNET)}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
        return f"input_blocks.{1 + int(m[1]) * per + int(m[2])}.1.{m[3]}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * per}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2], _RESNET)}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"output_blocks.{int(m[1]) * per + int(m[2])}.0.{_resnet(m[3], _RESNET)}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
        return f"output_blocks.{int(m[1]) * per + int(m[2])}.1.{m[3]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        i = int(m[1])
        return f"output_blocks.{i * per + layers}.{2 if attention_up[i] else 1}.conv.{m[2]}"
    raise RuntimeError(f"pathseg has no original LDM name for diffusers UNet parameter {key!r}")


def _ldm_vq_key(key: str, levels: int) -> str:
    """The taming/LDM autoencoder's name for a diffusers VQModel parameter."""
    if key.startswith(("quant_conv.", "post_quant_conv.", "quantize.")):
        return key
    part, _, rest = key.partition(".")
    module, _, leaf = rest.rpartition(".")
    if module in ("conv_in", "conv_out"):
        return key
    if module == "conv_norm_out":
        return f"{part}.norm_out.{leaf}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest):
        return f"{part}.down.{m[1]}.block.{m[2]}.{_resnet(m[3], {'conv_shortcut': 'nin_shortcut'})}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", rest):
        return f"{part}.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest):
        level = levels - 1 - int(m[1])
        return f"{part}.up.{level}.block.{m[2]}.{_resnet(m[3], {'conv_shortcut': 'nin_shortcut'})}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", rest):
        return f"{part}.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(.+)", rest):
        return f"{part}.mid.block_{int(m[1]) + 1}.{_resnet(m[2], {'conv_shortcut': 'nin_shortcut'})}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)\.(weight|bias)", rest):
        if m[1] in _VQ_ATTENTION:
            return f"{part}.mid.attn_1.{_VQ_ATTENTION[m[1]]}.{m[2]}"
    raise RuntimeError(f"pathseg has no original LDM name for diffusers VQModel parameter {key!r}")


@dataclass(frozen=True)
class _Expected:
    """One diffusers parameter: its original key in the checkpoint and the shape it must have there."""

    original: str
    shape: tuple[int, ...]


def _meta_shapes(cls: type[nn.Module], config: dict) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = cls(**config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def expected_keys(configs: dict) -> dict[str, dict[str, _Expected]]:
    """Per component: diffusers key -> (original checkpoint key, original shape), read off the models themselves."""
    unet_cfg = configs["unet"]
    attention_up = [t.startswith("CrossAttn") for t in unet_cfg["up_block_types"]]
    layers = unet_cfg["layers_per_block"]
    unet = {
        key: _Expected(UNET_PREFIX + _ldm_unet_key(key, layers, attention_up), shape)
        for key, shape in _meta_shapes(UNet2DConditionModel, unet_cfg).items()
    }
    levels = len(configs["first_stage"]["block_out_channels"])
    first_stage = {}
    for key, shape in _meta_shapes(VQModel, configs["first_stage"]).items():
        original = FIRST_STAGE_PREFIX + _ldm_vq_key(key, levels)
        if ".mid.attn_1." in original and original.endswith("weight") and len(shape) == 2:
            shape = (*shape, 1, 1)  # taming's attention uses 1x1 convolutions, diffusers linear layers
        first_stage[key] = _Expected(original, shape)
    projector = {
        key: _Expected(COND_PREFIX + key, shape)
        for key, shape in _meta_shapes(SSLProjector, configs["projector"]).items()
    }
    return {"unet": unet, "first_stage": first_stage, "projector": projector}



# --------------------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------------------


@dataclass
class Conversion:
    """The converted weights and where every checkpoint tensor went, for `conversion_report.json`."""

    weights: dict[str, dict[str, torch.Tensor]]
    used: dict[str, int] = field(default_factory=dict)
    ignored: dict[str, int] = field(default_factory=dict)
    schedule_checked: list[str] = field(default_factory=list)
    scale_factor: float | None = None


def convert_ldm_state_dict(
    state_dict: dict[str, torch.Tensor],
    configs: dict,
    *,
    source: str = "checkpoint",
    ignore_prefixes: Iterable[str] = (),
) -> dict[str, dict[str, torch.Tensor]]:
    """{"unet", "first_stage", "projector"} state dicts in diffusers/pathseg layout from an original LDM state dict.

    Pure: nothing is read or built beyond empty (meta) models used to list the expected keys. Raises one
    `PathsegError` listing missing, unexpected and mis-shaped keys, or schedule buffers that contradict
    the YAML. `ignore_prefixes` adds training-only prefixes to `IGNORED_PREFIXES`.
    """
    return _convert(state_dict, configs, source, tuple(ignore_prefixes)).weights


def _convert(state_dict: dict[str, Any], configs: dict, source: str, extra_ignored: tuple[str, ...]) -> Conversion:
    expected = expected_keys(configs)
    ignorable = [*IGNORED_PREFIXES, *extra_ignored]
    originals = {e.original: (part, key) for part, table in expected.items() for key, e in table.items()}
    conversion = Conversion(weights={}, used=dict.fromkeys(COMPONENT_PREFIXES.values(), 0))
    unexpected, misshaped, schedule_problems = [], [], []
    reference = ldm_schedule_buffers(configs["ldm_schedule"])
    for key, value in state_dict.items():
        prefix = next((p for p in ignorable if key.startswith(p)), None)
        if prefix is not None:
            conversion.ignored[prefix] = conversion.ignored.get(prefix, 0) + 1
        elif key in originals and isinstance(value, torch.Tensor):
            part, diffusers_key = originals[key]
            shape = expected[part][diffusers_key].shape
            if tuple(value.shape) != shape:
                misshaped.append(f"{key} {list(value.shape)} (YAML gives {list(shape)})")
            conversion.used[COMPONENT_PREFIXES[part]] += 1
        elif key in reference and isinstance(value, torch.Tensor):
            if not _same_schedule(value, reference[key]):
                schedule_problems.append(key)
            conversion.schedule_checked.append(key)
        elif key in SCHEDULE_BUFFERS:  # lvlb_weights of an x0/v model: a loss weighting, not the schedule
            conversion.ignored[key] = conversion.ignored.get(key, 0) + 1
        elif key == "scale_factor" and isinstance(value, torch.Tensor) and value.numel() == 1:
            conversion.scale_factor = float(value)
        else:
            unexpected.append(key)
    missing = [e.original for table in expected.values() for e in table.values() if e.original not in state_dict]
    _raise_problems(source, configs.get("source", "the YAML"), missing, unexpected, misshaped, schedule_problems)
    conversion.weights = {
        "unet": _convert_unet(state_dict, configs["unet"], expected["unet"]),
        "first_stage": _convert_first_stage(state_dict, configs["first_stage"], expected["first_stage"]),
        "projector": {key: state_dict[e.original] for key, e in expected["projector"].items()},
    }
    return conversion


def _same_schedule(stored: torch.Tensor, reference: torch.Tensor) -> bool:
    """Buffers were stored in float32; a different schedule differs by far more than float32 rounding."""
    return stored.shape == reference.shape and torch.allclose(stored.double(), reference, rtol=1e-4, atol=1e-7)


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:SHOWN])
    return f"{shown} (+{len(keys) - SHOWN} more)" if len(keys) > SHOWN else shown


def _raise_problems(source: str, yaml_source: str, missing: list[str], unexpected: list[str],
                    misshaped: list[str], schedule: list[str]) -> None:
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing: {_listing(missing)}")
    if misshaped:
        parts.append(f"{len(misshaped)} mis-shaped: {_listing(misshaped)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected: {_listing(unexpected)}")
    if schedule:
        parts.append(f"schedule buffers that contradict the YAML's linear_start/linear_end/timesteps: "
                     f"{_listing(schedule)}")
    if parts:
        hint = "check that the YAML is the checkpoint's own project YAML"
        if unexpected and not (missing or misshaped or schedule):
            hint = "if these are training-only extras, ignore them with ignore_prefixes"
        raise PathsegError(f"{source} does not match {yaml_source}: {'; '.join(parts)}; {hint}")


def _convert_unet(state_dict: dict, config: dict, expected: dict[str, _Expected]) -> dict[str, torch.Tensor]:
    # diffusers expects the full-checkpoint prefix; only the UNet's own keys are passed, so its EMA heuristics
    # (which look for model_ema.*) stay quiet.
    subset = {e.original: state_dict[e.original] for e in expected.values()}
    converted = convert_ldm_unet_checkpoint(subset, config)
    return _verified(converted, subset, expected, "convert_ldm_unet_checkpoint")


def _convert_first_stage(state_dict: dict, config: dict, expected: dict[str, _Expected]) -> dict[str, torch.Tensor]:
    # The VQ encoder/decoder share the KL VAE's key layout; the codebook is not part of a KL VAE, so it is ours.
    codebook = "quantize.embedding.weight"
    subset = {e.original: state_dict[e.original] for key, e in expected.items() if key != codebook}
    converted = convert_ldm_vae_checkpoint(subset, config)
    converted[codebook] = state_dict[expected[codebook].original]
    subset[expected[codebook].original] = converted[codebook]
    return _verified(converted, subset, expected, "convert_ldm_vae_checkpoint")


def _verified(converted: dict, subset: dict, expected: dict[str, _Expected], function: str) -> dict:
    """diffusers' converter and pathseg's key table must agree tensor for tensor, or neither is trusted."""
    version = diffusers.__version__
    if set(converted) != set(expected):
        odd = sorted(set(converted) ^ set(expected))
        raise RuntimeError(f"diffusers {version} {function} produced a different key set ({_listing(odd)}); "
                           "please report this together with your diffusers version")
    for key, tensor in converted.items():
        source = subset[expected[key].original]
        if tensor is None or tensor.data_ptr() != source.data_ptr() or tensor.numel() != source.numel():
            raise RuntimeError(f"diffusers {version} {function} filled {key} from another tensor than "
                               f"{expected[key].original}; please report this together with your diffusers version")
    return converted


# --------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------


def read_checkpoint_state(path: Path | str, *, trust_checkpoint: bool = False) -> dict[str, Any]:
    """The `state_dict` of a Lightning checkpoint (or a bare state dict), loaded on the CPU as data only
    unless the user trusts the file (see `pathseg.checkpoint_loading`)."""
    loaded = load_checkpoint(path, "the original LDM checkpoint (.ckpt)", trust=trust_checkpoint)
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise PathsegError(f"{path} holds no state_dict of tensors; pass the LDM training checkpoint (.ckpt)")
    odd = [repr(k)[:60] for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if odd:
        raise PathsegError(f"{path}: {len(odd)} state_dict entries are not named tensors ({_listing(odd)}); "
                           "pass the LDM training checkpoint (.ckpt)")
    return state


def _with_checkpoint_scale(configs: dict, conversion: Conversion) -> dict:
    """With scale_by_std the YAML holds only the initial scale factor; the checkpoint's buffer is the real one."""
    if conversion.scale_factor is None:
        return configs
    first_stage = {**configs["first_stage"], "scaling_factor": conversion.scale_factor}
    return {**configs, "first_stage": first_stage}


def _instantiate(cls: type[nn.Module], config: dict, weights: dict[str, torch.Tensor]) -> nn.Module:
    """Built on the meta device and filled by assignment: no time spent drawing random weights we overwrite."""
    with torch.device("meta"):
        model = cls(**config)
    model.load_state_dict({k: v.detach().to(torch.float32).contiguous() for k, v in weights.items()},
                          strict=True, assign=True)
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        raise RuntimeError(f"{cls.__name__} kept tensors that are not in its state dict; cannot build it empty")
    return model


def _load(ckpt_path: Path | str, yaml_path: Path | str, ignore_prefixes: Iterable[str],
          trust_checkpoint: bool) -> tuple[Backbone, Conversion]:
    ckpt_path = Path(ckpt_path)
    configs = backbone_configs_from_yaml(read_ldm_yaml(yaml_path))
    state = read_checkpoint_state(ckpt_path, trust_checkpoint=trust_checkpoint)
    conversion = _convert(state, configs, str(ckpt_path), tuple(ignore_prefixes))
    configs = _with_checkpoint_scale(configs, conversion)
    weights = conversion.weights
    unet = _instantiate(UNet2DConditionModel, configs["unet"], weights["unet"])
    first_stage = _instantiate(VQModel, configs["first_stage"], weights["first_stage"])
    projector = SSLProjector(**configs["projector"])
    projector.load_state_dict(weights["projector"])
    scheduler = DDPMScheduler(**configs["scheduler"])
    backbone = Backbone(unet, first_stage, scheduler, projector, str(ckpt_path.resolve()), file_digest([ckpt_path]))
    return backbone.to("cpu"), conversion


def load_ldm_checkpoint(
    ckpt_path: Path | str, yaml_path: Path | str, *, ignore_prefixes: Iterable[str] = (), trust_checkpoint: bool = False
) -> Backbone:
    """The paper's `.ckpt` + project YAML as a `Backbone`, converted in memory; digest = the .ckpt file's digest."""
    return _load(ckpt_path, yaml_path, ignore_prefixes, trust_checkpoint)[0]


def convert_ldm(ckpt_path: Path | str, yaml_path: Path | str, out_dir: Path | str, *,
                ignore_prefixes: Iterable[str] = (), trust_checkpoint: bool = False) -> dict:
    """Write a diffusers-format backbone directory (read by `load_backbone_dir`) plus `conversion_report.json`.

    The directory is written next to `out_dir` first and renamed into place, so a failed run leaves nothing
    that looks like a finished backbone.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise PathsegError(f"{out_dir} already exists and is not empty; choose a new --out directory or remove it")
    backbone, conversion = _load(ckpt_path, yaml_path, ignore_prefixes, trust_checkpoint)
    report = {
        "checkpoint": str(Path(ckpt_path).resolve()),
        "config": str(Path(yaml_path).resolve()),
        "checkpoint_digest": backbone.digest,
        "used": conversion.used,
        "used_total": sum(conversion.used.values()),
        "ignored": {prefix: {"count": n, "why": IGNORED_PREFIXES.get(prefix, "ignore_prefixes")}
                    for prefix, n in sorted(conversion.ignored.items())},
        "schedule_buffers_checked": conversion.schedule_checked,
        "scale_factor": backbone.latent_scale,
        "scheduler": dict(backbone.scheduler.config),
        "diffusers_version": diffusers.__version__,
    }
    partial = out_dir.with_name(out_dir.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    backbone.save(partial)
    (partial / "conversion_report.json").write_text(json.dumps(report, indent=2, default=str))
    if out_dir.exists():
        out_dir.rmdir()
    partial.rename(out_dir)
    return report
