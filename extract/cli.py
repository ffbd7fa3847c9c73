"""Stage 1 on the command line: `pathseg extract`, `pathseg convert-ldm` and `pathseg backbone info`.

`pathseg/cli.py` registers these; the work itself is imported inside each command, so listing the commands
(or running another one) never builds a model.
"""

from __future__ import annotations

import json
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
    QuietOption,
    SetOption,
    StoreOption,
    TimestepsOption,
    TrustCheckpointOption,
    build_config,
    split_list,
)
from pathseg.errors import PathsegError
from pathseg.progress import say

backbone_app = typer.Typer(no_args_is_help=True, help="Inspect backbones.")


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
    encoders: Annotated[
        str | None, typer.Option("--encoders", help="frozen encoders whose patch-token maps to add as enc:<name>: "
                                                    "hipt_vit_s16, timm:<arch>, python:module:factory (weights: "
                                                    "--set extract.encoder_weights.<name>=PATH or random)")
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
        encoders=split_list(encoders),
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
