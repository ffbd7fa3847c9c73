"""Which backbone a name means: a preset (`tiny`, `paper-random`), a diffusers-format directory, or an original
LDM checkpoint with its project YAML; and how each is identified without building it.

Apart from `backbone.py`, which defines the model, so that the checkpoint converter (which builds a
`Backbone`) and the model never import each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

from pathseg.extract.backbone import PAPER, TINY, Backbone, build_random, file_digest, load_backbone_dir

from pathseg.errors import PathsegError
from pathseg.loading.data_files import read_json_object


def load_backbone(name: str, config_path: Path | None = None, seed: int = 0, *,
                  trust_checkpoint: bool = False) -> Backbone:
    """`tiny`, `paper-random`, a diffusers-format directory, or an original `.ckpt` with its YAML.

    A `.ckpt` is read as data unless `trust_checkpoint` (see `pathseg.loading.checkpoints`); a directory's
    weights are safetensors, or `.bin` files that diffusers reads with torch's tensors-only loader.
    """
    if name == "tiny":
        return build_random(TINY, seed, f"tiny(seed={seed})")
    if name == "paper-random":
        return build_random(PAPER, seed, f"paper-random(seed={seed})")
    path = Path(name)
    if path.is_dir():
        return load_backbone_dir(path)
    if path.suffix == ".ckpt":
        from pathseg.extract.ldm_checkpoint import load_ldm_checkpoint

        if config_path is None:
            raise PathsegError(f"{path}: an original LDM checkpoint needs its project YAML (--backbone-config)")
        return load_ldm_checkpoint(path, config_path, trust_checkpoint=trust_checkpoint)
    _unknown_backbone(name)


def unet_config_for(name: str, config_path: Path | None = None) -> dict:
    """The UNet's constructor arguments without building it, so cached stores answer in seconds."""
    if name == "tiny":
        return TINY["unet"]
    if name == "paper-random":
        return PAPER["unet"]
    path = Path(name)
    if path.is_dir():
        config_file = path / "unet" / "config.json"
        if not config_file.exists():
            raise PathsegError(f"backbone directory {path} has no unet/config.json")
        return read_json_object(config_file, "re-make the backbone directory")
    if path.suffix == ".ckpt" and config_path is not None:
        from pathseg.extract.ldm_yaml import backbone_configs_from_yaml, read_ldm_yaml

        return backbone_configs_from_yaml(read_ldm_yaml(config_path))["unet"]
    _unknown_backbone(name)


def _unknown_backbone(name: str) -> NoReturn:
    raise PathsegError(
        f"backbone {name!r} is neither 'tiny', 'paper-random', a diffusers-format directory, "
        "nor an existing .ckpt file with --backbone-config"
    )


def backbone_fingerprint(name: str, config_path: Path | None = None, seed: int = 0) -> dict:
    """Identifies the weights from their files (or preset and seed) without building the model."""
    if name in ("tiny", "paper-random"):
        return {"preset": name, "seed": seed}
    path = Path(name)
    if path.is_dir():
        weights = [p for p in path.rglob("*") if p.suffix in {".safetensors", ".bin"}]
        return {"directory": str(path.resolve()), "weights_digest": file_digest(weights)}
    if path.suffix == ".ckpt" and path.is_file() and config_path is not None and Path(config_path).is_file():
        return {
            "checkpoint": str(path.resolve()),
            "weights_digest": file_digest([path]),
            "config_digest": file_digest([Path(config_path)]),
        }
    _unknown_backbone(name)
