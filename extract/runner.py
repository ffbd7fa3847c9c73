"""Stage 1: tiles -> z_0 -> seeded noise at each timestep -> conditioned UNet -> hooked features -> store.

Work is done shard by shard: every (timestep, block) array missing that shard gets it from one pass
over its tiles, and each shard is written whole and then flagged, so a re-run computes only what is
missing and a new timestep or block extends the store instead of rebuilding it.
"""

from __future__ import annotations

import errno
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pathseg.extract.backbone_info import part_configs
from pathseg.extract.backbone_sources import backbone_fingerprint, load_backbone
from pathseg.extract.blocks import UNetLayout, block_table, canonical_block
from pathseg.extract.cluster import ExtractionCluster
from pathseg.extract.encoder_pass import check_stored_encoders, extract_encoders
from pathseg.extract.extractor import Extractor, extract_shards, prepare_for_device
from pathseg.extract.feature_encoders import check_encoder_settings
from pathseg.extract.precision import check_precision, pick_device, resolved_precision
from pathseg.extract.shared_encoder import share_encoder
from pathseg.extract.ssl_encoders import weights_digest
from pathseg.extract.tiles import TileSource, labels_for_tiles, plan_tiles, store_ignore_index

from pathseg.config import ExtractConfig, PipelineConfig, config_to_dict
from pathseg.datasets import build_dataset
from pathseg.errors import PathsegError
from pathseg.progress import progress_bar, say
from pathseg.store import FeatureStore, digest, feature_key, store_lock, store_path_for
from pathseg.store.disk import remove_partial_files
from pathseg.store.names import ENCODER_TIMESTEP


@dataclass
class ExtractionSummary:
    store: Path
    computed_tiles: int = 0
    computed_arrays: list[str] = field(default_factory=list)
    prepared_images: int = 0
    seconds: float = 0.0

    @property
    def nothing_to_do(self) -> bool:
        return self.computed_tiles == 0 and self.prepared_images == 0


def conditioning_fingerprint(config: PipelineConfig) -> dict:
    c = config.conditioning
    identity: dict = {"mode": c.mode}
    if c.mode == "ssl":
        for name, weights, key in (
            (c.encoder, c.encoder_weights, "patch"),
            (c.region_encoder, c.region_encoder_weights, "region"),
        ):
            if name is not None:
                digest_ = weights_digest(weights) if weights is not None and Path(weights).is_file() else None
                identity[key] = {"encoder": name, "weights_digest": digest_}
    return identity


def store_identity(config: PipelineConfig, dataset_identity: dict) -> dict:
    b = config.backbone
    return {
        "dataset": dataset_identity,
        "backbone": {"name": b.name, **backbone_fingerprint(b.name, b.config, b.seed)},
        "conditioning": conditioning_fingerprint(config),
        "tiling": config.tiling.model_dump(mode="json"),
        "noise_seed": config.extract.noise_seed,
    }


def block_aliases(layout: UNetLayout) -> dict[str, str]:
    names = list(block_table(layout)) + ["middle_block"]
    names += [f"output_blocks.{k}" for k in range(len(layout.block_out_channels) * layout.layers)]
    return {name: canonical_block(name, layout) for name in names}


def requested_arrays(config: PipelineConfig, layout: UNetLayout) -> list[tuple[int, str]]:
    blocks = list(dict.fromkeys(canonical_block(name, layout) for name in config.extract.blocks))
    return [(t, b) for t in config.extract.timesteps for b in blocks]


def _open_store(
    config: PipelineConfig, path: Path, identity: dict, fingerprint: str, dataset, records, overwrite: bool
) -> FeatureStore:
    if (path / "zarr.json").exists():
        try:
            store = FeatureStore.open(path, mode="a")
        except PathsegError:
            if not overwrite:
                raise
            store = None
        if store is not None and store.fingerprint == fingerprint:
            return store
        if store is not None and not overwrite:
            raise PathsegError(
                f"{path} holds features of other data or weights (fingerprint {store.fingerprint[:12]} != "
                f"{fingerprint[:12]}); rerun with --overwrite to replace it"
            )
    t = config.tiling
    entries, origins = plan_tiles(records, t.tile_size, t.stride)
    return FeatureStore.create(
        path,
        fingerprint=fingerprint,
        identity=identity,
        config=config_to_dict(config),
        class_names=list(dataset.class_names),
        ignore_index=store_ignore_index(t.pad_mode, dataset.ignore_index),
        tile_size=t.tile_size,
        stride=t.stride,
        images=entries,
        origins=origins,
        has_instances=dataset.has_instances,
        compression_level=config.extract.compression_level,
        tiles_per_shard=config.extract.tiles_per_shard,
    )


def _prepare_images(store: FeatureStore, records, config: PipelineConfig, show_progress: bool) -> int:
    """Whole images and their labels go in first: stage 2 evaluates on them without the source files."""
    t = config.tiling
    entries = store.images
    todo = np.flatnonzero(~store.image_done())
    with progress_bar("images", len(todo), "images", show_progress) as advance:
        for index in todo:
            rgb, labels, instances, tile_labels = labels_for_tiles(
                records[index], entries[index], t.tile_size, t.stride, t.pad_mode, store.ignore_index
            )
            store.write_image(int(index), rgb, labels, instances, tile_labels)
            advance(1)
    return len(todo)


def record_feature_costs(store: FeatureStore, work: dict[int, dict[int, list[str]]], seconds_per_tile: float,
                         device: str) -> None:
    """Each computed array's share of the pass: the pass ran one UNet forward per timestep, shared by its blocks,
    so a timestep costs the pass over its timesteps (the z_0 encode is spread over them)."""
    steps = {ts for wanted in work.values() for ts in wanted}
    share = round(seconds_per_tile / max(len(steps), 1), 5)
    costs = dict(store.attrs.get("feature_costs", {}))
    for wanted in work.values():
        for ts, blocks in wanted.items():
            for block in blocks:
                costs[feature_key(ts, block)] = {"seconds_per_tile": share, "device": device}
    store.group.attrs["feature_costs"] = costs


def uses_cluster(settings: ExtractConfig) -> bool:
    return settings.workers > 1 or bool(settings.scheduler)


def run_extraction(
    config: PipelineConfig, *, overwrite: bool = False, show_progress: bool = True, store_path: Path | None = None
) -> ExtractionSummary:
    """Extract what the config asks that the store lacks; one writer per store at a time (see `locking`)."""
    path = Path(store_path) if store_path else store_path_for(config)
    with store_lock(path, on_wait=say if show_progress else None):
        try:
            return _extract_locked(config, path, overwrite, show_progress)
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise PathsegError(
                    f"no space left on the device while writing {path}; free some space and rerun the same "
                    "command: finished shards are kept and only the rest is computed"
                ) from None
            raise


def _extract_locked(config: PipelineConfig, path: Path, overwrite: bool, show_progress: bool) -> ExtractionSummary:
    import time

    started = time.perf_counter()
    dataset = build_dataset(config.dataset)
    records = dataset.records()
    if not records:
        raise PathsegError(f"dataset {config.dataset.name!r} has no images for splits {config.dataset.splits}")
    parts = part_configs(config.backbone.name, config.backbone.config)
    latent_channels = parts.latent_channels(config.backbone.name)
    if config.tiling.tile_size % parts.tile_multiple():
        raise PathsegError(
            f"tiling.tile_size {config.tiling.tile_size} does not fit backbone {config.backbone.name}: its "
            f"f{parts.latent_factor} first stage and {len(parts.unet['block_out_channels']) - 1} UNet downsamplings "
            f"need a multiple of {parts.tile_multiple()}"
        )
    layout = UNetLayout.of(parts.unet)
    pairs = requested_arrays(config, layout)
    check_encoder_settings(config.extract)  # a bad encoder setting fails now, not after the diffusion pass
    identity = store_identity(config, dataset.identity())
    fingerprint = digest(identity)
    store = _open_store(config, path, identity, fingerprint, dataset, records, overwrite)
    remove_partial_files(path)
    check_stored_encoders(config, store)
    summary = ExtractionSummary(store=path)
    summary.prepared_images = _prepare_images(store, records, config, show_progress)

    needs_compute = any(not store.has_feature(ts, b) or store.missing_shards(ts, b) for ts, b in pairs)
    with ExitStack() as resources:
        cluster = None
        if needs_compute and uses_cluster(config.extract):
            cluster = resources.enter_context(ExtractionCluster(config.extract, show_progress))
        if needs_compute:  # before any array is created, so a refused run leaves the store as it was
            if cluster is not None:
                check_precision(store, cluster.precision(), config.extract.autocast, "on the dask workers")
            else:
                device = pick_device(config.extract.device)
                check_precision(store, resolved_precision(device, config.extract.autocast),
                                config.extract.autocast, f"on {device.type}")
        table = block_table(layout)
        store.record_block_aliases(block_aliases(layout))
        latent = config.tiling.tile_size // parts.latent_factor
        for timestep, block in pairs:
            info = table[block]
            size = latent // info.downsample
            store.ensure_feature(timestep, block, info.channels, size, size, config.extract.feature_dtype)
        work: dict[int, dict[int, list[str]]] = {}
        for timestep, block in pairs:
            for shard in store.missing_shards(timestep, block):
                work.setdefault(shard, {}).setdefault(timestep, []).append(block)
        total_tiles = store.tiles_in(work) if work else 0
        diffusion_started = time.perf_counter()
        t = config.tiling
        source = TileSource(records, store.images, t.tile_size, t.stride, t.pad_mode)
        if work and cluster is not None:
            latents_done = store.latent_shards_done()
            if not all(latents_done[s] for s in work):
                store.ensure_latents((latent_channels, latent, latent))  # here, so no two workers create it
            cluster.extract(config, path, work, total_tiles)
        elif work:
            b = config.backbone
            backbone = load_backbone(b.name, b.config, b.seed, trust_checkpoint=b.trust_checkpoint)
            extractor = Extractor(prepare_for_device(backbone, device, config.extract.compile), config, device,
                                   allowed_code=config.conditioning.code_specs())  # the user's own config
            precision = resolved_precision(device, config.extract.autocast)
            extractor.shared = share_encoder(config, store, extractor.conditioning, work, device, precision,
                                             config.extract.code_specs())
            with progress_bar("extract", int(total_tiles), "tiles", show_progress) as advance:
                extract_shards(extractor, store, source, work, advance)
            if extractor.shared is not None:
                extractor.shared.record(store, device)
            del extractor, backbone
        if work:
            diffusion = {shard: {ts: b for ts, b in wanted.items() if ts != ENCODER_TIMESTEP}
                         for shard, wanted in work.items()}
            record_feature_costs(store, diffusion, (time.perf_counter() - diffusion_started) / total_tiles,
                                 "dask" if cluster is not None else device.type)
        encoded_arrays, encoded_tiles = extract_encoders(config, store, source, pick_device(config.extract.device),
                                                         show_progress, config.extract.code_specs())
    summary.computed_tiles = max(total_tiles, encoded_tiles)
    computed = {feature_key(ts, b) for wanted in work.values() for ts, blocks in wanted.items() for b in blocks}
    summary.computed_arrays = sorted(computed | set(encoded_arrays))
    summary.seconds = time.perf_counter() - started
    return summary
