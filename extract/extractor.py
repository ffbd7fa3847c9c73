"""The backbone run over batches of tiles: decoder features per (timestep, block), and whole shards written.

Used by extraction in this process (`runner.py`), on dask workers (`cluster.py`) and by `predict`; apart from
the runner so that the cluster code and the runner never import each other.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from pathseg.extract.backbone import Backbone
from pathseg.extract.blocks import FeatureCapture
from pathseg.extract.conditioning import build_conditioning
from pathseg.extract.precision import autocast_for
from pathseg.extract.shared_encoder import SharedEncoder
from pathseg.extract.tiles import TileSource, tile_noise

from pathseg.config import PipelineConfig
from pathseg.store import FeatureStore
from pathseg.store.names import ENCODER_TIMESTEP


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


class Extractor:
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
        # the conditioning encoder's maps, from the forward that conditions (`shared_encoder.py`), for work that
        # asks for ENCODER_TIMESTEP blocks
        self.shared: SharedEncoder | None = None

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
            elif self.shared is not None and ENCODER_TIMESTEP in wanted:
                embedding, maps = self.shared.embed_and_maps(images01)
                context = self.conditioning.from_patch_embedding(embedding, images01)
                for block, value in zip(self.shared.blocks, maps, strict=True):
                    if block in wanted[ENCODER_TIMESTEP]:  # float32 maps, like the encoder pass's
                        largest = value.detach().abs().amax(dim=(1, 2, 3)).float()
                        pending[(ENCODER_TIMESTEP, block)] = (_to_host(value.float().to(storage)), _to_host(largest))
            else:
                context = self.conditioning(images01)
            noise = noise.to(self.device)
            z0 = latents
            for timestep, blocks in wanted.items():
                if timestep == ENCODER_TIMESTEP:
                    continue
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


def extract_shards(
    extractor: Extractor, store: FeatureStore, source: TileSource, work: dict[int, dict[int, list[str]]],
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
