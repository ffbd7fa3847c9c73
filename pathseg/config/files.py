"""A pipeline config from its files: YAML (or the built-in defaults), dotted `--set` overrides, validation,
and the one-line errors that name the setting at fault.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from pathseg.config.sections import PRESET_BACKBONES, PipelineConfig
from pathseg.errors import PathsegError
from pathseg.loading.data_files import parse_yaml, read_yaml


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    keys = dotted.split(".")
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise PathsegError(f"override {dotted!r}: {key!r} is a value, not a section")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`section.key=value`, with the value read as YAML so lists and numbers keep their types."""
    if "=" not in text:
        raise PathsegError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    value = parse_yaml(raw, f"override {text!r}", "quote the value or fix its YAML") if raw else None
    return key.strip(), value


def _describe(error: ValidationError, source: str) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = "unknown key (check its spelling against pipeline.yaml)"
    more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    return f"{source}: setting {where!r}: {message}{more}"


def load_config(path: Path | None = None, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Read YAML (or the built-in defaults when no file), apply dotted overrides, validate everything."""
    tree: dict[str, Any] = {}
    source = "built-in defaults"
    if path is not None:
        source = str(path)
        if not Path(path).is_file():
            raise PathsegError(f"config file {path} does not exist; pass --config with a pipeline.yaml")
        loaded = read_yaml(path, "fix it against the shipped pipeline.yaml")
        if loaded is not None and not isinstance(loaded, dict):
            raise PathsegError(f"{path}: the top level must be a mapping of sections")
        tree = loaded or {}
    tree = copy.deepcopy(tree)
    for key, value in (overrides or {}).items():
        _set_dotted(tree, key, value)
    try:
        config = PipelineConfig.model_validate(tree)
    except ValidationError as error:
        where = ".".join(str(part) for part in error.errors()[0]["loc"])
        if any(where == key or where.startswith(f"{key}.") for key in overrides or {}):
            source = "command line"
        raise PathsegError(_describe(error, source)) from None
    return config


def config_to_dict(config: BaseModel) -> dict[str, Any]:
    return config.model_dump(mode="json")


def with_absolute_paths(config: PipelineConfig) -> PipelineConfig:
    """A copy whose file settings are absolute, as this process resolves them.

    For work that runs elsewhere (dask workers in another working directory or on another host with the same
    mounts): there, a relative `cache`, data root or backbone folder would mean another place.
    """
    absolute = config.model_copy(deep=True)

    def resolve(path: Path | None) -> Path | None:
        return None if path is None else Path(path).expanduser().resolve()

    absolute.cache_dir = resolve(config.cache_dir)
    absolute.runs_dir = resolve(config.runs_dir)
    absolute.dataset.root = resolve(config.dataset.root)
    if config.backbone.name not in PRESET_BACKBONES:
        absolute.backbone.name = str(resolve(Path(config.backbone.name)))
    absolute.backbone.config = resolve(config.backbone.config)
    c = absolute.conditioning
    c.encoder_weights = resolve(config.conditioning.encoder_weights)
    c.region_encoder_weights = resolve(config.conditioning.region_encoder_weights)
    return absolute
