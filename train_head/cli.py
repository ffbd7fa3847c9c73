"""Stage 2 on the command line: `pathseg fit-head`, `pathseg evaluate` and `pathseg ablate`.

`ablate` builds its grid from flags, and sweeps from list-valued --set items. `pathseg/cli.py` registers
these; training and scoring code is imported inside each command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from pathseg.train_head.heads import check_kind, head_kinds

from pathseg.cli_options import (
    BackboneConfigOption,
    BackboneOption,
    ConfigOption,
    DataRootOption,
    DatasetOption,
    EpochsOption,
    HeadBlocksOption,
    HeadTimestepsOption,
    QuietOption,
    RunDirOption,
    SetOption,
    SplitsOption,
    StoreOption,
    build_config,
    split_list,
)
from pathseg.config import parse_override
from pathseg.errors import PathsegError

HeadKindOption = Annotated[str | None, typer.Option("--head-kind", help=f"head kind: {' | '.join(head_kinds())}")]


def fit_head_command(
    config: ConfigOption = None,
    set_: SetOption = None,
    dataset: DatasetOption = None,
    data_root: DataRootOption = None,
    backbone: BackboneOption = None,
    backbone_config: BackboneConfigOption = None,
    head_timesteps: HeadTimestepsOption = None,
    head_blocks: HeadBlocksOption = None,
    head_kind: HeadKindOption = None,
    epochs: EpochsOption = None,
    store: StoreOption = None,
    run_dir: RunDirOption = None,
    quiet: QuietOption = False,
) -> None:
    """Stage 2: train a segmentation head from the cached features alone."""
    from pathseg.train_head.fit import fit_head

    cfg = build_config(
        config,
        set_,
        dataset=dataset,
        data_root=data_root,
        backbone=backbone,
        backbone_config=backbone_config,
        head_timesteps=split_list(head_timesteps, int),
        head_blocks=split_list(head_blocks),
        head_kind=head_kind,
        epochs=epochs,
    )
    check_kind(cfg.head.kind)  # --head-kind, --set or the YAML: refused before a store is opened or a run made
    fit_head(cfg, store_path=store, run_dir=run_dir, show_progress=not quiet)


RUN_FIXED_SECTIONS = ("dataset", "backbone", "conditioning", "tiling", "extract", "head")  # a run fixes these
ScoredStoreOption = Annotated[
    Path | None, typer.Option("--store", help="feature store to score (default: the run's own; another store must be "
                                              "extracted the same way)")
]


def evaluate(
    run: Annotated[
        Path | None, typer.Argument(help="run directory of `pathseg fit-head` (default: from the config)")
    ] = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    dataset: DatasetOption = None,
    data_root: DataRootOption = None,
    backbone: BackboneOption = None,
    backbone_config: BackboneConfigOption = None,
    head_timesteps: HeadTimestepsOption = None,
    head_blocks: HeadBlocksOption = None,
    splits: SplitsOption = None,
    store: ScoredStoreOption = None,
    quiet: QuietOption = False,
) -> None:
    """Stitch tile predictions into whole images and report pixel and object metrics."""
    from pathseg.train_head.evaluate import evaluate_run
    from pathseg.train_head.runs import default_run_dir, locate_store, resolve_features

    selectors = {"--dataset": dataset, "--data-root": data_root, "--backbone": backbone,
                 "--backbone-config": backbone_config, "--head-timesteps": head_timesteps, "--head-blocks": head_blocks}
    given = [flag for flag, value in selectors.items() if value is not None]
    given += [f"--set {item.split('=', 1)[0]}" for item in set_ or []
              if item.split("=", 1)[0].strip().split(".")[0] in RUN_FIXED_SECTIONS]
    if run is not None and given:
        raise PathsegError(
            f"{', '.join(given)} pick which run to score, but RUN {run} is given and fixes its features and data; "
            "drop them, or pass --store to score RUN on another store extracted the same way"
        )
    cfg = build_config(
        config,
        set_,
        dataset=dataset,
        data_root=data_root,
        backbone=backbone,
        backbone_config=backbone_config,
        head_timesteps=split_list(head_timesteps, int),
        head_blocks=split_list(head_blocks),
        splits=split_list(splits),
    )
    if run is None:
        feature_store = locate_store(cfg, store)
        run = default_run_dir(cfg, feature_store, resolve_features(cfg, feature_store))
    evaluate_run(cfg, run, store_path=store, show_progress=not quiet)


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
    baselines: Annotated[
        str | None, typer.Option("--baselines", help="rows beside the diffusion cells: z0, enc:<encoder> and rgb under "
                                                     "the same head; unet-resnet18, fcn8-vgg16 trained on the pixels")
    ] = None,
    baseline_epochs: Annotated[
        str | None, typer.Option("--baseline-epochs", help="epochs of unet-resnet18 / fcn8-vgg16 (default: --epochs): "
                                                           "N for both, or per network: unet-resnet18=4,fcn8-vgg16=1")
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
        ablate_baselines=split_list(baselines), ablate_baseline_epochs=parse_baseline_epochs(baseline_epochs),
    )
    run_ablation(cfg, swept=swept, store_path=store, out=out, show_progress=not quiet)


def parse_baseline_epochs(text: str | None) -> int | dict[str, int] | None:
    """`4` for every supervised network, or `unet-resnet18=4,fcn8-vgg16=1` (a bare number sets the others)."""
    if text is None:
        return None
    budgets: dict[str, int] = {}
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            kind, _, count = part.rpartition("=")
            budgets[kind.strip()] = int(count)
    except ValueError:
        raise PathsegError(f"--baseline-epochs {text!r}: give N or NETWORK=N[,NETWORK=N]") from None
    if set(budgets) == {""}:
        return budgets[""]
    if "" in budgets:
        from pathseg.train_head.heads import PIXEL_ONLY_KINDS

        default = budgets.pop("")
        budgets = {kind: default for kind in sorted(PIXEL_ONLY_KINDS)} | budgets
    return budgets


def _yaml(value: object) -> str:
    import json

    return json.dumps(value)  # JSON is YAML: the value goes back through the same parser unchanged
