"""`pathseg` on the command line: parse flags into config overrides, call one function per command.

Every user error surfaces as one line on stderr and exit code 2, never as a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from pathseg.cli_options import (
    BackboneConfigOption,
    BackboneOption,
    BlocksOption,
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
    TimestepsOption,
    TrustCheckpointOption,
    build_config,
    split_list,
)
from pathseg.errors import PathsegError
from pathseg.predict.cli import predict
from pathseg.pretrain.cli import pretrain
from pathseg.progress import console, say
from pathseg.train_head.ablate_cli import ablate
from pathseg.train_head.heads import check_kind, head_kinds

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Segment H&E histology with a frozen diffusion backbone's cached features (PathSegDiff).",
)
cache_app = typer.Typer(no_args_is_help=True, help="Inspect and check feature stores.")
backbone_app = typer.Typer(no_args_is_help=True, help="Inspect backbones.")
app.add_typer(cache_app, name="cache")
app.add_typer(backbone_app, name="backbone")

def _fail(message: str) -> None:
    console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True, markup=True)
    sys.exit(2)


@app.command()
def extract(
    config: ConfigOption = None,
    set_: SetOption = None,
    dataset: DatasetOption = None,
    data_root: DataRootOption = None,
    backbone: BackboneOption = None,
    backbone_config: BackboneConfigOption = None,
    timesteps: TimestepsOption = None,
    blocks: BlocksOption = None,
    store: StoreOption = None,
    overwrite: Annotated[bool, typer.Option(help="replace a store made from other data or weights")] = False,
    workers: Annotated[
        int | None, typer.Option("--workers", help="local dask workers, one device each (cuda:0, cuda:1, ...)")
    ] = None,
    scheduler: Annotated[
        str | None, typer.Option("--scheduler", help="address of a running dask scheduler to extract on")
    ] = None,
    trust_checkpoint: TrustCheckpointOption = False,
    quiet: QuietOption = False,
) -> None:
    """Stage 1: run the backbone over every tile once and cache decoder features in a Zarr store."""
    from pathseg.extract.runner import run_extraction

    cfg = build_config(
        config,
        set_,
        dataset=dataset,
        data_root=data_root,
        backbone=backbone,
        backbone_config=backbone_config,
        timesteps=split_list(timesteps, int),
        blocks=split_list(blocks),
        workers=workers,
        scheduler=scheduler,
        trust_checkpoint=trust_checkpoint or None,
    )
    summary = run_extraction(cfg, overwrite=overwrite, show_progress=not quiet, store_path=store)
    if summary.nothing_to_do:
        say(f"store {summary.store} already holds everything asked: nothing to compute")
    else:
        say(
            f"wrote {summary.store}: {summary.prepared_images} images, {summary.computed_tiles} tiles x "
            f"{len(summary.computed_arrays)} arrays in {summary.seconds:.1f} s"
        )


HeadKindOption = Annotated[str | None, typer.Option("--head-kind", help=f"head kind: {' | '.join(head_kinds())}")]


@app.command("fit-head")
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


@app.command()
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


@app.command("run")
def run_all(
    config: ConfigOption = None,
    set_: SetOption = None,
    dataset: DatasetOption = None,
    data_root: DataRootOption = None,
    backbone: BackboneOption = None,
    backbone_config: BackboneConfigOption = None,
    timesteps: TimestepsOption = None,
    blocks: BlocksOption = None,
    epochs: EpochsOption = None,
    overwrite: Annotated[bool, typer.Option(help="replace a store made from other data or weights")] = False,
    trust_checkpoint: TrustCheckpointOption = False,
    quiet: QuietOption = False,
) -> None:
    """extract, fit-head and evaluate in one go, from one config."""
    from pathseg.extract.runner import run_extraction
    from pathseg.train_head.evaluate import evaluate_run
    from pathseg.train_head.fit import fit_head

    cfg = build_config(
        config,
        set_,
        dataset=dataset,
        data_root=data_root,
        backbone=backbone,
        backbone_config=backbone_config,
        timesteps=split_list(timesteps, int),
        blocks=split_list(blocks),
        epochs=epochs,
        trust_checkpoint=trust_checkpoint or None,
    )
    check_kind(cfg.head.kind)  # before the extraction, not after it
    summary = run_extraction(cfg, overwrite=overwrite, show_progress=not quiet)
    computed = "cached" if summary.nothing_to_do else f"{summary.computed_tiles} tiles computed"
    say(f"features: {summary.store} ({computed})")
    result = fit_head(cfg, store_path=summary.store, show_progress=not quiet)
    evaluate_run(cfg, result.run_dir, show_progress=not quiet)


@cache_app.command("ls")
def cache_ls(config: ConfigOption = None, set_: SetOption = None) -> None:
    """List the stores under the cache directory."""
    from pathseg.reports import store_list_table
    from pathseg.store import list_stores

    cfg = build_config(config, set_)
    stores = list_stores(cfg.cache_dir)
    if not stores:
        say(f"no feature stores under {cfg.cache_dir}")
        return
    print(store_list_table(stores))


@cache_app.command("info")
def cache_info(
    store: Annotated[Path, typer.Argument(help="path of a feature store")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """What a store holds: arrays, shapes, bytes on disk, compression ratio, completeness."""
    from pathseg.reports import store_info_text
    from pathseg.store import FeatureStore

    info = FeatureStore.open(store).info()
    print(json.dumps(info, indent=2) if as_json else store_info_text(info))


@cache_app.command("verify")
def cache_verify(
    store: Annotated[Path, typer.Argument(help="path of a feature store")],
    quick: Annotated[bool, typer.Option("--quick", help="skip reading every value for NaN/Inf")] = False,
    quiet: QuietOption = False,
) -> None:
    """Check a store: completeness, shapes and dtypes against its attrs, NaN/Inf, and its fingerprint."""
    from pathseg.progress import progress_bar
    from pathseg.store import FeatureStore

    feature_store = FeatureStore.open(store)
    arrays = len(feature_store.feature_infos())
    with progress_bar("verify", arrays, "arrays", not quiet and not quick) as advance:
        report = feature_store.verify(check_values=not quick, progress=advance)
    if report["problems"]:
        for problem in report["problems"]:
            print(f"{store}: {problem}")
        raise typer.Exit(1)
    checked = "values not read (--quick)" if quick else f"{report['tiles_value_checked']} tile arrays read, all finite"
    print(f"{store}: OK ({report['arrays']} feature arrays complete, {feature_store.n_tiles} tiles; {checked})")


@backbone_app.command("info")
def backbone_info(
    backbone: Annotated[
        str, typer.Option("--backbone", help="tiny, paper-random, a diffusers directory, a .ckpt or a project YAML")
    ] = "tiny",
    backbone_config: BackboneConfigOption = None,
    tile_size: Annotated[int, typer.Option("--tile-size", help="tile side in px the sizes are given for")] = 256,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """Every extractable decoder block (name, output_blocks alias, channels, map size), and FLOPs per tile."""
    from pathseg.extract.backbone_info import (
        compute_per_tile,
        describe_backbone,
        format_block_table,
        format_compute_cost,
    )

    rows = describe_backbone(backbone, backbone_config, tile_size)
    try:
        cost = compute_per_tile(backbone, backbone_config, tile_size)
    except PathsegError as error:  # blocks are still worth listing without a first-stage config
        cost, missing = None, str(error)
    if as_json:
        print(json.dumps({"blocks": rows, "compute": cost.as_dict() if cost else None}, indent=2))
        return
    print(format_block_table(rows))
    print()
    print(format_compute_cost(cost) if cost else f"compute per tile not counted: {missing}")


@app.command("convert-ldm")
def convert_ldm_command(
    ckpt: Annotated[Path, typer.Option("--ckpt", help="the original Lightning checkpoint (.ckpt)")],
    config: Annotated[Path, typer.Option("--config", help="its project YAML (e.g. configs/.../only_ssl.yaml)")],
    out: Annotated[Path, typer.Option("--out", help="new directory for the diffusers-format backbone")],
    ignore_prefix: Annotated[
        list[str] | None, typer.Option("--ignore-prefix", help="extra training-only key prefix to skip (repeatable)")
    ] = None,
    trust_checkpoint: TrustCheckpointOption = False,
) -> None:
    """Convert an original SSL-conditioned LDM checkpoint into a diffusers-format backbone directory."""
    from pathseg.extract.ldm_checkpoint import convert_ldm

    report = convert_ldm(ckpt, config, out, ignore_prefixes=ignore_prefix or [], trust_checkpoint=trust_checkpoint)
    ignored = sum(entry["count"] for entry in report["ignored"].values())
    say(
        f"wrote {out}: {report['used_total']} tensors converted, {ignored} ignored "
        f"({', '.join(report['ignored']) or 'none'}), {len(report['schedule_buffers_checked'])} schedule buffers "
        f"checked; details in {out / 'conversion_report.json'}"
    )


app.command("predict")(predict)
app.command("ablate")(ablate)
app.command("pretrain")(pretrain)


def main() -> None:
    try:
        code = app(standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except PathsegError as error:
        _fail(str(error))
    except KeyboardInterrupt:
        say("interrupted: finished shards are kept; rerun the same command to resume")
        sys.exit(130)
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except SystemExit:
        raise
    except Exception as error:
        # usage errors (unknown option, bad value) from typer's bundled click
        if hasattr(error, "show") and hasattr(error, "exit_code"):
            error.show()
            sys.exit(error.exit_code)
        raise


if __name__ == "__main__":
    main()
