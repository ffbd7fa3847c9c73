"""The pipeline's settings: one YAML drives both stages, and every key is checked.

Unknown or mistyped keys fail instead of being ignored: a typo in an ablation config that silently
falls back to a default would produce a wrong result that looks right.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pathseg.config.dataset_sections import (  # noqa: F401 - re-exported as config names
    BCSS_FIVE_CLASSES,
    BCSSOptions,
    DatasetConfig,
    FolderOptions,
    GlaSOptions,
    SyntheticOptions,
)
from pathseg.config.scoring import EvaluateConfig, InstancesConfig
from pathseg.config.section import Section
from pathseg.errors import PathsegError
from pathseg.memory_budget import parse_size


class TilingConfig(Section):
    tile_size: int = Field(256, ge=32)
    stride: int = Field(192, ge=1)
    pad_mode: Literal["reflect", "symmetric", "edge", "constant"] = "reflect"

    @field_validator("tile_size")
    @classmethod
    def _multiple_of_32(cls, value: int) -> int:
        if value % 32:
            raise ValueError(f"tile_size {value} must be a multiple of 32 (f4 latent, 3 UNet downsamplings)")
        return value

    @model_validator(mode="after")
    def _stride_covers_every_pixel(self) -> TilingConfig:
        if self.stride > self.tile_size:
            raise ValueError(f"stride {self.stride} is larger than tile_size {self.tile_size}, so pixels between "
                             "tiles would be skipped; set tiling.stride to at most tiling.tile_size")
        return self


class BackboneConfig(Section):
    name: str = "tiny"
    config: Path | None = None
    seed: int = 0
    # Unpickle checkpoints (.ckpt, .pth) in full, which runs any code they carry. Off: their tensors are read as
    # data (pathseg/loading/checkpoints.py). A permission, not a property of the weights: not in any store key.
    trust_checkpoint: bool = False


CODE_PREFIX = "python:"  # an SSL encoder named so is imported from an installed module


class ConditioningConfig(Section):
    mode: Literal["null", "ssl"] = "null"

    @field_validator("mode", mode="before")
    @classmethod
    def _null_is_a_mode(cls, value: Any) -> Any:
        """`mode: null` unquoted (or `--set conditioning.mode=null`) reads as YAML's null: it means the mode."""
        return "null" if value is None else value
    encoder: str | None = None
    encoder_weights: Path | None = None
    region_encoder: str | None = None
    region_encoder_weights: Path | None = None

    def code_specs(self) -> frozenset[str]:
        """The `python:` encoders this section names: code that building its conditioning would import.

        Only a section the user wrote (their config or command line) may have these imported; a section read
        back from a run record, store attrs or a backbone directory is checked against this set instead.
        """
        names = (self.encoder, self.region_encoder)
        return frozenset(name.strip() for name in names if name and name.strip().startswith(CODE_PREFIX))


class ExtractConfig(Section):
    timesteps: list[int] = [50, 150, 250]
    blocks: list[str] = ["up1", "up2.2", "up3.2"]
    noise_seed: int = 0
    batch_size: int = Field(8, ge=1)
    device: str = "auto"
    autocast: Literal["auto", "off", "bfloat16", "float16"] = "auto"
    feature_dtype: Literal["float16", "float32"] = "float16"
    tiles_per_shard: int = Field(16, ge=1)
    compile: bool = False
    compression_level: int = Field(3, ge=1, le=22)
    workers: int = Field(1, ge=1)
    scheduler: str | None = None
    # frozen encoders whose patch-token maps go in the store as `enc:<name>` (hipt_vit_s16, timm:<arch>, python:...):
    # each needs a local weights file, or the word `random` (marked random wherever its features are reported)
    encoders: list[str] = []
    encoder_weights: dict[str, str] = {}
    # per encoder: the statistics its weights were trained with, when they are not the architecture's default
    # (UNI and DINO weights on a timm ViT use imagenet; timm's augreg ViTs use half, i.e. mean = std = 0.5)
    encoder_normalisation: dict[str, Literal["imagenet", "half"]] = {}
    encoder_layers: list[int] = []  # blocks whose raw tokens are also stored (`enc:<name>@<k>`); the output always is

    def code_specs(self) -> frozenset[str]:
        """The `python:` encoders listed: code that only this section, written by the user, may have imported."""
        return frozenset(name.strip() for name in self.encoders if name.strip().startswith(CODE_PREFIX))

    @field_validator("timesteps")
    @classmethod
    def _timesteps_valid(cls, value: list[int]) -> list[int]:
        if not value:
            raise ValueError("at least one timestep is needed")
        bad = [t for t in value if t < 0 or t > 999]
        if bad:
            raise ValueError(f"timesteps {bad} are outside the schedule's 0..999")
        return sorted(set(value))

    @field_validator("blocks")
    @classmethod
    def _blocks_nonempty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one block is needed")
        return value


class HeadConfig(Section):
    timesteps: list[int] | None = None
    blocks: list[str] | None = None
    width: int = Field(64, ge=4)
    projection_width: int = Field(32, ge=1)
    depth: int = Field(2, ge=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    kind: str = "conv"  # checked against train_head/heads.py when the head is built (config must not import it)
    mlp_hidden: list[int] = Field([256, 128], min_length=1)
    ensemble: int = Field(10, ge=1)
    pixels_per_tile: int = Field(1024, ge=1)
    # semantic: the store's classes | contour: plus a last class, a band of contour_width px inside every instance's
    # boundary (DCAN), from the store's instance maps; scored with the band folded back into the gland class
    target: Literal["semantic", "contour"] = "semantic"
    contour_width: int = Field(3, ge=1)  # px at tile resolution, per instance: touching glands get 2x this apart
    imagenet_weights: Path | None = None  # unet-resnet18 / fcn8-vgg16: a local torchvision-layout file; None = random

    @field_validator("mlp_hidden")
    @classmethod
    def _hidden_positive(cls, value: list[int]) -> list[int]:
        if any(width < 1 for width in value):
            raise ValueError(f"hidden sizes {value} must all be at least 1")
        return value


class TrainConfig(Section):
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    loss: Literal["ce", "ce+dice"] = "ce+dice"
    augment: bool = True
    seed: int = 0
    device: str = "auto"
    prefetch: int = Field(2, ge=0)
    train_split: str = "train"
    val_split: str = "val"
    shuffle_window: int = Field(128, ge=1)  # tiles: a shuffled batch draws from this many tiles' shards
    memory_budget: str | int = "auto"  # RAM for features served from memory; auto = half of what is available
    loader_threads: int = Field(0, ge=0)  # shard-decoding threads; 0 = one per core, up to 4

    @field_validator("memory_budget")
    @classmethod
    def _budget_is_a_size(cls, value: str | int) -> str | int:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return value
        try:
            parse_size(value)
        except PathsegError as error:
            raise ValueError(str(error)) from None
        return value


class AblateConfig(Section):
    """`pathseg ablate`: a grid of heads from one store, each repeated over seeds, selected on validation."""

    timesteps: list[int] | None = None  # null = extract.timesteps
    blocks: list[str] | None = None  # null = extract.blocks
    grid: Literal["each", "pairs", "all"] = "each"
    baseline: bool = True  # add a cell on z0 alone: the same head without diffusion
    # more rows beside the diffusion cells: z0, enc:<encoder> and rgb under the same head, and the paper's supervised
    # networks unet-resnet18 / fcn8-vgg16 trained on the pixels (for baseline_epochs, else train.epochs)
    baselines: list[str] = []
    # epochs of those networks: one number for both, or per network ({fcn8-vgg16: 1, unet-resnet18: 4}, others
    # train.epochs), since FCN-8s costs 3x a ResNet-18 U-Net per epoch
    baseline_epochs: int | dict[str, int] | None = None
    seeds: int = Field(3, ge=1)
    sweep: dict[str, list[Any]] = {}  # head.* / train.* setting -> values, crossed with the feature cells
    select_on: Literal["miou", "mean_dice", "object_f1"] = "miou"

    @field_validator("baseline_epochs")
    @classmethod
    def _epochs_are_positive(cls, value: int | dict[str, int] | None) -> int | dict[str, int] | None:
        counts = value.values() if isinstance(value, dict) else [] if value is None else [value]
        if any(count < 1 for count in counts):
            raise ValueError("epochs must be at least 1")
        return value

    def epochs_of(self, kind: str, default: int) -> int:
        """The epoch budget of supervised network `kind`."""
        if isinstance(self.baseline_epochs, dict):
            return self.baseline_epochs.get(kind, default)
        return self.baseline_epochs or default


class PretrainConfig(Section):
    """`pathseg pretrain`: the backbone itself, first stage then conditioned UNet, from unlabelled tiles.

    Tiles are cut with the `tiling` section and conditioned with the `conditioning` section, so the
    backbone is trained on exactly what extraction with the same config will show it.
    """

    preset: Literal["tiny", "small", "paper"] = "tiny"
    unet_width: int | None = Field(None, ge=8)  # null = the preset's; smaller only for tests and smoke runs
    first_stage_width: int | None = Field(None, ge=8)
    first_stage: Literal["vq", "kl"] = "vq"
    # a backbone directory whose first stage is taken, frozen, instead of phase 1 (the LDM's practice: one
    # autoencoder, many diffusion models); the run is then all UNet steps. null = train one
    first_stage_from: Path | None = None
    first_stage_crop: int | None = Field(128, ge=4)  # phase 1 trains on random crops this size; null = whole tiles
    # share of phase-1 steps on whole tiles though first_stage_crop is set, evenly spaced: the mid-block attention
    # then also sees extraction's full latent context (the bright rim at tile borders of crop-only training)
    first_stage_whole_fraction: float = Field(0.0, ge=0.0, le=1.0)
    steps: int = Field(2000, ge=2)
    first_stage_fraction: float = Field(0.3, gt=0.0, lt=1.0)
    first_stage_steps: int | None = Field(None, ge=1)  # overrides first_stage_fraction; fixed when extending a run
    batch_size: int = Field(8, ge=1)
    lr_first_stage: float = Field(1e-4, gt=0)
    lr_unet: float = Field(1e-4, gt=0)
    # step-local schedule (pretrain/schedule.py), so runs still extend: linear warm-up over each phase's first
    # warmup_steps, then lr / sqrt(k / lr_decay_after) after lr_decay_after steps of a phase (EDM2); null: none
    warmup_steps: int = Field(0, ge=0)
    lr_decay_after: int | None = Field(None, ge=1)
    min_snr_gamma: float | None = Field(None, gt=0)  # UNet loss weight min(SNR, gamma) / SNR (Hang et al. 2023)
    accumulation: int = Field(1, ge=1)  # batches per optimiser step: an effective batch of batch_size x this
    weight_decay: float = Field(0.0, ge=0)
    ssim_weight: float = Field(0.2, ge=0)
    kl_weight: float = Field(1e-6, ge=0)
    # phase 1: + lowpass_weight x MSE of both images average-pooled by lowpass_pool, against the washed-out
    # contrast L1 + SSIM leave at small budgets (docs/pretraining.md: most of the error is low-pass); 0 = off
    lowpass_weight: float = Field(0.0, ge=0)
    lowpass_pool: int = Field(8, ge=2)
    condition_dropout: float = Field(0.1, ge=0.0, le=1.0)
    ema_decay: float = Field(0.9999, ge=0.0, le=1.0)  # a cap: diffusers' warm-up decay is n/(n+9) at UNet step n
    checkpoint_every: int = Field(200, ge=1)
    keep_checkpoint: bool = True  # kept beside --out after the export, so a larger --steps extends the run
    splits: list[str] = Field(["train"], min_length=1)
    flips: bool = True
    colour_jitter: float = Field(0.05, ge=0.0, lt=1.0)
    seed: int = 0
    device: str = "auto"
    autocast: Literal["auto", "off", "bfloat16"] = "auto"
    samples: int = Field(8, ge=0)
    sample_steps: int = Field(25, ge=1, le=1000)
    reconstructions: int = Field(8, ge=0)
    # the first stage's PSNR/SSIM in pretrain.json: whole tiles of this split (not trained on unless listed in
    # splits); null, slides, or a dataset without it: training tiles
    quality_split: str | None = "val"
    quality_tiles: int = Field(32, ge=0)
    cached_images: int = Field(4, ge=1)
    slides: Path | None = None
    mpp: float = Field(0.5, gt=0)
    level0_mpp: float | None = Field(None, gt=0)  # slides that record no mpp; a file's own value wins
    force_level0_mpp: bool = False  # level0_mpp even for slides that record their own (mislabelled files)
    tissue_threshold: float | None = Field(None, ge=0.0, le=1.0)
    min_tissue: float = Field(0.5, gt=0.0, le=1.0)

    @field_validator("force_level0_mpp")
    @classmethod
    def _force_needs_a_value(cls, value: bool, info: Any) -> bool:
        if value and info.data.get("level0_mpp") is None:
            raise ValueError("force_level0_mpp is set but level0_mpp is not; give the mpp to force (--mpp with "
                             "--force-mpp)")
        return value

    @field_validator("first_stage_crop")
    @classmethod
    def _crop_multiple_of_4(cls, value: int | None) -> int | None:
        if value is not None and value % 4:
            raise ValueError(
                f"first_stage_crop {value} must be a multiple of 4 (the first stage's downsampling factor), or null "
                "for whole tiles"
            )
        return value


class PipelineConfig(Section):
    cache_dir: Path = Path("cache")
    runs_dir: Path = Path("runs")
    dataset: DatasetConfig = DatasetConfig()
    tiling: TilingConfig = TilingConfig()
    backbone: BackboneConfig = BackboneConfig()
    conditioning: ConditioningConfig = ConditioningConfig()
    extract: ExtractConfig = ExtractConfig()
    head: HeadConfig = HeadConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    instances: InstancesConfig = InstancesConfig()
    ablate: AblateConfig = AblateConfig()
    pretrain: PretrainConfig = PretrainConfig()


PRESET_BACKBONES = ("tiny", "paper-random")


