"""Encoder maps into a store: every listed encoder over every tile, shard by shard, like a new timestep.

An encoder adds arrays to a store; it never changes the store's key (its features do not depend on the
backbone, but they sit beside the backbone's so one head compares both on the same tiles and splits). Each
array's encoder, weights digest and whether it is random go in the store's `encoders` record, and asking for
the same block from other weights is refused rather than mixing two encoders in one array. Encoders run in
float32: their maps are few, and exact numbers keep one encoder's arrays comparable across devices.
"""

from __future__ import annotations

import time
from collections.abc import Collection

import numpy as np
import torch
from pathseg.extract.feature_encoders import FeatureEncoder, configured_encoders, planned_identity
from pathseg.extract.tiles import TileSource

from pathseg.config import PipelineConfig
from pathseg.errors import PathsegError
from pathseg.progress import progress_bar
from pathseg.store import FeatureStore, feature_key
from pathseg.store.identity import ENCODERS_ATTR, encoder_identity
from pathseg.store.names import ENCODER_TIMESTEP, encoder_block


def _to_input(tiles: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(tiles).to(device).permute(0, 3, 1, 2).float().div_(255.0)


def check_identity(store: FeatureStore, block: str, identity: dict) -> None:
    """Refuse to mix two encoders' maps in one array, naming what differs (weights, normalisation, seed...)."""
    recorded = store.attrs.get(ENCODERS_ATTR, {}).get(block)
    if recorded is None:
        return
    same = {k: v for k, v in encoder_identity(recorded).items() if k != "layer"}
    if same == identity:
        return
    differing = sorted(k for k in set(same) | set(identity) if same.get(k) != identity.get(k))
    if "random" in differing or "weights_digest" in differing:
        was = "random" if recorded.get("random") else f"weights {str(recorded.get('weights_digest'))[:12]}"
        now = "random" if identity.get("random") else f"weights {str(identity.get('weights_digest'))[:12]}"
        raise PathsegError(f"{store.path}: {block} was extracted with {was}, and extract.encoder_weights now gives "
                           f"{now}; use the same weights, or extract into another --store")
    shown = ", ".join(f"{k} {same.get(k)!r} -> {identity.get(k)!r}" for k in differing)
    raise PathsegError(f"{store.path}: {block} was extracted with other settings ({shown}; encoder_normalisation "
                       "is extract.encoder_normalisation); use the same ones, or extract into another --store")


def check_stored_encoders(config: PipelineConfig, store: FeatureStore) -> None:
    """Before the diffusion pass: listed encoders whose weights differ from the store's arrays are refused now,
    not after hours (a `python:` plugin's identity holds its code, known only once imported: checked later)."""
    for name in dict.fromkeys(n.strip() for n in config.extract.encoders):
        identity = planned_identity(config.extract, name, config.extract.noise_seed)
        if identity is None:
            continue
        for layer in [None, *config.extract.encoder_layers]:
            check_identity(store, encoder_block(name, layer), identity)


def encoder_work(store: FeatureStore, encoder: FeatureEncoder, layers: list[int]) -> dict[str, list[int]]:
    """block -> shards it lacks (every shard for a block not yet in the store)."""
    return {block: (store.missing_shards(ENCODER_TIMESTEP, block)
                    if store.has_feature(ENCODER_TIMESTEP, block) else list(range(store.n_shards)))
            for block in encoder.blocks(layers)}


def extract_encoders(config: PipelineConfig, store: FeatureStore, source: TileSource, device: torch.device,
                     show_progress: bool, allowed_code: Collection[str] = ()) -> tuple[list[str], int]:
    """Compute what the store lacks of every listed encoder; returns (array keys computed, tiles encoded)."""
    if not config.extract.encoders:
        return [], 0
    encoders = configured_encoders(config.extract, trust_checkpoint=config.backbone.trust_checkpoint,
                                   seed=config.extract.noise_seed, allowed_code=allowed_code)
    layers = list(config.extract.encoder_layers)
    computed: list[str] = []
    encoded = 0
    for encoder in encoders:
        for block in encoder.blocks(layers):
            check_identity(store, block, encoder.identity)
        work = encoder_work(store, encoder, layers)
        shards = sorted(set().union(*work.values()))
        if not shards:
            continue
        encoder.module.to(device)
        create_arrays(config, store, encoder, layers, device)
        started = time.perf_counter()
        tiles_done = _encode_shards(config, store, source, encoder, layers, work, shards, device, show_progress)
        seconds = time.perf_counter() - started
        record_encoder(store, encoder, layers, seconds / max(tiles_done, 1), device)
        computed += [feature_key(ENCODER_TIMESTEP, block) for block, todo in work.items() if todo]
        encoded += tiles_done
        encoder.module.to("cpu")
    return computed, encoded


def _encode_shards(config: PipelineConfig, store: FeatureStore, source: TileSource, encoder: FeatureEncoder,
                   layers: list[int], work: dict[str, list[int]], shards: list[int], device: torch.device,
                   show_progress: bool) -> int:
    blocks = encoder.blocks(layers)
    batch = config.extract.batch_size
    total = store.tiles_in(shards)
    with progress_bar(f"encode {encoder.name}", int(total), "tiles", show_progress) as advance:
        for shard in shards:
            lo, hi = store.shard_range(shard)
            parts: list[list[np.ndarray]] = [[] for _ in blocks]
            for start in range(lo, hi, batch):
                stop = min(start + batch, hi)
                with torch.inference_mode():
                    maps = encoder.maps(_to_input(source.tiles(start, stop), device), layers)
                for part, value in zip(parts, maps, strict=True):
                    part.append(value.float().cpu().numpy())
                advance(stop - start)
            for block, part in zip(blocks, parts, strict=True):
                if shard in work[block]:
                    data = np.concatenate(part)
                    store.write_shard(ENCODER_TIMESTEP, block, shard, data, np.abs(data).reshape(len(data), -1).max(1))
    return total


def create_arrays(config: PipelineConfig, store: FeatureStore, encoder: FeatureEncoder, layers: list[int],
                  device: torch.device) -> None:
    """The encoder's arrays, shaped by one probe forward, and its identity recorded before any shard is written,
    so a stopped run keeps whose shards they are."""
    with torch.inference_mode():
        probe = encoder.maps(torch.zeros(1, 3, store.tile_size, store.tile_size, device=device), layers)
    for block, value in zip(encoder.blocks(layers), probe, strict=True):
        store.ensure_feature(ENCODER_TIMESTEP, block, *value.shape[1:], config.extract.feature_dtype)
    record_encoder(store, encoder, layers, None, device)


def record_encoder(store: FeatureStore, encoder: FeatureEncoder, layers: list[int], seconds_per_tile: float | None,
                   device: torch.device, *, shared: bool = False) -> None:
    """`shared`: computed in the diffusion pass by the conditioning's own forward (its cost is then that forward's)."""
    recorded = dict(store.attrs.get(ENCODERS_ATTR, {}))
    for block, layer in zip(encoder.blocks(layers), [None, *layers], strict=True):
        seconds = None if seconds_per_tile is None else round(seconds_per_tile, 5)
        recorded[block] = {**encoder.identity, "layer": layer, "seconds_per_tile": seconds, "device": device.type,
                           **({"shared": True} if shared else {})}
    store.group.attrs[ENCODERS_ATTR] = recorded
