"""What a store is: the key that names it, from the settings that decide its content, and the digests
and versions recorded in it. Readable without opening a store, loading data or building a backbone.
"""

from __future__ import annotations

import hashlib
import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
ENCODERS_ATTR = "encoders"  # the store's record of every encoder array: whose weights, and what it cost
ENCODER_COST_KEYS = ("seconds_per_tile", "device", "shared")  # how and how long, never what it computed


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def digest(value: Any) -> str:
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()


def software_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("pathseg", "torch", "diffusers", "zarr", "numcodecs", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "absent"
    return versions


def list_stores(cache_dir: Path) -> list[Path]:
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        return []
    return sorted(p for p in cache_dir.iterdir() if p.is_dir() and (p / "zarr.json").exists())


BACKBONE_PERMISSIONS = {"trust_checkpoint"}  # how a file may be read, not which weights: never part of a key


def store_key(config: Any) -> str:
    """A hash of the settings that decide a store's content, readable by stage 2 without data or weights.

    Timesteps and blocks are not in it: they are arrays inside one store, so adding one extends the
    store instead of starting another.
    """
    dataset = config.dataset.model_dump(mode="json")
    options = dataset.get(dataset["name"]) if isinstance(dataset.get(dataset["name"]), dict) else None
    if dataset["name"] == "folder" and options is not None:
        options = {k: v for k, v in options.items() if k != "mpp"}  # metadata for predict, not content
    root = str(Path(dataset["root"]).resolve()) if dataset["root"] else None
    key = {
        "schema": SCHEMA_VERSION,
        "dataset": {"name": dataset["name"], "root": root, "splits": dataset["splits"], "options": options},
        "backbone": config.backbone.model_dump(mode="json", exclude=BACKBONE_PERMISSIONS),
        "conditioning": config.conditioning.model_dump(mode="json"),
        "tiling": config.tiling.model_dump(mode="json"),
        "noise_seed": config.extract.noise_seed,
    }
    weights = recorded_weights_digest(config.backbone.name)
    if weights is not None:  # only pretrained directories: every other store keeps the key it had
        key["backbone_weights"] = weights
    return digest(key)


PRETRAIN_RECORD = "pretrain.json"  # written last by `pathseg pretrain`: its presence marks a finished backbone


def recorded_weights_digest(backbone: str) -> str | None:
    """The weights digest a pretrained backbone directory records, read without hashing its weights.

    A directory path alone does not identify weights: a second pretraining written to the same path
    must get a new store, not be refused as a fingerprint mismatch of the old one.
    """
    record = Path(backbone) / PRETRAIN_RECORD
    if not record.is_file():
        return None
    try:
        value = json.loads(record.read_text()).get("weights_digest")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def store_path_for(config: Any) -> Path:
    """`cache/<dataset>-<backbone>-<key>.zarr`: the name says what it holds, the key what exactly."""
    backbone = Path(config.backbone.name).name.removesuffix(".ckpt") or "backbone"
    return Path(config.cache_dir) / f"{config.dataset.name}-{backbone}-{store_key(config)[:12]}.zarr"


def encoder_identity(recorded: dict | None) -> dict | None:
    """What an encoder array's record says about its values (encoder, weights digest or random and seed,
    normalisation, layer), without how long it took: the part a head trained on it depends on."""
    if recorded is None:
        return None
    return {k: v for k, v in recorded.items() if k not in ENCODER_COST_KEYS}


def encoder_identities(attrs: dict, blocks: list[str]) -> dict[str, dict | None]:
    """`encoder_identity` of each of `blocks` that the store records (encoder arrays; other blocks are skipped)."""
    recorded = attrs.get(ENCODERS_ATTR, {})
    return {block: encoder_identity(recorded.get(block)) for block in blocks if block in recorded}
