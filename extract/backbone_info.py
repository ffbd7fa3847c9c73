"""What `pathseg backbone info` prints: every extractable decoder block with its channels and map size.

Choosing blocks is the main storage decision (feature volume grows with channels x size^2), and papers
name layers by the original `output_blocks[k]` numbering, so the table shows both names and flags the
one place they disagree: `output_blocks[k]` at the end of a level includes the 2x upsampler.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from pathseg.extract.backbone import Backbone, FirstStage, build_random
from pathseg.extract.blocks import BLOCK, LAYER, block_table, canonical_block
from pathseg.extract.ldm_checkpoint import backbone_configs_from_yaml, read_ldm_yaml

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


def describe_ldm_yaml(yaml_path: Path | str, tile_size: int = 256) -> list[dict]:
    """`describe_blocks` for a YAML in milliseconds: the UNet is built empty (meta device), no weights drawn."""
    configs = backbone_configs_from_yaml(read_ldm_yaml(yaml_path))
    with torch.device("meta"):
        unet = UNet2DConditionModel(**configs["unet"])
    factor = _latent_factor(None, configs["first_stage"]["block_out_channels"])
    return describe_blocks(unet, tile_size, latent_factor=factor)


def describe_backbone(name: str, config_path: Path | str | None = None, tile_size: int = 256) -> list[dict]:
    """`describe_blocks` for any backbone setting, built on the meta device: no weights are read or drawn.

    A project YAML alone (name is the YAML, or a `.ckpt` with its YAML) describes the original network;
    presets and diffusers directories are read from their configs.
    """
    from pathseg.extract.backbone import PAPER, TINY, unet_config_for

    path = Path(name)
    if path.suffix in (".yaml", ".yml"):
        return describe_ldm_yaml(path, tile_size)
    if path.suffix == ".ckpt" and config_path is not None:
        return describe_ldm_yaml(config_path, tile_size)
    unet_config = unet_config_for(name, Path(config_path) if config_path else None)
    presets = {"tiny": TINY, "paper-random": PAPER}
    if name in presets:
        first_levels = presets[name]["first_stage"]["block_out_channels"]
    else:
        first_stage_config = path / "first_stage" / "config.json"
        first_levels = json.loads(first_stage_config.read_text())["block_out_channels"] if first_stage_config.exists() \
            else [0, 0, 0]
    unet_config = {k: v for k, v in unet_config.items() if not k.startswith("_")}
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
    return describe_blocks(unet, tile_size, latent_factor=_latent_factor(None, list(first_levels)))
