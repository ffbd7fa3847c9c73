"""The cells of an ablation: which feature maps each head sees, crossed with head/train settings and seeds.

A cell is one configuration (feature maps + settings); each of its seeds is one fit-head run. Everything
here is decided before any training, so a missing array or a bad setting is refused before the first
minute of compute.
"""

from __future__ import annotations

import itertools
import typing
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from pathseg.config import HeadConfig, InstancesConfig, PipelineConfig, TrainConfig
from pathseg.errors import PathsegError
from pathseg.store import Z0_PAIR, FeatureStore, is_z0, pair_label
from pathseg.store.names import ENCODER_PREFIX, ENCODER_TIMESTEP, RGB_BLOCK, has_timestep, is_encoder, is_rgb

# instances.* change how a head's output becomes objects, not the head: cells that differ only there share runs
SWEEPABLE_SECTIONS: dict[str, type[BaseModel]] = {"head": HeadConfig, "train": TrainConfig,
                                                  "instances": InstancesConfig}
GRID_FIXED = {"head.timesteps", "head.blocks", "train.seed"}  # set by the grid, --timesteps/--blocks and --seeds
SPLIT_SETTINGS = {"train.train_split", "train.val_split"}  # one for the whole sweep: no cell trains/chooses on test


@dataclass(frozen=True)
class Cell:
    pairs: tuple[tuple[int, str], ...]  # the feature maps the head sees
    settings: tuple[tuple[str, Any], ...] = ()  # swept head.*/train.* values, as (dotted key, value)
    # `rgb`: the head on the tile's pixels; a pixels-only kind (unet-resnet18, fcn8-vgg16): that network instead
    # of the head; "" for a cell of stored maps
    baseline: str = ""

    @property
    def features(self) -> str:
        return self.baseline or " + ".join(pair_label(t, b) for t, b in self.pairs)

    @property
    def key(self) -> list:
        """What the ablation's folder key holds of the cell (cells without `baseline` as they always were)."""
        return [list(self.pairs), list(self.settings), *([self.baseline] if self.baseline else [])]

    @property
    def name(self) -> str:
        swept = ", ".join(f"{key}={value}" for key, value in self.settings)
        return f"{self.features} [{swept}]" if swept else self.features

    @property
    def single(self) -> tuple[int, str] | None:
        """The one map of a cell that has one (what the heatmap and line plot place)."""
        return self.pairs[0] if len(self.pairs) == 1 else None


@dataclass
class AblationPlan:
    timesteps: list[int]
    blocks: list[str]  # canonical names, without z0
    grid: str
    seeds: list[int]
    sweep: dict[str, list[Any]]
    cells: list[Cell] = field(default_factory=list)

    @property
    def runs(self) -> int:
        return len(self.cells) * len(self.seeds)


def _is_list_field(section: type[BaseModel], name: str) -> bool:
    annotation = section.model_fields[name].annotation
    return any(typing.get_origin(arg) is list for arg in (annotation, *typing.get_args(annotation)))


def sweep_axes(config: PipelineConfig, swept: dict[str, Any]) -> dict[str, list[Any]]:
    """head.*/train.* settings with several values: config `ablate.sweep` plus list-valued --set items.

    Every value is validated now (by building the config it makes), so a typo fails before training starts.
    """
    axes: dict[str, list[Any]] = {}
    for key, values in {**config.ablate.sweep, **swept}.items():
        section_name, _, name = key.partition(".")
        section = SWEEPABLE_SECTIONS.get(section_name)
        if section is None or name not in section.model_fields:
            raise PathsegError(f"ablate sweep {key!r}: only head.*, train.* and instances.* settings can be swept "
                               f"(the store fixes the rest)")
        if key in GRID_FIXED:
            raise PathsegError(f"ablate sweep {key!r}: set by the grid; use --timesteps, --blocks or --seeds")
        if key in SPLIT_SETTINGS:
            raise PathsegError(f"ablate sweep {key!r}: the splits are the same for every cell (a cell must not train "
                               f"or be chosen on a test split); give one value, e.g. --set {key}=NAME")
        if not isinstance(values, list) or not values:
            raise PathsegError(f"ablate sweep {key!r}: give a list of values, e.g. {key}=[a, b]")
        axes[key] = list(dict.fromkeys(values)) if all(isinstance(v, str | int | float) for v in values) else values
        for value in axes[key]:
            try:
                current = getattr(config, section_name)
                current.model_validate({**current.model_dump(), name: value})
            except Exception as error:  # noqa: BLE001 - pydantic's message, shortened to one line
                first = str(error).splitlines()
                raise PathsegError(f"ablate sweep {key}={value!r}: {first[-1].strip() if first else error}") from None
    return axes


def split_sweep_overrides(overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """--set items that list several values for a one-value head/train setting become sweep axes.

    `head.kind=conv,linear` and `head.kind=[conv, linear]` both sweep; `train.lr=0.001` is a plain override.
    """
    plain, swept = {}, {}
    for key, value in overrides.items():
        section_name, _, name = key.partition(".")
        section = SWEEPABLE_SECTIONS.get(section_name)
        if key in GRID_FIXED:
            raise PathsegError(f"--set {key}: ablate sets it for every cell; use --timesteps, --blocks or --seeds")
        if section is None or name not in section.model_fields:
            plain[key] = value
            continue
        is_list = _is_list_field(section, name)
        if isinstance(value, str) and "," in value and not is_list:
            swept[key] = [_scalar(part.strip()) for part in value.split(",") if part.strip()]
        elif isinstance(value, list) and (not is_list or (value and all(isinstance(v, list) for v in value))):
            swept[key] = value
        else:
            plain[key] = value
    return plain, swept


def _scalar(text: str) -> Any:
    from pathseg.loading.settings_yaml import load_settings_yaml

    return load_settings_yaml(text)


def feature_cells(maps: list[tuple[int, str]], grid: str, baseline: bool) -> list[tuple[tuple[int, str], ...]]:
    """`each`: every map alone; `pairs`: every two maps together; `all`: all maps in one head.

    With `baseline`, z0 alone is added: the first-stage latent, i.e. the same head without diffusion.
    """
    if grid == "each":
        cells = [(pair,) for pair in maps]
    elif grid == "pairs":
        cells = list(itertools.combinations(maps, 2)) if len(maps) > 1 else [tuple(maps)]
    else:
        cells = [tuple(maps)]
    if baseline and (Z0_PAIR,) not in cells:
        cells.append((Z0_PAIR,))
    return cells


def plan_ablation(config: PipelineConfig, store: FeatureStore, swept: dict[str, Any]) -> AblationPlan:
    """Cells x seeds, after checking that the store holds every map the cells read."""
    from pathseg.train_head.heads import check_kind
    from pathseg.train_head.runs import canonical_blocks

    a = config.ablate
    timesteps = [int(t) for t in (a.timesteps or config.extract.timesteps)]
    names = canonical_blocks(store, a.blocks or config.extract.blocks)
    blocks = [b for b in names if has_timestep(b) and not is_rgb(b)]
    maps = [(t, b) for t in timesteps for b in blocks]
    baseline = a.baseline or any(is_z0(b) for b in names)
    if not maps and not baseline:
        raise PathsegError("ablate has no feature maps: give --timesteps and --blocks (or ablate.timesteps/blocks)")
    require_maps(store, maps + ([Z0_PAIR] if baseline else []))
    axes = sweep_axes(config, swept)
    for kind in axes.get("head.kind", [config.head.kind]):
        check_kind(kind)  # the registry knows the kinds; the config only holds a name
    combos = [tuple(zip(axes, values, strict=True)) for values in itertools.product(*axes.values())] or [()]
    cells = [Cell(pairs, combo) for pairs in feature_cells(maps, a.grid, baseline) for combo in combos]
    named = [b for b in names if is_encoder(b) or is_rgb(b)]  # --blocks enc:x or rgb: rows of their own
    cells += baseline_cells(store, [*named, *a.baselines], combos, cells)
    check_baseline_epochs(a.baseline_epochs)
    seeds = [config.train.seed + i for i in range(a.seeds)]
    return AblationPlan(timesteps, blocks, a.grid, seeds, axes, cells)


def baseline_cells(store: FeatureStore, names: list[str], combos: list[tuple], cells: list[Cell]) -> list[Cell]:
    """`ablate.baselines` as cells: z0, encoders and rgb under every swept head setting, as the diffusion cells;
    a supervised network once per setting it reads (head.kind is its own, so a kind sweep does not repeat it)."""
    from pathseg.train_head.heads import PIXEL_ONLY_KINDS

    out: list[Cell] = []
    for raw in dict.fromkeys(name.strip() for name in names if name.strip()):
        if raw in PIXEL_ONLY_KINDS:
            settings = dict.fromkeys(tuple((k, v) for k, v in combo if k != "head.kind") for combo in combos)
            new = [Cell((), combo, raw) for combo in settings]
        elif is_rgb(raw):
            new = [Cell((), combo, RGB_BLOCK) for combo in combos]
        elif is_z0(raw) or is_encoder(raw):
            pair = Z0_PAIR if is_z0(raw) else (ENCODER_TIMESTEP, raw)
            require_maps(store, [pair])
            new = [Cell((pair,), combo) for combo in combos]
        else:
            kinds = ", ".join(sorted(PIXEL_ONLY_KINDS))
            raise PathsegError(f"ablate.baselines: {raw!r} is not z0, rgb, enc:<encoder> or one of {kinds}")
        out += [cell for cell in new if cell not in cells and cell not in out]
    return out


def check_baseline_epochs(epochs: int | dict[str, int] | None) -> None:
    from pathseg.train_head.heads import PIXEL_ONLY_KINDS

    unknown = sorted(set(epochs) - set(PIXEL_ONLY_KINDS)) if isinstance(epochs, dict) else []
    if unknown:
        kinds = ", ".join(sorted(PIXEL_ONLY_KINDS))
        raise PathsegError(f"ablate.baseline_epochs: {', '.join(unknown)} is not a supervised network ({kinds})")


def require_maps(store: FeatureStore, pairs: list[tuple[int, str]]) -> None:
    """Refuse up front, in one line that says exactly what to extract."""
    if not store.image_done().all():
        raise PathsegError(f"{store.path}: images are not all written (an extraction stopped); rerun `pathseg extract`")
    missing = [(t, b) for t, b in pairs if not store.is_complete(t, b)]
    if not missing:
        return
    if any(is_z0(b) for _, b in missing):
        raise PathsegError(f"{store.path} has no complete first-stage latents (z0); rerun `pathseg extract` with the "
                           "same config, or pass --no-baseline")
    encoders = [b[len(ENCODER_PREFIX):] for _, b in missing if is_encoder(b)]
    if encoders:
        raise PathsegError(f"{store.path} lacks complete encoder maps of {', '.join(encoders)}; run `pathseg extract "
                           f"--encoders {','.join(encoders)}` with the same config first")
    steps = ",".join(str(t) for t in dict.fromkeys(t for t, _ in missing))
    blocks = ",".join(dict.fromkeys(b for _, b in missing))
    listed = ", ".join(pair_label(t, b) for t, b in missing)
    raise PathsegError(f"{store.path} lacks {listed}; run `pathseg extract --timesteps {steps} --blocks {blocks}` "
                       "with the same config first")


def run_config(config: PipelineConfig, cell: Cell, seed: int) -> PipelineConfig:
    """The full config of one run: the cell's maps and settings and the seed, on top of the user's config.

    head.timesteps/blocks record the cell's maps; a `pairs` cell (t50 up1 + t150 up2.2) is not a full
    timestep x block product, so fit-head is also handed the exact pairs.
    """
    overrides: dict[str, Any] = {key: value for key, value in cell.settings}
    maps = [(t, b) for t, b in cell.pairs if has_timestep(b)]
    overrides["head.timesteps"] = list(dict.fromkeys(t for t, _ in maps)) or None
    overrides["head.blocks"] = list(dict.fromkeys(b for _, b in cell.pairs)) or [RGB_BLOCK]
    overrides["train.seed"] = seed
    if cell.baseline and not is_rgb(cell.baseline):  # a supervised network: its kind, and its epoch budget
        overrides["head.kind"] = cell.baseline
        overrides["train.epochs"] = config.ablate.epochs_of(cell.baseline, config.train.epochs)
    tree = config.model_dump(mode="python")
    for key, value in overrides.items():
        section, name = key.split(".", 1)
        tree[section][name] = value
    return PipelineConfig.model_validate(tree)

