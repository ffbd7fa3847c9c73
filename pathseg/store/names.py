"""How feature maps are named: on disk, to people, and z0, the first-stage latent that is selectable like a
decoder block."""

from __future__ import annotations

import re

import numpy as np

# The first-stage latent z_0, selectable like a decoder block: the no-diffusion baseline of every ablation.
# It has no noise step, so it travels with a timestep that no noise step can have.
Z0_BLOCK = "z0"
Z0_TIMESTEP = -1
Z0_PAIR = (Z0_TIMESTEP, Z0_BLOCK)


# The tile's own pixels, selectable like a block (`head.blocks: [rgb]`): read from the store's whole images, so
# no array holds them and no pair names them; the loaders append them as a head's last input.
RGB_BLOCK = "rgb"

# A frozen encoder's patch-token map (`extract.encoders`), selectable as `enc:<encoder>`, or `enc:<encoder>@<k>`
# for its block k. Like z0 it has no noise step, so it travels with the same timestep-less marker.
ENCODER_PREFIX = "enc:"
ENCODER_TIMESTEP = Z0_TIMESTEP
LAYER_MARK = "@"


def is_z0(block: str) -> bool:
    return block == Z0_BLOCK


def is_rgb(block: str) -> bool:
    return block == RGB_BLOCK


def is_encoder(block: str) -> bool:
    return block.startswith(ENCODER_PREFIX)


def has_timestep(block: str) -> bool:
    """False for maps no noise step makes: z0 and encoder maps (the UNet's blocks are the rest)."""
    return not (is_z0(block) or is_encoder(block))


def encoder_block(encoder: str, layer: int | None = None) -> str:
    return f"{ENCODER_PREFIX}{encoder}" + (f"{LAYER_MARK}{layer}" if layer is not None else "")


def split_encoder_block(block: str) -> tuple[str, int | None]:
    """`enc:timm:vit_small_patch16_224@7` -> ("timm:vit_small_patch16_224", 7); no mark -> the encoder's output."""
    name = block[len(ENCODER_PREFIX):]
    head, mark, tail = name.rpartition(LAYER_MARK)
    if mark and tail.lstrip("-").isdigit():
        return head, int(tail)
    return name, None


def safe_name(name: str) -> str:
    """A name usable as one path part on every file system (encoder names hold ':' and may hold '/')."""
    return re.sub(r"[^A-Za-z0-9._@+-]", "-", name)


def feature_key(timestep: int, block: str) -> str:
    if is_z0(block):
        return "latents/z0"
    if is_encoder(block):
        return f"encoders/{safe_name(block[len(ENCODER_PREFIX):])}"
    return f"t{timestep:04d}/{block}"


def pair_label(timestep: int, block: str) -> str:
    """How a feature map is named to people: `t50 up1`, or the block alone for maps without a timestep."""
    return block if not has_timestep(block) else f"t{timestep} {block}"


def nonfinite_message(timestep: int, block: str, tile: int, computed: np.ndarray, dtype: str) -> str:
    """Why a shard is refused: NaN or inf from the model, or values the storage dtype turns into inf.

    `computed` is the data as the model computed it (or each tile's largest |value| of it).
    """
    if not np.isfinite(computed).all():
        cause = "the backbone computed NaN or inf"
        hint = "try extract.autocast=off (exact float32) into a new --store"
    else:
        limit = float(np.finfo(dtype).max)
        cause = f"|values| up to {float(np.abs(computed).max()):.4g} exceed {dtype}'s {limit:.0f}"
        hint = "set extract.feature_dtype=float32 and rerun; an array with finished shards keeps its dtype"
    return (f"features t={timestep} {block} (tile {tile}): {cause}; nothing of that shard was written or flagged "
            f"({hint})")
