"""The encoders a run's head reads (`enc:<name>` blocks), rebuilt for new images as its store computed them.

The weights come from the run's own config (`extract.encoder_weights`), and they must be the bytes the store's
arrays were made from: the run records each encoder block's identity (weights digest, or random with its
seed), and a file that no longer matches is refused rather than fed to a head trained on other features. A
`python:` encoder named by a run record is code from a file, imported only with --trust-run.
"""

from __future__ import annotations

import numpy as np
import torch
from pathseg.extract.extractor import STORAGE_DTYPES
from pathseg.extract.feature_encoders import FeatureEncoder, build_feature_encoder, encoder_weights
from pathseg.train_head.runs import Run

from pathseg.config import CODE_PREFIX, PipelineConfig
from pathseg.errors import PathsegError
from pathseg.store.identity import encoder_identity
from pathseg.store.names import ENCODER_TIMESTEP, is_encoder, split_encoder_block

RunEncoders = dict[str, tuple[FeatureEncoder, list[tuple[str, int | None]]]]


def run_encoders(run: Run, config: PipelineConfig, trust_run: bool) -> RunEncoders:
    """name -> (encoder, the (block, layer) pairs of it the run reads), each checked against the run's record."""
    recorded = run.record.get("encoders") or {}
    wanted: dict[str, list[tuple[str, int | None]]] = {}
    for _, block in run.pairs:
        if is_encoder(block):
            name, layer = split_encoder_block(block)
            wanted.setdefault(name, []).append((block, layer))
    out: RunEncoders = {}
    for name, blocks in wanted.items():
        if name.startswith(CODE_PREFIX) and not trust_run:
            raise PathsegError(f"run {run.directory} reads encoder {name}, code that pathseg would have to import; "
                               "it never runs code a run record names: if you trust this run, pass --trust-run")
        encoder = build_feature_encoder(name, encoder_weights(config.extract, name),
                                        trust_checkpoint=config.backbone.trust_checkpoint,
                                        seed=config.extract.noise_seed, allowed_code={name} if trust_run else (),
                                        normalisation=config.extract.encoder_normalisation.get(name))
        for block, _ in blocks:
            expected = {k: v for k, v in (encoder_identity(recorded.get(block)) or {}).items() if k != "layer"}
            if expected and expected != encoder.identity:
                raise PathsegError(f"run {run.directory}: extract.encoder_weights.{name} is not the file its store's "
                                   f"{block} was extracted with (weights digest differs); point it at that file")
        out[name] = (encoder, blocks)
    return out


def encoder_maps(encoders: RunEncoders, tiles: np.ndarray, device: torch.device,
                 feature_dtype: str) -> dict[tuple[int, str], np.ndarray]:
    """Each encoder block's maps of uint8 (k, T, T, 3) tiles, rounded to the storage dtype as the store rounds."""
    images01 = torch.from_numpy(tiles).to(device).permute(0, 3, 1, 2).float().div_(255.0)
    maps: dict[tuple[int, str], np.ndarray] = {}
    for encoder, blocks in encoders.values():
        encoder.module.to(device)
        layers = [layer for _, layer in blocks if layer is not None]
        with torch.inference_mode():
            computed = dict(zip(encoder.blocks(layers), encoder.maps(images01, layers), strict=True))
        for block, _ in blocks:
            value = computed[block].float().to(STORAGE_DTYPES[feature_dtype])
            maps[(ENCODER_TIMESTEP, block)] = value.cpu().numpy()
    return maps
