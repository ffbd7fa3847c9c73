"""`pathseg ablate` on the command line: the grid from flags, sweeps from list-valued --set items."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pathseg.cli_options import (
    BackboneConfigOption,
    BackboneOption,
    ConfigOption,
    DataRootOption,
    DatasetOption,
    EpochsOption,
    QuietOption,
    SetOption,
    StoreOption,
    build_config,
    split_list,
)
from pathseg.config import parse_override


def ablate(
    config: ConfigOption = None,
    set_: SetOption = None,
    dataset: DatasetOption = None,
    data_root: DataRootOption = None,
    backbone: BackboneOption = None,
    backbone_config: BackboneConfigOption = None,
    timesteps: Annotated[
        str | None, typer.Option("--timesteps", help="cached timesteps to ablate, e.g. 50,150,250 (default: "
                                                     "ablate.timesteps, else extract.timesteps)")
    ] = None,
    blocks: Annotated[
        str | None, typer.Option("--blocks", help="cached blocks to ablate, e.g. up1,up2.2,up3.2; z0 is the "
                                                  "first-stage latent (default: ablate.blocks, else extract.blocks)")
    ] = None,
    grid: Annotated[
        str | None, typer.Option("--grid", help="each: every timestep x block alone; pairs: every two maps together; "
                                                "all: every map in one head")
    ] = None,
    seeds: Annotated[int | None, typer.Option("--seeds", help="head seeds per cell (train.seed, +1, ...)")] = None,
    baseline: Annotated[
        bool | None, typer.Option("--baseline/--no-baseline", help="add a cell on z0 alone (no diffusion)")
    ] = None,
    select_on: Annotated[
        str | None, typer.Option("--select-on", help="validation figure that chooses: miou, mean_dice, object_f1")
    ] = None,
    epochs: EpochsOption = None,
    store: StoreOption = None,
    out: Annotated[Path | None, typer.Option("--out", help="folder for the leaderboard and figures (default: "
                                                           "runs/<store>/ablate-<grid>-<key>)")] = None,
    quiet: QuietOption = False,
) -> None:
    """Train and score a grid of heads from one store: timesteps x blocks x head settings x seeds.

    Sweep any head/train setting with a list: --set head.kind=conv,linear --set train.lr=[0.001,0.002].
    Finished runs are reused, so an interrupted sweep resumes and a repeated one computes nothing.
    """
    from pathseg.train_head.ablate import run_ablation
    from pathseg.train_head.ablation_grid import split_sweep_overrides

    plain, swept = split_sweep_overrides(dict(parse_override(item) for item in set_ or []))
    sets = [f"{key}={_yaml(value)}" for key, value in plain.items()]
    cfg = build_config(
        config, sets, dataset=dataset, data_root=data_root, backbone=backbone, backbone_config=backbone_config,
        epochs=epochs, ablate_timesteps=split_list(timesteps, int), ablate_blocks=split_list(blocks), ablate_grid=grid,
        ablate_seeds=seeds, ablate_baseline=baseline, ablate_select_on=select_on,
    )
    run_ablation(cfg, swept=swept, store_path=store, out=out, show_progress=not quiet)


def _yaml(value: object) -> str:
    import json

    return json.dumps(value)  # JSON is YAML: the value goes back through the same parser unchanged
