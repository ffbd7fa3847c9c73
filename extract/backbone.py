"""The frozen feature extractor: UNet, first stage, noise schedule and SSL projector, as diffusers models.

A backbone is loaded from the built-in `tiny` preset, from a diffusers-format directory, or (see
`ldm_checkpoint`) from an original LDM checkpoint. Whatever the source, extraction sees one
`Backbone`, and the store records its `digest` so features from different weights never mix.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel, VQModel
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

from pathseg.errors import PathsegError
from pathseg.loading.data_files import read_json_object, read_safetensors

PROJECTOR_WEIGHTS = "model.safetensors"
PROJECTOR_CONFIG = "config.json"


class SSLProjector(nn.Module):
    """The LDM's `SSLEmbedder`: L2-normalised patch (20x) and region (5x) embeddings, each projected to one token.

    Training dropped the condition by zeroing the embedding, so zeros in give the "null" context
    (the two biases): a valid unconditional mode that needs no SSL encoder at all.
    """

    def __init__(self, patch_dim: int = 384, region_dim: int = 768, context_dim: int = 512) -> None:
        super().__init__()
        self.patch_dim, self.region_dim, self.context_dim = patch_dim, region_dim, context_dim
        self.patch_fc = nn.Linear(patch_dim, context_dim)
        self.region_fc = nn.Linear(region_dim, context_dim)

    def config(self) -> dict[str, int]:
        return {"patch_dim": self.patch_dim, "region_dim": self.region_dim, "context_dim": self.context_dim}

    def forward(self, patch: torch.Tensor, region: torch.Tensor | None = None) -> torch.Tensor:
        if region is None:
            region = patch.new_zeros(patch.shape[0], self.region_dim)
        patch = F.normalize(patch, dim=-1)
        region = F.normalize(region, dim=-1)
        return torch.stack([self.patch_fc(patch), self.region_fc(region)], dim=1)

    def null_context(self, batch: int) -> torch.Tensor:
        weight = self.patch_fc.weight
        return self(weight.new_zeros(batch, self.patch_dim), weight.new_zeros(batch, self.region_dim))

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / PROJECTOR_CONFIG).write_text(json.dumps(self.config(), indent=2))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(directory / PROJECTOR_WEIGHTS))

    @classmethod
    def load(cls, directory: Path) -> SSLProjector:
        config_path, weights_path = directory / PROJECTOR_CONFIG, directory / PROJECTOR_WEIGHTS
        for path in (config_path, weights_path):
            if not path.exists():
                raise PathsegError(f"{path} is missing; a backbone directory needs ssl_projector/{path.name}")
        config = read_json_object(config_path, "re-make the backbone directory (`pathseg convert-ldm`)")
        try:
            projector = cls(**config)
        except (TypeError, ValueError, RuntimeError) as error:
            raise PathsegError(f"{config_path}: not an SSL projector config ({str(error).splitlines()[0]})") from None
        state = read_safetensors(weights_path, "re-make the backbone directory (`pathseg convert-ldm`)")
        try:
            projector.load_state_dict(state)
        except RuntimeError as error:
            raise PathsegError(
                f"{weights_path}: weights do not fit its config.json ({str(error).splitlines()[0]})"
            ) from None
        return projector


FirstStage = VQModel | AutoencoderKL


def latent_channels_of(first_stage_config: dict) -> int:
    """Channels of z_0: a VQ model's pre-quantisation output has vq_embed_dim of them (when set), KL latent_channels."""
    return int(first_stage_config.get("vq_embed_dim") or first_stage_config["latent_channels"])


@dataclass
class Backbone:
    unet: UNet2DConditionModel
    first_stage: FirstStage
    scheduler: DDPMScheduler
    projector: SSLProjector
    source: str
    weights_digest: str | Callable[[], str] = field(repr=False)

    @property
    def digest(self) -> str:
        """Hashing 400 M weights takes a second, and extraction identifies weights by file or preset: lazy."""
        if callable(self.weights_digest):
            self.weights_digest = self.weights_digest()
        return self.weights_digest

    def modules(self) -> list[nn.Module]:
        return [self.unet, self.first_stage, self.projector]

    def to(self, device: torch.device | str) -> Backbone:
        for module in self.modules():
            module.to(device).eval().requires_grad_(False)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """z_0 from images in [-1, 1]. VQ: the pre-quantisation output, as the LDM trained on; KL: the mean."""
        if isinstance(self.first_stage, VQModel):
            latents = self.first_stage.encode(images).latents
        else:
            latents = self.first_stage.encode(images).latent_dist.mode()
        # Standard layout whatever the encoder's convolutions returned (it can come out channels_last): the
        # UNet then computes bit-identical features from a fresh z_0 and from one read back from the store.
        return (latents * self.latent_scale).contiguous()

    @property
    def latent_channels(self) -> int:
        return latent_channels_of(dict(self.first_stage.config))

    @property
    def latent_factor(self) -> int:
        """Image px per latent px: each first-stage level but the last halves the image (VQ-f4: three levels)."""
        return 2 ** (len(self.first_stage.config.block_out_channels) - 1)

    def latent_shape(self, tile_size: int) -> tuple[int, int, int]:
        size = tile_size // self.latent_factor
        return (self.latent_channels, size, size)

    @property
    def latent_scale(self) -> float:
        return float(getattr(self.first_stage.config, "scaling_factor", 1.0) or 1.0)

    def identity(self) -> dict:
        unet_config = {k: v for k, v in dict(self.unet.config).items() if not k.startswith("_")}
        return {
            "source": self.source,
            "digest": self.digest,
            "unet_class": type(self.unet).__name__,
            "first_stage_class": type(self.first_stage).__name__,
            "block_out_channels": list(unet_config["block_out_channels"]),
            "cross_attention_dim": unet_config["cross_attention_dim"],
        }

    def save(self, directory: Path) -> None:
        """The diffusers-format directory that `load_backbone_dir` reads back."""
        directory.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(directory / "unet")
        self.first_stage.save_pretrained(directory / "first_stage")
        self.scheduler.save_pretrained(directory / "scheduler")
        self.projector.save(directory / "ssl_projector")


def ldm_scheduler() -> DDPMScheduler:
    """The LDM's "linear" schedule is linear in sqrt(beta): diffusers calls that scaled_linear."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.0015,
        beta_end=0.0195,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
    )


def unet_config(
    model_channels: int,
    channel_mult: list[int],
    num_res_blocks: int,
    attention_levels: list[bool],
    context_dim: int,
    num_heads: int = 1,
    in_channels: int = 3,
    sample_size: int = 64,
) -> dict:
    """diffusers arguments for an LDM `openaimodel.UNetModel` with a spatial transformer.

    `attention_head_dim` is, for historical reasons, the number of heads in diffusers' UNet;
    LDM's ResBlocks use timestep embeddings of 4x model_channels and cos-first sinusoids.
    """
    down = ["CrossAttnDownBlock2D" if attn else "DownBlock2D" for attn in attention_levels]
    up = ["CrossAttnUpBlock2D" if attn else "UpBlock2D" for attn in reversed(attention_levels)]
    return {
        "sample_size": sample_size,
        "in_channels": in_channels,
        "out_channels": in_channels,
        "down_block_types": down,
        "up_block_types": up,
        "block_out_channels": [model_channels * m for m in channel_mult],
        "layers_per_block": num_res_blocks,
        "cross_attention_dim": context_dim,
        "attention_head_dim": num_heads,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "norm_num_groups": 32,
        "use_linear_projection": False,
    }


def vq_config(ch: int, ch_mult: list[int], num_res_blocks: int, z_channels: int, embed_dim: int, n_embed: int) -> dict:
    """diffusers arguments for the LDM's `VQModelInterface` (taming-style encoder with a mid attention)."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * len(ch_mult),
        "up_block_types": ["UpDecoderBlock2D"] * len(ch_mult),
        "block_out_channels": [ch * m for m in ch_mult],
        "layers_per_block": num_res_blocks,
        "latent_channels": z_channels,
        "num_vq_embeddings": n_embed,
        "vq_embed_dim": embed_dim,
        "norm_num_groups": 32,
        "scaling_factor": 1.0,
    }


TINY = {
    "unet": unet_config(32, [1, 2, 3, 5], 2, [False, True, True, True], context_dim=64),
    "first_stage": vq_config(32, [1, 2, 4], 1, z_channels=3, embed_dim=3, n_embed=256),
    "projector": {"patch_dim": 384, "region_dim": 768, "context_dim": 64},
}
PAPER = {
    "unet": unet_config(192, [1, 2, 3, 5], 2, [False, True, True, True], context_dim=512),
    "first_stage": vq_config(128, [1, 2, 4], 2, z_channels=3, embed_dim=3, n_embed=8192),
    "projector": {"patch_dim": 384, "region_dim": 768, "context_dim": 512},
}


def state_digest(modules: list[nn.Module]) -> str:
    """A hash of the weights themselves, so the store can tell two sets of weights apart."""
    digest = hashlib.sha256()
    for module in modules:
        for key, tensor in sorted(module.state_dict().items()):
            digest.update(key.encode())
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def build_random(preset: dict, seed: int, source: str) -> Backbone:
    """Seeded random weights: same structure as a real backbone, for demos, tests and benchmarks."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**preset["unet"])
        first_stage = VQModel(**preset["first_stage"])
        projector = SSLProjector(**preset["projector"])
    modules: list[nn.Module] = [unet, first_stage, projector]
    backbone = Backbone(unet, first_stage, ldm_scheduler(), projector, source, lambda: state_digest(modules))
    return backbone.to("cpu")


def file_digest(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def load_first_stage(directory: Path) -> FirstStage:
    config_path = directory / "config.json"
    if not config_path.exists():
        raise PathsegError(f"{config_path} is missing; a backbone directory needs first_stage/config.json")
    class_name = read_json_object(config_path, "re-make the backbone directory").get("_class_name", "VQModel")
    classes = {"VQModel": VQModel, "AutoencoderKL": AutoencoderKL}
    if class_name not in classes:
        raise PathsegError(f"{config_path}: first stage {class_name!r} is not supported; use VQModel or AutoencoderKL")
    return _strict_from_pretrained(classes[class_name], directory)


@contextmanager
def quiet_diffusers():
    """diffusers logs multi-line advice (install accelerate...) while loading; pathseg's output stays its own."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


def _strict_from_pretrained(cls, directory: Path):
    """`cls.from_pretrained`, refusing weights that do not cover the model exactly: diffusers would otherwise fill a
    missing or renamed tensor with random values and carry on (a damaged file would give other features, silently)."""
    model, info = cls.from_pretrained(directory, output_loading_info=True)
    problems = {kind: info.get(kind) or [] for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(problems.values()):
        weights = next((p.name for p in sorted(directory.iterdir()) if p.suffix in {".safetensors", ".bin"}), "weights")
        found = "; ".join(f"{len(keys)} {kind.replace('_keys', '')}: {', '.join(map(str, keys[:3]))}"
                          for kind, keys in problems.items() if keys)
        raise PathsegError(f"{directory / weights}: does not match {directory / 'config.json'} ({found}); the backbone "
                           "directory is damaged or mixed: make it again (`pathseg convert-ldm` or `pathseg pretrain`)")
    return model


def load_backbone_dir(directory: Path) -> Backbone:
    """A diffusers-format directory: unet/, first_stage/, scheduler/, ssl_projector/."""
    directory = Path(directory)
    for part in ("unet", "first_stage", "scheduler", "ssl_projector"):
        if not (directory / part).is_dir():
            raise PathsegError(
                f"backbone directory {directory} has no {part}/; expected unet/, first_stage/, scheduler/, "
                "ssl_projector/ (make one with `pathseg convert-ldm`)"
            )
    try:
        with quiet_diffusers():
            unet = _strict_from_pretrained(UNet2DConditionModel, directory / "unet")
            first_stage = load_first_stage(directory / "first_stage")
            scheduler = DDPMScheduler.from_pretrained(directory / "scheduler")
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as error:
        raise PathsegError(f"backbone directory {directory}: {str(error).splitlines()[0]}") from None
    projector = SSLProjector.load(directory / "ssl_projector")
    weights = [p for p in directory.rglob("*") if p.suffix in {".safetensors", ".bin"}]
    backbone = Backbone(unet, first_stage, scheduler, projector, str(directory.resolve()), lambda: file_digest(weights))
    return backbone.to("cpu")


