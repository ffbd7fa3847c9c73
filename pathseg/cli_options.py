"""Command-line options and the flags -> config mapping shared by every command, and by the stage CLIs.

Lives apart from `pathseg/cli.py` so that `predict/` and `train_head/` command modules can use the same
options without importing the app that registers them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from pathseg.config import PipelineConfig, load_config, parse_override
from pathseg.errors import PathsegError

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config", "-c", help="pipeline.yaml to read (default: ./pipeline.yaml if present, else built-in defaults)"
    ),
]
SetOption = Annotated[
    list[str] | None, typer.Option("--set", help="override any setting: section.key=value (repeatable)")
]
DatasetOption = Annotated[str | None, typer.Option("--dataset", help="dataset name (synthetic, glas, ...)")]
DataRootOption = Annotated[Path | None, typer.Option("--data-root", help="folder holding the dataset's files")]
BackboneOption = Annotated[
    str | None, typer.Option("--backbone", help="tiny, paper-random, a diffusers directory or a .ckpt")
]
BackboneConfigOption = Annotated[
    Path | None, typer.Option("--backbone-config", help="the original LDM project YAML of a .ckpt")
]
TimestepsOption = Annotated[
    str | None, typer.Option("--timesteps", help="comma-separated noise timesteps, e.g. 50,150,250")
]
BlocksOption = Annotated[
    str | None, typer.Option("--blocks", help="comma-separated blocks, e.g. up1,up2.2 or output_blocks.5")
]
StoreOption = Annotated[
    Path | None, typer.Option("--store", help="feature store path (default: derived from the config)")
]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")]
TrustCheckpointOption = Annotated[
    bool,
    typer.Option(
        "--trust-checkpoint",
        help="unpickle .ckpt/.pth files in full, which runs any code they carry; only for files you trust "
        "(default: their tensors are read as data)",
    ),
]


def split_list(text: str | None, cast=str) -> list | None:
    if text is None:
        return None
    try:
        return [cast(part.strip()) for part in text.split(",") if part.strip()]
    except ValueError:
        raise PathsegError(f"{text!r} is not a comma-separated list of numbers") from None


def build_config(config: Path | None, sets: list[str] | None, **flags: Any) -> PipelineConfig:
    """Flags win over --set, which wins over the YAML file. A flag left at None (or an on/off flag left off, which
    callers pass as None) leaves the setting to them."""
    overrides: dict[str, Any] = dict(parse_override(item) for item in sets or [])
    if config is None and Path("pipeline.yaml").is_file():
        config = Path("pipeline.yaml")
    mapping = {
        "dataset": "dataset.name",
        "data_root": "dataset.root",
        "backbone": "backbone.name",
        "backbone_config": "backbone.config",
        "timesteps": "extract.timesteps",
        "blocks": "extract.blocks",
        "head_timesteps": "head.timesteps",
        "head_blocks": "head.blocks",
        "head_kind": "head.kind",
        "epochs": "train.epochs",
        "splits": "evaluate.splits",
        "workers": "extract.workers",
        "scheduler": "extract.scheduler",
        "ablate_timesteps": "ablate.timesteps",
        "ablate_blocks": "ablate.blocks",
        "ablate_grid": "ablate.grid",
        "ablate_seeds": "ablate.seeds",
        "ablate_baseline": "ablate.baseline",
        "ablate_select_on": "ablate.select_on",
        "ablate_baselines": "ablate.baselines",
        "ablate_baseline_epochs": "ablate.baseline_epochs",
        "encoders": "extract.encoders",
        "trust_checkpoint": "backbone.trust_checkpoint",
    }
    for flag, value in flags.items():
        if value is not None:
            overrides[mapping[flag]] = str(value) if isinstance(value, Path) else value
    return load_config(config, overrides)


HeadTimestepsOption = Annotated[
    str | None, typer.Option("--head-timesteps", help="subset of cached timesteps for the head")
]
HeadBlocksOption = Annotated[str | None, typer.Option("--head-blocks", help="subset of cached blocks for the head")]
RunDirOption = Annotated[
    Path | None, typer.Option("--run-dir", help="run directory (default: derived from the config)")
]
EpochsOption = Annotated[int | None, typer.Option("--epochs", help="training epochs")]
SplitsOption = Annotated[str | None, typer.Option("--splits", help="comma-separated splits to evaluate")]
