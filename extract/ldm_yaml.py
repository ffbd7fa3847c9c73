"""The original LDM project YAML, read as data: the diffusers configs of the UNet, the first stage and the
SSL projector it describes, and the noise schedule (with the buffers `DDPM.register_schedule` derives from it),
so a converted or in-memory checkpoint is checked against what its YAML says it is.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from pathseg.extract.backbone import unet_config, vq_config

from pathseg.errors import PathsegError
from pathseg.loading.data_files import read_yaml

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
