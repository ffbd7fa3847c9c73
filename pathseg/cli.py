"""`pathseg` on the command line: the stages' own commands, assembled into one app.

Each stage owns its commands (`extract/cli.py`, `train_head/cli.py`, `predict/cli.py`, `pretrain/cli.py`,
and `cache_cli.py` for the stores); this module registers them, runs `run` (all three stages in a row),
and turns every user error into one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from pathseg.cache_cli import cache_app
from pathseg.cli_options import (
    BackboneConfigOption,
    BackboneOption,
    BlocksOption,
    ConfigOption,
    DataRootOption,
    DatasetOption,
    EpochsOption,
    QuietOption,
    SetOption,
    TimestepsOption,
    TrustCheckpointOption,
    build_config,
    split_list,
)
from pathseg.errors import PathsegError, ReportedElsewhere
from pathseg.extract.cli import backbone_app, convert_ldm_command, extract
from pathseg.predict.cli import predict
from pathseg.pretrain.cli import pretrain
from pathseg.progress import console, say
from pathseg.train_head.cli import ablate, evaluate, fit_head_command
from pathseg.train_head.heads import check_kind

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Segment H&E histology with a frozen diffusion backbone's cached features (PathSegDiff).",
)
app.command("extract")(extract)
app.command("fit-head")(fit_head_command)
app.command("evaluate")(evaluate)
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


app.command("convert-ldm")(convert_ldm_command)
app.command("predict")(predict)
app.command("ablate")(ablate)
app.command("pretrain")(pretrain)
app.add_typer(cache_app, name="cache")
app.add_typer(backbone_app, name="backbone")


def _fail(message: str) -> None:
    console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True, markup=True)
    sys.exit(2)


def main() -> None:
    try:
        code = app(standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except ReportedElsewhere:
        sys.exit(2)
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
