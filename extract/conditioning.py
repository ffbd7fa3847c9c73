"""The cross-attention context for each tile: the null context, or SSL embeddings through the projector.

SSL encoders (`ssl_encoders.py`) are looked up by name in `SSL_ENCODERS`; each factory takes an optional local weights
file and returns an `SSLEncoder` (a module mapping images in [0, 1] to embeddings, plus how it
wants its input resized and normalised).
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import torch
from pathseg.extract.backbone import SSLProjector
from pathseg.extract.hipt import NAME as HIPT_ENCODER  # noqa: F401 - registers hipt_vit_s16 by name
from pathseg.extract.ssl_encoders import SSL_ENCODERS, SSLEncoder
from pathseg.extract.ssl_plugins import is_plugin_spec, load_plugin_encoder

from pathseg.config import ConditioningConfig
from pathseg.errors import PathsegError


class Conditioning:
    """Maps a batch of tiles to the UNet's context: null (no encoder) or SSL-conditioned."""

    def __init__(self, projector: SSLProjector, patch: SSLEncoder | None = None, region: SSLEncoder | None = None):
        self.projector = projector
        self.patch = patch
        self.region = region

    @property
    def mode(self) -> str:
        return "null" if self.patch is None else "ssl"

    def to(self, device: torch.device | str) -> Conditioning:
        for encoder in (self.patch, self.region):
            if encoder is not None:
                encoder.module.to(device).eval().requires_grad_(False)
        return self

    def __call__(self, tiles: torch.Tensor) -> torch.Tensor:
        """`tiles`: (B, 3, T, T) in [0, 1]; returns (B, tokens, context_dim)."""
        if self.patch is None:
            return self.projector.null_context(tiles.shape[0])
        return self.from_patch_embedding(self.patch.embed(tiles), tiles)

    def from_patch_embedding(self, patch: torch.Tensor, tiles: torch.Tensor) -> torch.Tensor:
        """The context from a patch embedding computed elsewhere (a shared forward, `shared_encoder.py`)."""
        region = self.region.embed(tiles).float() if self.region is not None else None
        return self.projector(patch.float(), region)

    def identity(self) -> dict:
        return {
            "mode": self.mode,
            "patch_encoder": self.patch.identity if self.patch else None,
            "region_encoder": self.region.identity if self.region else None,
        }


def _load_encoder(name: str, weights: Path | None, trust_checkpoint: bool, allowed_code: Collection[str]) -> SSLEncoder:
    """A registered encoder, its weights read as data unless trusted; code is imported only for a `python:` name
    in `allowed_code`, the names the user wrote in their own config or command line (never one read back from a
    run record, store or backbone directory, which may come from someone else)."""
    if weights is not None and not Path(weights).is_file():
        raise PathsegError(f"SSL encoder weights {weights} do not exist; check conditioning.encoder_weights")
    if is_plugin_spec(name):
        if name.strip() not in allowed_code:
            raise PathsegError(
                f"SSL encoder {name!r} names code to import, and it did not come from your own config or command "
                "line; name it as conditioning.encoder in your config if you trust it"
            )
        return load_plugin_encoder(name, weights)
    return SSL_ENCODERS.get(name)(weights, trust_checkpoint=trust_checkpoint)


def build_conditioning(config: ConditioningConfig, projector: SSLProjector, *, trust_checkpoint: bool = False,
                       allowed_code: Collection[str] = ()) -> Conditioning:
    """`trust_checkpoint` (backbone.trust_checkpoint) lets registered encoders unpickle their weights in full.

    `allowed_code` is the set of `python:` encoders the caller vouches the user named themselves
    (`ConditioningConfig.code_specs` of the user's own config); by default nothing is imported.
    """
    if config.mode == "null":
        return Conditioning(projector)
    if config.encoder is None:
        raise PathsegError("conditioning.mode is 'ssl' but conditioning.encoder is not set; name an SSL encoder")
    patch = _load_encoder(config.encoder, config.encoder_weights, trust_checkpoint, allowed_code)
    region = None
    if config.region_encoder is not None:
        region = _load_encoder(config.region_encoder, config.region_encoder_weights, trust_checkpoint, allowed_code)
    return Conditioning(projector, patch, region)
