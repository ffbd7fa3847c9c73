"""A fit-head run turned into a segmenter: the run's head on the exact features its store holds.

Everything that decides a feature value is taken from the run and its store: backbone, conditioning,
tiling and padding, noise seed, timesteps and blocks, the precision the store was computed in, and the
storage rounding (float16 unless the store kept float32). So on an image that is in the store, the
label map equals `evaluate`'s; on a new image it is what `evaluate` would have scored.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from pathseg.extract.backbone_sources import load_backbone
from pathseg.extract.blocks import block_table
from pathseg.extract.extractor import Extractor, prepare_for_device
from pathseg.extract.precision import pick_device
from pathseg.extract.tiles import PaddedView, tile_noise
from pathseg.predict.run_encoders import encoder_maps, run_encoders
from pathseg.train_head.runs import Run, load_run
from pathseg.train_head.tile_images import normalise_pixels

from pathseg.config import PRESET_BACKBONES, PipelineConfig
from pathseg.errors import PathsegError
from pathseg.imaging.tiling import Stitcher, tile_grid
from pathseg.store import Z0_PAIR, is_z0
from pathseg.store.names import has_timestep

AUTOCAST_OF_PRECISION = {"float32": "off", "bfloat16": "bfloat16", "float16": "float16"}
GLAS_MPP = 0.62005


def training_mpp(config: PipelineConfig) -> float | None:
    """Microns per pixel of the images the head was trained on, where the dataset says."""
    if config.dataset.name == "glas":
        return GLAS_MPP
    if config.dataset.name == "bcss":
        return config.dataset.bcss.mpp
    if config.dataset.name == "folder":
        return config.dataset.folder.mpp
    return None


def run_config(run: Run, backbone: str | None, device: str | None, trust_checkpoint: bool = False,
               trust_run: bool = False) -> PipelineConfig:
    """The run's pipeline config, with the store's precision and, when given, another path to the backbone.

    Whether a checkpoint may be unpickled in full, or a `python:` encoder the run names may be imported, is the
    user's call on this command line, never what the run's record says: run.json is a file like any other, and
    may come from someone else.
    """
    config = PipelineConfig.model_validate(run.record["config"])
    config.backbone.trust_checkpoint = trust_checkpoint
    code = sorted(config.conditioning.code_specs())
    if code and not trust_run:
        raise PathsegError(f"run {run.directory} conditions on {code[0]}, code that pathseg would have to import; "
                           "it never runs code a run record names: if you trust this run, pass --trust-run")
    if backbone is not None:
        config.backbone.name = backbone
    name = config.backbone.name
    if name not in PRESET_BACKBONES and not Path(name).exists() and any(map(_needs_backbone, run.pairs)):
        raise PathsegError(f"run {run.directory} was made with backbone {name}, which no longer exists; pass "
                           "--backbone with its new path")
    precision = run.record.get("store_compute_precision") or "float32"
    config.extract.autocast = AUTOCAST_OF_PRECISION[precision]
    if device is not None:
        config.extract.device = device
    return config


def _needs_backbone(pair: tuple[int, str]) -> bool:
    """A UNet block or z0; encoder maps and the pixels need no diffusion backbone."""
    return has_timestep(pair[1]) or is_z0(pair[1])


class Predictor:
    """Logits of whole images: tiles -> backbone features (rounded as stored) -> head -> blended."""

    def __init__(self, run_dir: Path, *, backbone: str | None = None, device: str | None = None,
                 batch_size: int | None = None, trust_checkpoint: bool = False, trust_run: bool = False) -> None:
        self.run = load_run(run_dir)
        self.config = run_config(self.run, backbone, device, trust_checkpoint, trust_run)
        self.device = pick_device(self.config.extract.device)
        self.pairs = self.run.pairs
        self.extractor = self._diffusion_extractor(trust_run) if any(map(_needs_backbone, self.pairs)) else None
        self.encoders = run_encoders(self.run, self.config, trust_run)
        self.head = self.run.load_head(self.device)
        self.class_names: list[str] = list(self.run.record["class_names"])
        self.batch_size = batch_size or self.config.train.batch_size
        self.mpp = training_mpp(self.config)

    def _diffusion_extractor(self, trust_run: bool) -> Extractor:
        b = self.config.backbone
        built = load_backbone(b.name, b.config, b.seed, trust_checkpoint=b.trust_checkpoint)
        allowed = self.config.conditioning.code_specs() if trust_run else frozenset()
        return Extractor(prepare_for_device(built, self.device, False), self.config, self.device, allowed_code=allowed)

    @property
    def tile_size(self) -> int:
        return self.config.tiling.tile_size

    def wanted(self) -> dict[int, list[str]]:
        blocks: dict[int, list[str]] = {}
        for timestep, block in self.pairs:
            if has_timestep(block):  # z0 is computed anyway, and encoder maps are not the UNet's
                blocks.setdefault(timestep, []).append(block)
        return blocks

    def tile_logits(self, tiles: np.ndarray, keys: list[str], output_size: int | None = None) -> np.ndarray:
        """(k, classes, S, S) logits of uint8 (k, T, T, 3) tiles whose noise keys are `keys`.

        S is the tile size, or `output_size`: slides keep the head's logits at its finest map's size (the
        head's final bilinear upsampling from that size is done when tiles are blended, with the same result).
        """
        maps: dict[tuple[int, str], np.ndarray] = {}
        if self.extractor is not None:
            latent_shape = self.extractor.backbone.latent_shape(self.tile_size)
            noise = tile_noise(self.config.extract.noise_seed, keys, latent_shape)
            features, z0 = self.extractor.features(tiles, noise, self.wanted())
            maps = {pair: values for pair, (values, _) in features.items()}
            maps[Z0_PAIR] = z0
        if self.encoders:
            maps.update(encoder_maps(self.encoders, tiles, self.device, self.config.extract.feature_dtype))
        inputs = [torch.from_numpy(maps[pair].astype(np.float32)).to(self.device) for pair in self.pairs]
        if getattr(self.head, "needs_image", False):  # the pixels, as the store's loader serves them
            inputs.append(torch.from_numpy(normalise_pixels(tiles)).to(self.device))
        with torch.inference_mode():
            return self.head(inputs, output_size or self.tile_size).float().cpu().numpy()

    def logits_size(self) -> int:
        """Side of the head's finest input map: the size its logits have before the last upsampling (the tile
        size for a head with no such last step, e.g. pixel-mlp, or one given the pixels)."""
        if not getattr(self.head, "logits_upsample_last", True) or getattr(self.head, "needs_image", False):
            return self.tile_size
        recorded = self.run.record.get("map_sizes")
        if recorded:
            return max(int(size) for size in recorded)
        table = block_table(self.extractor.backbone.unet)
        latent = self.tile_size // self.extractor.backbone.latent_factor
        return max(latent if is_z0(block) else latent // table[block].downsample for _, block in self.pairs)

    def image_logits(self, rgb: np.ndarray, image_id: str, progress=None) -> np.ndarray:
        """(classes, H, W) blended logits of an RGB image at the training resolution.

        Tiles and their noise are those extraction would make for an image of this id: same grid, padding,
        and noise key (id, tile origin), batched as evaluate batches its tiles.
        """
        t = self.config.tiling
        grid = tile_grid(rgb.shape[0], rgb.shape[1], t.tile_size, t.stride)
        view = PaddedView(rgb, grid, t.pad_mode)
        origins = grid.origins()
        stitcher = Stitcher(grid, len(self.class_names), self.config.evaluate.blend)
        for start in range(0, len(origins), self.batch_size):
            batch = origins[start : start + self.batch_size]
            tiles = np.stack([view.tile(origin, t.tile_size) for origin in batch])
            keys = [f"{image_id}:{y}:{x}" for y, x in batch]
            for origin, logits in zip(batch, self.tile_logits(tiles, keys), strict=True):
                stitcher.add(origin, logits)
            if progress is not None:
                progress(len(batch))
        return stitcher.result()
