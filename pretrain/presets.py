"""Model shapes of each pretraining preset, as diffusers constructor arguments.

`tiny` and `paper` are extraction's own TINY and PAPER dicts, so a pretrained `tiny` backbone is a
drop-in for the random one (same blocks, channels and latent shape) and `paper` is the paper's model.
"""

from __future__ import annotations

import copy
import math

from pathseg.extract.backbone import PAPER, TINY, unet_config, vq_config

from pathseg.config import PretrainConfig

# Between the two: 4x TINY's UNet width with PAPER's first-stage depth and a mid-sized codebook.
SMALL = {
    "unet": unet_config(64, [1, 2, 3, 5], 2, [False, True, True, True], context_dim=256),
    "first_stage": vq_config(64, [1, 2, 4], 2, z_channels=3, embed_dim=3, n_embed=1024),
    "projector": {"patch_dim": 384, "region_dim": 768, "context_dim": 256},
}
PRESETS = {"tiny": TINY, "small": SMALL, "paper": PAPER}
FIRST_STAGE_CLASSES = {"vq": "VQModel", "kl": "AutoencoderKL"}


def _narrowed(config: dict, width: int | None) -> dict:
    """Same multipliers on a new base width; group norm groups shrink to divide every level's channels."""
    if width is None:
        return config
    channels = config["block_out_channels"]
    config["block_out_channels"] = [width * c // channels[0] for c in channels]
    config["norm_num_groups"] = math.gcd(32, *config["block_out_channels"])
    return config


def kl_config(vq: dict) -> dict:
    """The VQ shapes as an LDM-style KL autoencoder (same levels, z_channels latent channels, no codebook).

    The scaling factor is set from the data after phase 1 (the LDM's scale_by_std).
    """
    config = {k: v for k, v in vq.items() if k not in ("num_vq_embeddings", "vq_embed_dim")}
    config["scaling_factor"] = 1.0
    return config


def model_configs(settings: PretrainConfig) -> dict:
    """{"unet", "first_stage", "first_stage_class", "projector"} for the settings' preset, kind and widths."""
    preset = copy.deepcopy(PRESETS[settings.preset])
    unet = _narrowed(preset["unet"], settings.unet_width)
    first_stage = _narrowed(preset["first_stage"], settings.first_stage_width)
    if settings.first_stage == "kl":
        first_stage = kl_config(first_stage)
    return {
        "unet": unet,
        "first_stage": first_stage,
        "first_stage_class": FIRST_STAGE_CLASSES[settings.first_stage],
        "projector": preset["projector"],
    }


def phase_steps(settings: PretrainConfig) -> tuple[int, int]:
    """(first-stage steps, UNet steps): `first_stage_steps`, or `steps` split by `first_stage_fraction`; at
    least one step each, unless the first stage comes from another backbone (`first_stage_from`: no phase 1)."""
    if settings.first_stage_from is not None:
        return 0, settings.steps
    if settings.first_stage_steps is not None:
        first = settings.first_stage_steps
    else:
        first = round(settings.steps * settings.first_stage_fraction)
    first = min(max(1, first), settings.steps - 1)
    return first, settings.steps - first
