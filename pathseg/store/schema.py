"""What a feature store's attrs (its root `zarr.json`) must look like, checked whenever a store is opened.

Stores travel between people and machines, so their attrs are input like any other file: a value of the
wrong type, a negative size or an image id such as `../../x` (evaluation names overlay files after image
ids and splits) must fail in one line when the store is opened, not as a traceback deep in stage 2 or as
a file written outside the run directory. Only the layout module (`feature_store.py`) calls this.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pathseg.errors import PathsegError
from pathseg.loading.data_files import escapes_folder

BLOCK_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*(\.[0-9]+)?$")  # up1, up2.2, mid, z0: one zarr path segment each
# enc:timm:vit_small_patch16_224@3, enc:python:lab.models:uni: its array is encoders/<safe_name>, one segment
ENCODER_NAME = re.compile(r"^enc:[A-Za-z0-9_][A-Za-z0-9_.:@+-]*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


def _plain_name(value: str) -> str:
    if escapes_folder(value):
        raise ValueError(f"{value!r} is not a plain name (it would leave its folder as a file name)")
    return value


class ImageRow(_Strict):
    model_config = ConfigDict(extra="forbid", strict=True)

    id: str
    split: str
    height: int = Field(ge=1)
    width: int = Field(ge=1)
    pad_top: int = Field(ge=0)
    pad_left: int = Field(ge=0)
    rows: int = Field(ge=1)
    cols: int = Field(ge=1)
    first_tile: int = Field(ge=0)

    _names = field_validator("id", "split")(_plain_name)


class FeatureRow(_Strict):
    model_config = ConfigDict(extra="forbid", strict=True)

    timestep: int = Field(ge=-1, le=999)
    block: str
    channels: int = Field(ge=1)
    height: int = Field(ge=1)
    width: int = Field(ge=1)
    dtype: Literal["float16", "float32"] = "float16"

    @field_validator("block")
    @classmethod
    def _block_name(cls, value: str) -> str:
        if not (BLOCK_NAME.match(value) or ENCODER_NAME.match(value)):
            raise ValueError(f"{value!r} is not a block name")
        return value


class StoreAttrs(_Strict):
    schema_version: int
    fingerprint: str
    identity: dict[str, Any]
    config: dict[str, Any]
    class_names: list[str] = Field(min_length=1, max_length=255)
    ignore_index: int | None = Field(None, ge=0, le=255)
    tile_size: int = Field(ge=1)
    stride: int = Field(ge=1)
    has_instances: bool
    compression_level: int = Field(ge=1, le=22)
    tiles_per_shard: int = Field(ge=1)
    images: list[ImageRow]
    features: dict[str, FeatureRow]
    compute_precision: Literal["float32", "bfloat16", "float16"] | None = None
    block_aliases: dict[str, str] = {}


def check_store_attrs(path: Any, attrs: dict, feature_key) -> None:
    """Raise one line naming the store and the first bad attr; `feature_key(t, block)` is the store's own naming."""
    try:
        parsed = StoreAttrs.model_validate(attrs)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "top level"
        raise PathsegError(f"{path}: its attrs (zarr.json) are damaged or edited: {where}: {first['msg']}; "
                           "re-extract the store with --overwrite") from None
    problem = _consistency(parsed, feature_key)
    if problem:
        raise PathsegError(f"{path}: its attrs (zarr.json) are damaged or edited: {problem}; re-extract the store "
                           "with --overwrite")


def _consistency(attrs: StoreAttrs, feature_key) -> str | None:
    """Relations between attrs that types alone do not catch; each would misplace tiles or read outside arrays."""
    next_tile = 0
    for row in attrs.images:
        if row.first_tile != next_tile:
            return f"image {row.id!r} starts at tile {row.first_tile}, not {next_tile}"
        next_tile += row.rows * row.cols
    ids = [row.id for row in attrs.images]
    if len(set(ids)) != len(ids):
        return "two images share an id"
    for key, row in attrs.features.items():
        if key != feature_key(row.timestep, row.block):
            return f"features entry {key!r} describes t={row.timestep} {row.block}"
    return None
