"""What `pathseg backbone info` prints: every extractable decoder block, and what a tile costs to extract.

Choosing blocks is the main storage decision (feature volume grows with channels x size^2), and papers
name layers by the original `output_blocks[k]` numbering, so the table shows both names and flags the
one place they disagree: `output_blocks[k]` at the end of a level includes the 2x upsampler.

Choosing timesteps is the main compute decision. The first-stage encoder runs once per tile (z_0 is then
cached in the store) and the UNet once per tile per timestep; their FLOP counts, taken on the meta device
without weights, say before a GPU-hour is spent how a first extraction splits between the two.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel, VQModel
from pathseg.extract.backbone import Backbone, FirstStage, build_random, latent_channels_of
from pathseg.extract.blocks import BLOCK, LAYER, block_table, canonical_block
from pathseg.extract.ldm_yaml import backbone_configs_from_yaml, read_ldm_yaml
from torch.utils.flop_counter import FlopCounterMode

from pathseg.errors import PathsegError

COLUMNS = (("order", "order"), ("name", "block"), ("alias", "alias"), ("channels", "channels"),
           ("resolution", "size (px)"), ("note", "note"))


def _latent_factor(first_stage: FirstStage | None, block_out_channels: list[int] | None = None) -> int:
    """Each first-stage level but the last halves the image: VQ-f4 has three levels."""
    if block_out_channels is None:
        block_out_channels = list(first_stage.config.block_out_channels) if first_stage is not None else [0] * 3
    return 2 ** (len(block_out_channels) - 1)


def describe_blocks(model: Backbone | UNet2DConditionModel, tile_size: int = 256,
                    latent_factor: int | None = None) -> list[dict]:
    """One row per block in forward order: name, `output_blocks.K` alias, channels, feature-map side in px.

    The size is that of the map for a `tile_size` px tile; `latent_factor` (image px per latent px) is read
    from the backbone's first stage, or defaults to 4 (VQ-f4) for a bare UNet.
    """
    unet = model.unet if isinstance(model, Backbone) else model
    if latent_factor is None:
        latent_factor = _latent_factor(model.first_stage if isinstance(model, Backbone) else None)
    latent = tile_size // latent_factor
    layers = len(unet.up_blocks[0].resnets)
    aliases = {"mid": "middle_block"}
    for k in range(len(unet.up_blocks) * layers):
        aliases.setdefault(canonical_block(f"output_blocks.{k}", unet), f"output_blocks.{k}")
    rows = []
    for info in sorted(block_table(unet).values(), key=lambda b: b.order):
        rows.append({
            "order": info.order,
            "name": info.name,
            "alias": aliases.get(info.name, ""),
            "channels": info.channels,
            "resolution": latent // info.downsample,
            "note": _note(info.name, unet, layers),
        })
    return rows


def _note(name: str, unet: UNet2DConditionModel, layers: int) -> str:
    if layer := LAYER.match(name):
        i, j = int(layer[1]), int(layer[2])
        if j == layers - 1 and unet.up_blocks[i].upsamplers is not None:
            return f"output_blocks.{i * layers + j} before its upsampler"
        return ""
    if block := BLOCK.match(name):
        i = int(block[1])
        if unet.up_blocks[i].upsamplers is not None:
            return "block output, after the 2x upsampler"
        return f"block output, same map as up{i}.{layers - 1}"
    return "middle block output"


def format_block_table(rows: list[dict]) -> str:
    """A plain aligned text table (no terminal codes), so it reads the same in a log file."""
    header = [title for _, title in COLUMNS]
    body = [[str(row[key]) for key, _ in COLUMNS] for row in rows]
    widths = [max(len(cell) for cell in column) for column in zip(header, *body, strict=True)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
             for line in (header, *body)]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def build_from_ldm_yaml(yaml_path: Path | str, seed: int = 0) -> Backbone:
    """The YAML's backbone with seeded random weights: its structure without the checkpoint."""
    configs = backbone_configs_from_yaml(read_ldm_yaml(yaml_path))
    preset = {part: configs[part] for part in ("unet", "first_stage", "projector")}
    backbone = build_random(preset, seed, f"{yaml_path} (random weights, seed={seed})")
    backbone.scheduler = DDPMScheduler(**configs["scheduler"])
    return backbone


@dataclass(frozen=True)
class PartConfigs:
    """Constructor arguments of a backbone's UNet and first stage, read without touching any weights."""

    unet: dict
    first_stage: dict | None  # None: a directory without first_stage/config.json (blocks can still be listed)
    first_stage_class: str = "VQModel"

    @property
    def latent_factor(self) -> int:
        levels = self.first_stage["block_out_channels"] if self.first_stage else [0, 0, 0]
        return _latent_factor(None, list(levels))

    def latent_channels(self, name: str) -> int:
        """z_0's channels, checked against what the UNet takes, so a mismatched backbone fails before any work."""
        if self.first_stage is None:
            raise PathsegError(f"backbone {name}: first_stage/config.json is missing; the latent shape is unknown")
        channels = latent_channels_of(self.first_stage)
        if int(self.unet["in_channels"]) != channels:
            raise PathsegError(
                f"backbone {name}: its first stage makes {channels}-channel latents but its UNet takes "
                f"{self.unet['in_channels']} channels; the two parts do not belong together"
            )
        return channels

    def tile_multiple(self) -> int:
        """Tiles must divide into whole latent pixels, then survive every UNet downsampling."""
        return self.latent_factor * 2 ** (len(self.unet["block_out_channels"]) - 1)


def part_configs(name: str, config_path: Path | str | None = None) -> PartConfigs:
    """For any backbone setting: a preset, a diffusers directory, a project YAML, or a `.ckpt` with its YAML."""
    from pathseg.extract.backbone import PAPER, TINY
    from pathseg.extract.backbone_sources import unet_config_for

    path = Path(name)
    yaml_path = None
    if path.suffix in (".yaml", ".yml"):
        yaml_path = path
    elif path.suffix == ".ckpt" and config_path is not None:
        yaml_path = Path(config_path)
    if yaml_path is not None:
        configs = backbone_configs_from_yaml(read_ldm_yaml(yaml_path))
        return PartConfigs(configs["unet"], configs["first_stage"])
    unet = _public(unet_config_for(name, Path(config_path) if config_path else None))
    presets = {"tiny": TINY, "paper-random": PAPER}
    if name in presets:
        return PartConfigs(unet, presets[name]["first_stage"])
    first_stage_file = path / "first_stage" / "config.json"
    if not first_stage_file.exists():
        return PartConfigs(unet, None)
    first_stage = json.loads(first_stage_file.read_text())
    return PartConfigs(unet, _public(first_stage), first_stage.get("_class_name", "VQModel"))


def _public(config: dict) -> dict:
    """A saved diffusers config minus its bookkeeping keys (`_class_name`, `_diffusers_version`...)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def describe_ldm_yaml(yaml_path: Path | str, tile_size: int = 256) -> list[dict]:
    """`describe_blocks` for a YAML in milliseconds: the UNet is built empty (meta device), no weights drawn."""
    return describe_backbone(str(yaml_path), None, tile_size)


def describe_backbone(name: str, config_path: Path | str | None = None, tile_size: int = 256) -> list[dict]:
    """`describe_blocks` for any backbone setting, built on the meta device: no weights are read or drawn.

    A project YAML alone (name is the YAML, or a `.ckpt` with its YAML) describes the original network;
    presets and diffusers directories are read from their configs.
    """
    parts = part_configs(name, config_path)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**parts.unet)
    return describe_blocks(unet, tile_size, latent_factor=parts.latent_factor)


CONTEXT_TOKENS = 2  # the SSL projector's patch and region tokens (also the null context's)


@dataclass(frozen=True)
class ComputeCost:
    """FLOPs of one tile (a multiply-add counts 2), as torch's FlopCounterMode counts convolutions and matmuls.

    Elementwise work (norms, activations) is not counted, so time per FLOP differs a little between the two
    networks; the counts still say how much of a first extraction no pipeline can avoid.
    """

    tile_size: int
    first_stage_flops: int  # once per tile in a store's life: z_0 is cached
    unet_flops: int  # one full forward, once per tile per timestep

    def first_extraction_flops(self, timesteps: int) -> int:
        return self.first_stage_flops + timesteps * self.unet_flops

    def unet_share(self, timesteps: int) -> float:
        """The best a first extraction can do against the bare UNet forwards alone, at equal FLOP rates."""
        return timesteps * self.unet_flops / self.first_extraction_flops(timesteps)

    def as_dict(self, timesteps: tuple[int, ...] = (1, 3, 10)) -> dict:
        return {
            "tile_size": self.tile_size,
            "first_stage_gflop": self.first_stage_flops / 1e9,
            "unet_gflop_per_timestep": self.unet_flops / 1e9,
            "unet_share_of_first_extraction": {str(t): self.unet_share(t) for t in timesteps},
        }


def compute_per_tile(name: str, config_path: Path | str | None = None, tile_size: int = 256) -> ComputeCost:
    """Count the encoder's and the UNet's FLOPs for one tile on the meta device: no weights, no arithmetic."""
    parts = part_configs(name, config_path)
    if parts.first_stage is None:
        raise PathsegError(f"backbone {name}: first_stage/config.json is missing, so the encoder cannot be counted")
    classes = {"VQModel": VQModel, "AutoencoderKL": AutoencoderKL}
    latent = tile_size // parts.latent_factor
    with torch.device("meta"), torch.inference_mode():
        first_stage = classes[parts.first_stage_class](**parts.first_stage)
        unet = UNet2DConditionModel(**parts.unet)
        images = torch.empty(1, first_stage.config.in_channels, tile_size, tile_size)
        latents = torch.empty(1, unet.config.in_channels, latent, latent)
        context = torch.empty(1, CONTEXT_TOKENS, unet.config.cross_attention_dim)
        with FlopCounterMode(display=False) as encoder_count:
            first_stage.encode(images)
        with FlopCounterMode(display=False) as unet_count:
            unet(latents, torch.zeros(1, dtype=torch.long), encoder_hidden_states=context)
    return ComputeCost(tile_size, encoder_count.get_total_flops(), unet_count.get_total_flops())


def format_compute_cost(cost: ComputeCost, timesteps: tuple[int, ...] = (1, 3, 10)) -> str:
    shares = ", ".join(f"{t} timestep{'s' if t > 1 else ''}: {100 * (1 - cost.unet_share(t)):.0f}%" for t in timesteps)
    return "\n".join([
        f"compute per {cost.tile_size} px tile (FLOPs counted on the meta device; a multiply-add is 2):",
        f"  first-stage encoder  {cost.first_stage_flops / 1e9:9.1f} GFLOP  once per tile (z_0 is cached in the store)",
        f"  UNet forward         {cost.unet_flops / 1e9:9.1f} GFLOP  once per tile per timestep",
        f"  encoder's share of a first extraction: {shares}",
    ])
