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
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel, VQModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from pathseg.extract.backbone import Backbone, SSLProjector, file_digest
from pathseg.extract.ldm_keys import (
    COMPONENT_PREFIXES,
    COND_PREFIX,
    FIRST_STAGE_PREFIX,
    UNET_PREFIX,
    ldm_unet_key,
    ldm_vq_key,
)
from pathseg.extract.ldm_yaml import backbone_configs_from_yaml, ldm_schedule_buffers, read_ldm_yaml
from torch import nn

from pathseg.errors import PathsegError
from pathseg.loading.checkpoints import load_checkpoint

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

SHOWN = 5  # keys listed per problem kind in an error line


# --------------------------------------------------------------------------------------------------------
# Key tables: the original name of every diffusers parameter, so problems are reported in the user's terms
# --------------------------------------------------------------------------------------------------------


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
        key: _Expected(UNET_PREFIX + ldm_unet_key(key, layers, attention_up), shape)
        for key, shape in _meta_shapes(UNet2DConditionModel, unet_cfg).items()
    }
    levels = len(configs["first_stage"]["block_out_channels"])
    first_stage = {}
    for key, shape in _meta_shapes(VQModel, configs["first_stage"]).items():
        original = FIRST_STAGE_PREFIX + ldm_vq_key(key, levels)
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
    unless the user trusts the file (see `pathseg.loading.checkpoints`)."""
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
