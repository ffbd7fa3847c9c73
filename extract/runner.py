"""Stage 1: tiles -> z_0 -> seeded noise at each timestep -> conditioned UNet -> hooked features -> store.

Work is done shard by shard: every (timestep, block) array missing that shard gets it from one pass
over its tiles, and each shard is written whole and then flagged, so a re-run computes only what is
missing and a new timestep or block extends the store instead of rebuilding it.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable, Collection
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from pathseg.extract.backbone import Backbone, backbone_fingerprint, load_backbone
from pathseg.extract.backbone_info import part_configs
from pathseg.extract.blocks import FeatureCapture, UNetLayout, block_table, canonical_block
from pathseg.extract.conditioning import build_conditioning, weights_digest
from pathseg.extract.precision import autocast_for, check_precision, pick_device, resolved_precision
from pathseg.extract.tiles import TileSource, labels_for_tiles, plan_tiles, store_ignore_index, tile_noise

from pathseg.config import ExtractConfig, PipelineConfig, config_to_dict
from pathseg.datasets import build_dataset
from pathseg.errors import PathsegError
from pathseg.locking import store_lock
from pathseg.progress import progress_bar, say
from pathseg.store import FeatureStore, digest, feature_key, store_path_for
from pathseg.store_files import remove_partial_files


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


def _to_model_input(tiles: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 (k, T, T, 3) -> float (k, 3, T, T) in [0, 1], on the device (pinned, asynchronous copy on CUDA)."""
    tensor = torch.from_numpy(tiles)
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    tensor = tensor.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
    return tensor.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else tensor


def prepare_for_device(backbone: Backbone, device: torch.device, compile_unet: bool) -> Backbone:
    """channels_last on GPUs (faster convolutions under autocast), and torch.compile when asked."""
    backbone.to(device)
    if device.type == "cuda":
        for module in (backbone.unet, backbone.first_stage):
            module.to(memory_format=torch.channels_last)
    if compile_unet:
        backbone.unet = torch.compile(backbone.unet, dynamic=False)
    return backbone


class _Extractor:
    """The backbone, conditioning and block hooks of one device, shared by every batch that runs on it.

    `allowed_code`: the `python:` encoders the caller vouches the user named themselves (see
    `build_conditioning`). One lock covers a whole `features` call: the hooks keep what they capture on
    the shared capture, so two threads of one dask worker running at once would read each other's features.
    """

    def __init__(self, backbone: Backbone, config: PipelineConfig, device: torch.device, *,
                 allowed_code: Collection[str] = ()) -> None:
        self.backbone = backbone
        self.conditioning = build_conditioning(config.conditioning, backbone.projector,
                                               trust_checkpoint=config.backbone.trust_checkpoint,
                                               allowed_code=allowed_code).to(device)
        self.config = config
        self.device = device
        self.scheduler_alphas = backbone.scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
        self._capture: FeatureCapture | None = None
        self._lock = threading.Lock()

    def capture(self, blocks: list[str]) -> FeatureCapture:
        """One capture for every block asked so far: its hooks stay put, so a compiled UNet compiles once
        (a new block set costs one recompile), and timesteps that want fewer blocks just ignore the rest."""
        wanted = set(blocks)
        if self._capture is None or not wanted <= set(self._capture.names):
            names = sorted(wanted | set(self._capture.names if self._capture else []))
            if self._capture is not None:
                self._capture.close()
            self._capture = FeatureCapture(self.backbone.unet, names)
        return self._capture

    @property
    def needs_pixels(self) -> bool:
        """Only the SSL encoder needs pixels once z_0 is cached; the null context does not."""
        return self.config.conditioning.mode != "null"

    def features(
        self, tiles: np.ndarray | None, noise: torch.Tensor, wanted: dict[int, list[str]], z0: np.ndarray | None = None
    ) -> tuple[dict[tuple[int, str], tuple[np.ndarray, np.ndarray]], np.ndarray | None]:
        with self._lock:
            return self._features(tiles, noise, wanted, z0)

    @torch.inference_mode()
    def _features(
        self, tiles: np.ndarray | None, noise: torch.Tensor, wanted: dict[int, list[str]], z0: np.ndarray | None
    ) -> tuple[dict[tuple[int, str], tuple[np.ndarray, np.ndarray]], np.ndarray | None]:
        """For every timestep -> blocks asked: (features in the storage dtype, each tile's largest |value| as
        computed), and z_0 if it was computed.

        The largest |value| is what lets the store tell a block float16 cannot hold from a model that made NaN.
        On a GPU every copy to the host is asynchronous into pinned memory, with one wait per batch, so copies
        overlap the next timestep's UNet forward instead of stalling it (item 9 of issue 11).
        """
        images01 = _to_model_input(tiles, self.device) if tiles is not None else None
        pending: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        computed_z0 = None
        storage = STORAGE_DTYPES[self.config.extract.feature_dtype]
        with autocast_for(self.device, self.config.extract.autocast):
            if z0 is None:
                latents = self.backbone.encode(images01 * 2.0 - 1.0).float()
                computed_z0 = _to_host(latents)
            else:
                latents = torch.from_numpy(z0).to(self.device)
            if images01 is None:  # z_0 cached and no SSL encoder: the null context needs no pixels
                context = self.conditioning.projector.null_context(len(noise))
            else:
                context = self.conditioning(images01)
            noise = noise.to(self.device)
            z0 = latents
            for timestep, blocks in wanted.items():
                abar = self.scheduler_alphas[timestep]
                zt = abar.sqrt() * z0 + (1.0 - abar).sqrt() * noise
                steps = torch.full((z0.shape[0],), timestep, device=self.device, dtype=torch.long)
                captured = self.capture(blocks)(zt, steps, context)
                for block in blocks:
                    value = captured[block]
                    largest = value.detach().abs().amax(dim=tuple(range(1, value.ndim))).float()
                    pending[(timestep, block)] = (_to_host(value.to(storage)), _to_host(largest))
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        out = {key: (values.numpy(), largest.numpy()) for key, (values, largest) in pending.items()}
        return out, (computed_z0.numpy() if computed_z0 is not None else None)


STORAGE_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU copy; from a GPU, asynchronous into pinned memory (valid once the stream is synchronised)."""
    if tensor.device.type != "cuda":
        return tensor.detach().contiguous()
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor.detach(), non_blocking=True)
    return host


def uses_cluster(settings: ExtractConfig) -> bool:
    return settings.workers > 1 or bool(settings.scheduler)


def extract_shards(
    extractor: _Extractor, store: FeatureStore, source: TileSource, work: dict[int, dict[int, list[str]]],
    advance: Callable[[int], object], config: PipelineConfig | None = None,
) -> None:
    """Compute and write every shard in `work` (shard -> timestep -> blocks), each whole, then flagged.

    The reader thread decodes and cuts batch k+1 while the model runs batch k; the writer thread
    compresses and writes shard s while the model runs shard s+1.
    """
    config = config or extractor.config  # a worker's extractor serves tasks of several configs: the task's own
    batch = config.extract.batch_size
    latent_shape = extractor.backbone.latent_shape(config.tiling.tile_size)
    latents_done = store.latent_shards_done()

    def load(shard: int, lo: int, hi: int) -> tuple[np.ndarray | None, torch.Tensor, np.ndarray | None]:
        noise = tile_noise(config.extract.noise_seed, source.noise_keys(lo, hi), latent_shape)
        z0 = store.read_latents(lo, hi) if latents_done[shard] else None
        tiles = source.tiles(lo, hi) if z0 is None or extractor.needs_pixels else None
        return tiles, noise, z0

    batches = [
        (shard, lo, min(lo + batch, store.shard_range(shard)[1]))
        for shard in sorted(work)
        for lo in range(*store.shard_range(shard), batch)
    ]
    with (
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="pathseg-read") as reader,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="pathseg-write") as writer,
    ):
        pending: list[Future] = []
        upcoming = reader.submit(load, *batches[0])
        position = 0
        for shard in sorted(work):
            wanted = work[shard]
            results: dict[tuple[int, str], list[tuple[np.ndarray, np.ndarray]]] = {
                (ts, b): [] for ts, blocks in wanted.items() for b in blocks
            }
            new_latents = []
            while position < len(batches) and batches[position][0] == shard:
                _, lo, hi = batches[position]
                tiles, noise, z0 = upcoming.result()
                position += 1
                if position < len(batches):
                    upcoming = reader.submit(load, *batches[position])
                features, computed_z0 = extractor.features(tiles, noise, wanted, z0)
                for key, value in features.items():
                    results[key].append(value)
                if computed_z0 is not None:
                    new_latents.append(computed_z0)
                advance(hi - lo)
            for future in pending:
                future.result()
            pending = [
                writer.submit(store.write_shard, ts, b, shard, np.concatenate([values for values, _ in chunks]),
                              np.concatenate([largest for _, largest in chunks]))
                for (ts, b), chunks in results.items()
            ]
            if new_latents and not latents_done[shard]:
                pending.append(writer.submit(store.write_latents, shard, np.concatenate(new_latents)))
        for future in pending:
            future.result()


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
    identity = store_identity(config, dataset.identity())
    fingerprint = digest(identity)
    store = _open_store(config, path, identity, fingerprint, dataset, records, overwrite)
    remove_partial_files(path)
    summary = ExtractionSummary(store=path)
    summary.prepared_images = _prepare_images(store, records, config, show_progress)

    needs_compute = any(not store.has_feature(ts, b) or store.missing_shards(ts, b) for ts, b in pairs)
    with ExitStack() as resources:
        cluster = None
        if needs_compute and uses_cluster(config.extract):
            from pathseg.extract.cluster import ExtractionCluster

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
        if not work:
            summary.seconds = time.perf_counter() - started
            return summary

        total_tiles = store.tiles_in(work)
        if cluster is not None:
            latents_done = store.latent_shards_done()
            if not all(latents_done[s] for s in work):
                store.ensure_latents((latent_channels, latent, latent))  # here, so no two workers create it
            cluster.extract(config, path, work, total_tiles)
        else:
            b = config.backbone
            backbone = load_backbone(b.name, b.config, b.seed, trust_checkpoint=b.trust_checkpoint)
            extractor = _Extractor(prepare_for_device(backbone, device, config.extract.compile), config, device,
                                   allowed_code=config.conditioning.code_specs())  # the user's own config
            t = config.tiling
            source = TileSource(records, store.images, t.tile_size, t.stride, t.pad_mode)
            with progress_bar("extract", int(total_tiles), "tiles", show_progress) as advance:
                extract_shards(extractor, store, source, work, advance)
    summary.computed_tiles = total_tiles
    computed = {feature_key(ts, b) for wanted in work.values() for ts, blocks in wanted.items() for b in blocks}
    summary.computed_arrays = sorted(computed)
    summary.seconds = time.perf_counter() - started
    return summary
