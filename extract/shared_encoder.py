"""One forward of the conditioning encoder per tile, serving both its uses: the UNet's context and its `enc:` maps.

When `conditioning.encoder` is also listed in `extract.encoders` and both are the same model (same class, input
size, normalisation and weights, compared tensor by tensor), the diffusion pass takes the CLS embedding and the
patch-token maps from one forward, instead of the encoder pass running the ViT over every tile again.

Only under float32. Encoder maps are computed in float32 everywhere, so one encoder's arrays agree across
devices, and the conditioning must not change precision because maps are also wanted. Under bf16 or fp16
autocast the encoder pass runs apart, as it does on dask workers. The module must offer
`embed_and_maps(x, layers)` (HIPT's ViT does; a `python:` plugin can).
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass

import torch
from pathseg.extract.conditioning import Conditioning
from pathseg.extract.encoder_pass import check_identity, create_arrays, encoder_work, record_encoder
from pathseg.extract.feature_encoders import FeatureEncoder, build_feature_encoder, encoder_weights
from pathseg.extract.ssl_encoders import SSLEncoder

from pathseg.config import PipelineConfig
from pathseg.store import FeatureStore
from pathseg.store.names import ENCODER_TIMESTEP


@dataclass
class SharedEncoder:
    """The conditioning's module as a feature encoder, timing its own forwards (its cost per tile)."""

    encoder: FeatureEncoder
    layers: list[int]
    seconds: float = 0.0
    tiles: int = 0

    @property
    def blocks(self) -> list[str]:
        return self.encoder.blocks(self.layers)

    def embed_and_maps(self, images01: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        started = time.perf_counter()
        embedding, maps = self.encoder.module.embed_and_maps(self.encoder.prepare(images01), [-1, *self.layers])
        if images01.device.type == "cuda":
            torch.cuda.synchronize(images01.device)
        self.seconds += time.perf_counter() - started
        self.tiles += len(images01)
        return embedding, maps

    def record(self, store: FeatureStore, device: torch.device) -> None:
        if self.tiles:
            record_encoder(store, self.encoder, self.layers, self.seconds / self.tiles, device, shared=True)


def same_model(encoder: FeatureEncoder, patch: SSLEncoder) -> bool:
    if type(encoder.module) is not type(patch.module) or encoder.input_size != patch.input_size:
        return False
    if [float(v) for v in (*encoder.mean, *encoder.std)] != [float(v) for v in (*patch.mean, *patch.std)]:
        return False
    mine, theirs = encoder.module.state_dict(), patch.module.state_dict()
    return mine.keys() == theirs.keys() and all(
        mine[k].shape == theirs[k].shape and torch.equal(mine[k], theirs[k].to(mine[k].device)) for k in mine)


def shareable_encoder(config: PipelineConfig, conditioning: Conditioning, precision: str,
                      allowed_code: Collection[str]) -> FeatureEncoder | None:
    """The listed encoder that is the conditioning's own model, run by the conditioning's module; else None."""
    patch = conditioning.patch
    name = (config.conditioning.encoder or "").strip()
    listed = {n.strip() for n in config.extract.encoders}
    if patch is None or name not in listed or precision != "float32" or not hasattr(patch.module, "embed_and_maps"):
        return None
    encoder = build_feature_encoder(name, encoder_weights(config.extract, name),
                                    trust_checkpoint=config.backbone.trust_checkpoint, seed=config.extract.noise_seed,
                                    allowed_code=allowed_code,
                                    normalisation=config.extract.encoder_normalisation.get(name))
    if not same_model(encoder, patch):
        return None
    encoder.module = patch.module  # one copy, already on the device
    return encoder


def share_encoder(config: PipelineConfig, store: FeatureStore, conditioning: Conditioning,
                  work: dict[int, dict[int, list[str]]], device: torch.device, precision: str,
                  allowed_code: Collection[str]) -> SharedEncoder | None:
    """Add the conditioning encoder's missing maps to the diffusion pass's `work` (shard -> timestep -> blocks,
    under ENCODER_TIMESTEP) for the shards it computes anyway; the arrays and their identity are made first."""
    encoder = shareable_encoder(config, conditioning, precision, allowed_code)
    if encoder is None:
        return None
    layers = list(config.extract.encoder_layers)
    for block in encoder.blocks(layers):
        check_identity(store, block, encoder.identity)  # refused before any pass, not after the long one
    missing = encoder_work(store, encoder, layers)
    if not any(shard in todo for shard in work for todo in missing.values()):
        return None
    create_arrays(config, store, encoder, layers, device)
    for shard, wanted in work.items():
        blocks = [block for block, todo in missing.items() if shard in todo]
        if blocks:
            wanted[ENCODER_TIMESTEP] = blocks
    return SharedEncoder(encoder, layers)
