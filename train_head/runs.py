"""Run directories: which store, which features, which settings, and the trained head, side by side.

A run directory holds `run.json` (the resolved config, store path and fingerprint, timesteps,
blocks, seeds, best epoch, and the sha256 of its head), `head.safetensors`, and the per-epoch history as
CSV and JSON, so any number can be traced to exactly the cache and settings that produced it. fit-head
writes a run into a hidden sibling folder and swaps it in whole when it is done, and a head is only ever
loaded after its bytes are checked against the digest its record holds: a record and a head from two
different fits are never used together.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pathseg.train_head.heads import (
    DEFAULT_KIND,
    PIXEL_KINDS,
    PIXEL_ONLY_KINDS,
    build_head,
    keyed_settings,
    takes_pixels,
)
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file
from torch import nn

from pathseg.config import PipelineConfig
from pathseg.errors import PathsegError
from pathseg.loading.data_files import read_json_object
from pathseg.store import Z0_PAIR, FeatureStore, digest, store_path_for
from pathseg.store.identity import encoder_identities
from pathseg.store.names import (
    ENCODER_TIMESTEP,
    RGB_BLOCK,
    Z0_BLOCK,
    has_timestep,
    is_encoder,
    is_rgb,
    safe_name,
)

RUN_SCHEMA = 2  # 2: run.json holds head_sha256, the digest of the head.safetensors it describes
HEAD_FILE = "head.safetensors"
RUN_FILES = ("run.json", HEAD_FILE, "history.json", "history.csv")  # what makes a folder a run directory


def resolve_features(config: PipelineConfig, store: FeatureStore) -> list[tuple[int, str]]:
    """The head's stored (timestep, block) inputs: head.* when set, else everything extract.* asked for.

    Block aliases (output_blocks.K) resolve through the table the extraction recorded, since this
    stage never builds the backbone. `rgb` names no stored array (see `takes_pixels`), and a pixels-only kind
    (the supervised baselines) has no stored inputs at all.
    """
    names = config.head.blocks or config.extract.blocks
    if config.head.kind in PIXEL_ONLY_KINDS:
        others = [name for name in config.head.blocks or [] if name.strip() != RGB_BLOCK]
        if others:
            raise PathsegError(f"head.kind {config.head.kind} trains on the tile's pixels alone, but head.blocks "
                               f"names {', '.join(others)}; set head.blocks to rgb (or leave it unset)")
        return []
    timesteps = config.head.timesteps or config.extract.timesteps
    pairs = feature_pairs(store, timesteps, names)
    if not pairs and not takes_pixels(config.head.kind, names):
        raise PathsegError("head.blocks selects no feature map; name at least one block, z0, enc:<encoder> or rgb")
    store.require(pairs)
    return pairs


def run_takes_pixels(config: PipelineConfig) -> bool:
    """Whether the run's head is given the tile's pixels (a pixel kind, or `rgb` among its blocks)."""
    return takes_pixels(config.head.kind, config.head.blocks or config.extract.blocks)


def canonical_blocks(store: FeatureStore, names: list[str]) -> list[str]:
    """Block names as the store records them; `z0`, `rgb` and `enc:<encoder>` are valid by their own names
    (whether the store holds an encoder's map is `require`'s to say)."""
    aliases: dict[str, str] = store.attrs.get("block_aliases", {})
    blocks = []
    for name in names:
        name = name.strip().replace(" ", "")
        canonical = name if not has_timestep(name) or is_rgb(name) else aliases.get(name, name)
        if aliases and has_timestep(canonical) and not is_rgb(canonical) and canonical not in aliases.values():
            valid = ", ".join([*dict.fromkeys(aliases.values()), Z0_BLOCK, RGB_BLOCK, "enc:<encoder>"])
            raise PathsegError(f"unknown block {name!r} in head.blocks; valid blocks are: {valid}")
        blocks.append(canonical)
    return list(dict.fromkeys(blocks))


def feature_pairs(store: FeatureStore, timesteps: list[int], names: list[str]) -> list[tuple[int, str]]:
    """Every timestep x UNet block, timestep-major; maps without a timestep (encoders, then z0) appear once, last;
    `rgb` is no stored map and is left out."""
    blocks = canonical_blocks(store, names)
    pairs = [(int(t), b) for t in timesteps for b in blocks if has_timestep(b) and not is_rgb(b)]
    pairs += [(ENCODER_TIMESTEP, b) for b in blocks if is_encoder(b)]
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
EVALUATE_REPORT_ONLY = {"splits", "overlays", "min_object_area"}  # what evaluate reports; fit-head never reads them
# How fit-head picks the epoch it keeps. Part of the key, so a change of the rule here never reuses heads that
# an older rule kept; change the text whenever the rule changes.
EPOCH_SELECTION = "val mIoU of whole stitched images (else lowest train loss)"


def run_key(config: PipelineConfig, store: FeatureStore, pairs: list[tuple[int, str]]) -> str:
    """Everything that decides which head a run keeps: the features, the head, training, and how the epoch is
    chosen (`evaluate.blend` stitches the val images it is chosen on). Settings are in unless listed as not
    changing the head, so a new setting is keyed until someone shows it changes nothing."""
    return digest(
        {
            "store": store.fingerprint,
            "pairs": pairs,
            # encoder arrays are outside the store's fingerprint: their weights key the run instead
            **({"encoders": ids} if (ids := encoder_identities(store.attrs, [b for _, b in pairs])) else {}),
            **({"pixels": True} if run_takes_pixels(config) and config.head.kind not in PIXEL_KINDS else {}),
            "head": keyed_settings(config.head),
            "train": {k: v for k, v in config.train.model_dump(mode="json").items() if k not in LOADER_SPEED_SETTINGS},
            "selection": {
                "rule": EPOCH_SELECTION,
                **{k: v for k, v in config.evaluate.model_dump(mode="json").items() if k not in EVALUATE_REPORT_ONLY},
            },
        }
    )


def default_run_dir(config: PipelineConfig, store: FeatureStore, pairs: list[tuple[int, str]]) -> Path:
    """runs/<store name>/<t...>_<blocks>_<key>: readable, and distinct for every ablation."""
    steps = "-".join(f"t{t}" for t in dict.fromkeys(t for t, b in pairs if has_timestep(b)))
    names = [*dict.fromkeys(b for _, b in pairs)]
    if config.head.kind in PIXEL_ONLY_KINDS:
        names = [config.head.kind]
    elif run_takes_pixels(config) and config.head.kind not in PIXEL_KINDS:
        names.append(RGB_BLOCK)
    blocks = safe_name("-".join(names))
    name = f"{steps}_{blocks}" if steps else blocks
    return Path(config.runs_dir) / store.path.stem / f"{name}_{run_key(config, store, pairs)[:8]}"


def save_head(head: nn.Module, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, str(tmp))
    os.replace(tmp, path)


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def staging_dir(run_dir: Path) -> Path:
    """A fresh hidden folder beside `run_dir` (same file system, so the swap is a rename) that a fit writes
    into; refuses a `run_dir` that holds files but is no run, since publishing replaces the folder whole."""
    if run_dir.exists() and not run_dir.is_dir():
        raise PathsegError(f"run directory {run_dir} is a file; pass --run-dir a folder")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not any((run_dir / name).exists() for name in RUN_FILES):
        raise PathsegError(f"{run_dir} holds files but is not a fit-head run (no run.json or {HEAD_FILE}); a fit "
                           "replaces its run directory whole, so pass --run-dir a new folder or a run directory")
    staged = run_dir.with_name(f".{run_dir.name}.fitting-{uuid.uuid4().hex[:8]}")
    staged.mkdir(parents=True)  # not mkdtemp: its 0700 would become the run directory's mode
    return staged


def publish_run(staged: Path, run_dir: Path) -> None:
    """Swap a finished run in for `run_dir`: two renames, each moving a complete run (record and head together).

    Killed before them, `run_dir` is the old run, untouched; between them, there is no `run_dir` (evaluate says
    the run did not finish). The old run's eval/ folders leave with it: they scored the old head.
    """
    if run_dir.exists():
        retired = run_dir.with_name(f".{run_dir.name}.replaced-{uuid.uuid4().hex[:8]}")
        os.replace(run_dir, retired)
        try:
            os.replace(staged, run_dir)
        except OSError:
            os.replace(retired, run_dir)  # another fit published first: keep a whole run there, not none
            raise
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staged, run_dir)


@dataclass
class Run:
    directory: Path
    record: dict[str, Any]

    @property
    def pairs(self) -> list[tuple[int, str]]:
        return [(int(t), str(b)) for t, b in self.record["pairs"]]

    def build_head(self) -> nn.Module:
        """The run's head kind, untrained; a record without `head.kind` predates head kinds and is `conv`."""
        h = {**self.record["head"], "imagenet_weights": None}  # head.safetensors holds every weight it trained
        return build_head(h.get("kind", DEFAULT_KIND), self.record["in_channels"], len(self.record["class_names"]), h,
                          pixels=bool(self.record.get("pixels", False)))

    def head_bytes(self) -> bytes:
        """head.safetensors, once its sha256 is the one run.json holds: a head from another fit (a re-fit that
        was stopped, a copied file) would be scored as if these settings had trained and chosen it. A record
        built in memory without a digest (tests, old-record conversions) is not checked; `load_run` refuses one
        read from disk."""
        weights = self.directory / HEAD_FILE
        if not weights.exists():
            raise PathsegError(f"{weights} is missing; the run did not finish, rerun `pathseg fit-head`")
        data = weights.read_bytes()
        expected = self.record.get("head_sha256")
        if expected is not None and hashlib.sha256(data).hexdigest() != expected:
            raise PathsegError(f"{weights} is not the head {self.directory / 'run.json'} describes (sha256 differs: a "
                               f"fit was stopped or the file replaced); re-run `pathseg fit-head` for {self.directory}")
        return data

    def load_head(self, device: torch.device | str = "cpu") -> nn.Module:
        head = self.build_head()
        weights = self.directory / HEAD_FILE
        try:
            tensors = load_safetensors_bytes(self.head_bytes())
        except (SafetensorError, ValueError, RuntimeError) as error:
            raise PathsegError(f"{weights}: not a readable safetensors file ({str(error).splitlines()[0]}); "
                               "refit the head (`pathseg fit-head`)") from None
        try:
            head.load_state_dict(tensors)
        except RuntimeError as error:
            raise PathsegError(f"{weights}: the weights do not fit the head run.json describes "
                               f"({str(error).splitlines()[0]}); refit the head (`pathseg fit-head`)") from None
        return head.to(device).eval()


def load_run(directory: Path) -> Run:
    """A finished run's record; its head is checked against the record's digest when it is loaded."""
    record_path = Path(directory) / "run.json"
    if not record_path.exists():
        raise PathsegError(
            f"{directory} is not a finished run (no run.json); pass a run directory of `pathseg fit-head`"
        )
    record = read_json_object(record_path, "refit the head (`pathseg fit-head`)")
    if record.get("schema") == 1:
        raise PathsegError(f"{record_path} predates head digests (run schema 1), so nothing shows {HEAD_FILE} is the "
                           f"head it describes; re-run `pathseg fit-head` for {directory}")
    if record.get("schema") != RUN_SCHEMA:
        raise PathsegError(f"{record_path}: run schema {record.get('schema')} is not {RUN_SCHEMA}; refit the head")
    sha = record.get("head_sha256")
    if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
        raise PathsegError(f"{record_path}: head_sha256 is missing or not a sha256; re-run `pathseg fit-head` for "
                           f"{directory}")
    return Run(Path(directory), record)
