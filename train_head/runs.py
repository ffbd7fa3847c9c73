"""Run directories: which store, which features, which settings, and the trained head, side by side.

A run directory holds `run.json` (the resolved config, store path and fingerprint, timesteps,
blocks, seeds, best epoch), `head.safetensors`, and the per-epoch history as CSV and JSON, so any
number can be traced to exactly the cache and settings that produced it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pathseg.train_head.heads import DEFAULT_KIND, build_head, keyed_settings
from safetensors.torch import save_file
from torch import nn

from pathseg.config import PipelineConfig
from pathseg.data_files import read_json_object, read_safetensors
from pathseg.errors import PathsegError
from pathseg.store import Z0_BLOCK, Z0_PAIR, FeatureStore, digest, is_z0, store_path_for

RUN_SCHEMA = 1


def resolve_features(config: PipelineConfig, store: FeatureStore) -> list[tuple[int, str]]:
    """The head's (timestep, block) inputs: head.* when set, else everything extract.* asked for.

    Block aliases (output_blocks.K) resolve through the table the extraction recorded, since this
    stage never builds the backbone.
    """
    timesteps = config.head.timesteps or config.extract.timesteps
    names = config.head.blocks or config.extract.blocks
    pairs = feature_pairs(store, timesteps, names)
    store.require(pairs)
    return pairs


def canonical_blocks(store: FeatureStore, names: list[str]) -> list[str]:
    """Block names as the store records them; `z0` (the first-stage latent) is always a valid name."""
    aliases: dict[str, str] = store.attrs.get("block_aliases", {})
    blocks = []
    for name in names:
        name = name.strip().replace(" ", "")
        canonical = Z0_BLOCK if is_z0(name) else aliases.get(name, name)
        if aliases and not is_z0(canonical) and canonical not in aliases.values():
            valid = ", ".join([*dict.fromkeys(aliases.values()), Z0_BLOCK])
            raise PathsegError(f"unknown block {name!r} in head.blocks; valid blocks are: {valid}")
        blocks.append(canonical)
    return list(dict.fromkeys(blocks))


def feature_pairs(store: FeatureStore, timesteps: list[int], names: list[str]) -> list[tuple[int, str]]:
    """Every timestep x block, timestep-major; `z0` has no timestep, so it appears once, last."""
    blocks = canonical_blocks(store, names)
    pairs = [(int(t), b) for t in timesteps for b in blocks if not is_z0(b)]
    return pairs + [Z0_PAIR] if Z0_BLOCK in blocks else pairs


def extraction_identity(store: FeatureStore) -> dict:
    """What a head's inputs depend on, apart from which images were tiled: a head trained on one store scores
    another only where all of this agrees."""
    identity = store.attrs["identity"]
    return {
        "backbone": identity.get("backbone"),
        "conditioning": identity.get("conditioning"),
        "tiling": identity.get("tiling"),
        "noise_seed": identity.get("noise_seed"),
        "compute_precision": store.compute_precision,
        "class_names": store.class_names,
    }


def locate_store(config: PipelineConfig, explicit: Path | None = None) -> FeatureStore:
    path = Path(explicit) if explicit is not None else store_path_for(config)
    if not (path / "zarr.json").exists():
        raise PathsegError(
            f"no feature store at {path} for this config; run `pathseg extract` with the same config first "
            "(or pass --store)"
        )
    return FeatureStore.open(path)


LOADER_SPEED_SETTINGS = {"prefetch", "memory_budget", "loader_threads"}  # how fast, never what: not in a run key


def run_key(config: PipelineConfig, store: FeatureStore, pairs: list[tuple[int, str]]) -> str:
    return digest(
        {
            "store": store.fingerprint,
            "pairs": pairs,
            "head": keyed_settings(config.head),
            "train": {k: v for k, v in config.train.model_dump(mode="json").items() if k not in LOADER_SPEED_SETTINGS},
        }
    )


def default_run_dir(config: PipelineConfig, store: FeatureStore, pairs: list[tuple[int, str]]) -> Path:
    """runs/<store name>/<t...>_<blocks>_<key>: readable, and distinct for every ablation."""
    steps = "-".join(f"t{t}" for t in dict.fromkeys(t for t, b in pairs if not is_z0(b)))
    blocks = "-".join(dict.fromkeys(b for _, b in pairs))
    name = f"{steps}_{blocks}" if steps else blocks
    return Path(config.runs_dir) / store.path.stem / f"{name}_{run_key(config, store, pairs)[:8]}"


def save_head(head: nn.Module, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, str(tmp))
    os.replace(tmp, path)


@dataclass
class Run:
    directory: Path
    record: dict[str, Any]

    @property
    def pairs(self) -> list[tuple[int, str]]:
        return [(int(t), str(b)) for t, b in self.record["pairs"]]

    def build_head(self) -> nn.Module:
        """The run's head kind, untrained; a record without `head.kind` predates head kinds and is `conv`."""
        h = self.record["head"]
        return build_head(h.get("kind", DEFAULT_KIND), self.record["in_channels"], len(self.record["class_names"]), h)

    def load_head(self, device: torch.device | str = "cpu") -> nn.Module:
        head = self.build_head()
        weights = self.directory / "head.safetensors"
        if not weights.exists():
            raise PathsegError(f"{weights} is missing; the run did not finish, rerun `pathseg fit-head`")
        try:
            head.load_state_dict(read_safetensors(weights, "refit the head (`pathseg fit-head`)"))
        except RuntimeError as error:
            raise PathsegError(f"{weights}: the weights do not fit the head run.json describes "
                               f"({str(error).splitlines()[0]}); refit the head (`pathseg fit-head`)") from None
        return head.to(device).eval()


def load_run(directory: Path) -> Run:
    record_path = Path(directory) / "run.json"
    if not record_path.exists():
        raise PathsegError(
            f"{directory} is not a finished run (no run.json); pass a run directory of `pathseg fit-head`"
        )
    record = read_json_object(record_path, "refit the head (`pathseg fit-head`)")
    if record.get("schema") != RUN_SCHEMA:
        raise PathsegError(f"{record_path}: run schema {record.get('schema')} is not {RUN_SCHEMA}; refit the head")
    return Run(Path(directory), record)
