"""How feature maps are named: on disk, to people, and z0, the first-stage latent that is selectable like a
decoder block."""

from __future__ import annotations

import numpy as np

# The first-stage latent z_0, selectable like a decoder block: the no-diffusion baseline of every ablation.
# It has no noise step, so it travels with a timestep that no noise step can have.
Z0_BLOCK = "z0"
Z0_TIMESTEP = -1
Z0_PAIR = (Z0_TIMESTEP, Z0_BLOCK)


def is_z0(block: str) -> bool:
    return block == Z0_BLOCK


def feature_key(timestep: int, block: str) -> str:
    return "latents/z0" if is_z0(block) else f"t{timestep:04d}/{block}"


def pair_label(timestep: int, block: str) -> str:
    """How a feature map is named to people: `t50 up1`, or `z0` for the latent, which has no timestep."""
    return Z0_BLOCK if is_z0(block) else f"t{timestep} {block}"


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
