"""`pathseg pretrain` on the command line: train a backbone from unlabelled tiles into a directory.

Kept apart from `pathseg/cli.py` (which registers it) because its options are its own; heavy imports
wait until the command runs, so `pathseg --help` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from pathseg.cli_options import ConfigOption, DataRootOption, DatasetOption, QuietOption, SetOption, build_config
from pathseg.progress import say


def _as_overrides(values: dict[str, object]) -> list[str]:
    """Flags as `--set` items, after the user's own so they win; JSON is YAML, so paths survive any characters."""
    return [f"{key}={json.dumps(str(value) if isinstance(value, Path) else value)}"
            for key, value in values.items() if value is not None]


def launch_local_processes(count: int) -> int:
    """This same command, without --processes, in `count` processes on this machine: what `torchrun --standalone
    --nproc_per_node count` does, through its own launcher, so a failed process ends in one line, not its traceback."""
    import logging
    import os
    import sys
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    argv, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == "--processes":
            skip = True
        elif not arg.startswith("--processes="):
            argv.append(arg)
    if "OMP_NUM_THREADS" not in os.environ:  # CPU processes share the cores instead of each taking them all
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // count))
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=count, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0)
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # failures are reported below
    try:
        elastic_launch(config, sys.executable)("-m", "pathseg.cli", *argv)
    except ChildFailedError as failed:
        rank, failure = failed.get_first_failure()
        say(f"pretraining stopped: process {rank} of {count} exited with code {failure.exitcode} (its error is above); "
            "once that is fixed, rerun the same command: a stopped run resumes from its last checkpoint")
        return 1
    return 0


def pretrain(
    out: Annotated[Path, typer.Option("--out", help="directory for the pretrained backbone (diffusers format)")],
    config: ConfigOption = None,
    set_: SetOption = None,
    dataset: DatasetOption = None,
    data_root: DataRootOption = None,
    slides: Annotated[
        Path | None, typer.Option("--slides", help="a folder of whole-slide images to pretrain on instead of a dataset")
    ] = None,
    mpp: Annotated[
        float | None, typer.Option("--mpp", help="slides: level-0 microns per pixel of slides that record none")
    ] = None,
    force_mpp: Annotated[
        bool, typer.Option("--force-mpp", help="slides: use --mpp even for slides that record their own")
    ] = False,
    preset: Annotated[str | None, typer.Option("--preset", help="model size: tiny | small | paper")] = None,
    steps: Annotated[
        int | None, typer.Option("--steps", help="optimiser steps of both phases together (pretrain.steps)")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="pretrain --out afresh: replace the finished backbone there (even one of these "
                                "settings) or a checkpoint made with other settings")
    ] = False,
    processes: Annotated[
        int | None, typer.Option("--processes", min=1, help="data-parallel processes started here (torchrun "
                                                           "--standalone); one per GPU, or CPU processes")
    ] = None,
    quiet: QuietOption = False,
) -> None:
    """Pretrain a backbone: the first-stage autoencoder, then the conditioned UNet, on unlabelled tiles.

    Under torchrun (`torchrun --nproc_per_node 4 -m pathseg.cli pretrain ...`) each process trains on its part of
    every batch; --processes N starts N such processes on this machine for you.
    """
    import os

    if processes is not None and processes > 1 and "WORLD_SIZE" not in os.environ:  # not already under torchrun
        raise typer.Exit(launch_local_processes(processes))
    from pathseg.pretrain.command import run_pretraining

    flags = {"pretrain.preset": preset, "pretrain.steps": steps, "pretrain.slides": slides,
             "pretrain.level0_mpp": mpp, "pretrain.force_level0_mpp": force_mpp or None}
    cfg = build_config(config, [*(set_ or []), *_as_overrides(flags)], dataset=dataset, data_root=data_root)
    summary = run_pretraining(cfg, out, overwrite=overwrite, show_progress=not quiet)
    if not summary.main:  # another process of a torchrun: rank 0 reports
        return
    record = summary.record
    if summary.already_done:
        say(f"{out} already holds this pretraining (record {out / 'pretrain.json'}): nothing to do; add --overwrite "
            "to train it again from scratch")
        return
    losses = record["final_losses"]
    rates = record["steps_per_second"]
    origin = record.get("first_stage_from")
    first_stage = (f"the first stage of {origin['path']}" if origin else
                   f"{record['steps']['first_stage']} first-stage steps (loss {losses['first_stage']:.4g}, "
                   f"{rates['first_stage'] or 0:.2f} steps/s)")
    say(
        f"wrote {out}: {record['preset']} backbone, {first_stage} + {record['steps']['unet']} "
        f"UNet steps (loss {losses['unet']:.4g}, {rates['unet'] or 0:.2f} steps/s) on {record['data']['tiles']} "
        f"tiles; use it with `pathseg extract --backbone {out}`"
    )
