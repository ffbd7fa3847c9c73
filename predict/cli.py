"""`pathseg predict` on the command line: a trained head on new images and slides.

Kept apart from `pathseg/cli.py` (which registers it) because its options are many and its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pathseg.cli_options import TrustCheckpointOption
from pathseg.errors import PathsegError
from pathseg.progress import say


def predict(
    run: Annotated[Path, typer.Argument(help="run directory of `pathseg fit-head`")],
    inputs: Annotated[list[str], typer.Argument(help="images and slides, folders of them, or globs")],
    out: Annotated[Path, typer.Option("--out", help="folder for the outputs (one subfolder per image)")],
    backbone: Annotated[
        str | None, typer.Option("--backbone", help="the run's backbone at another path (if it moved)")
    ] = None,
    mpp: Annotated[
        float | None, typer.Option("--mpp", help="microns per pixel of the images (default: the training mpp), "
                                                 "and level 0 of slides that record none (a slide's own wins)")
    ] = None,
    force_mpp: Annotated[
        bool, typer.Option("--force-mpp", help="slides: use --mpp even for slides that record their own")
    ] = False,
    device: Annotated[str | None, typer.Option("--device", help="auto, cpu, cuda, cuda:N")] = None,
    object_type: Annotated[
        str, typer.Option("--object-type", help="QuPath object type of the GeoJSON regions: annotation or detection")
    ] = "annotation",
    simplify: Annotated[
        float, typer.Option("--simplify", help="polygon simplification tolerance in px (0: exact pixel edges)")
    ] = 0.0,
    no_tissue_mask: Annotated[
        bool, typer.Option("--no-tissue-mask", help="slides: predict every tile, not only those with tissue")
    ] = False,
    tissue_threshold: Annotated[
        float | None, typer.Option("--tissue-threshold", help="slides: saturation (0-1) above which a thumbnail "
                                                              "pixel is tissue (default: Otsu's threshold)")
    ] = None,
    probabilities: Annotated[
        bool, typer.Option("--probabilities", help="also write per-class probabilities (float16 Zarr)")
    ] = False,
    workers: Annotated[
        int | None, typer.Option("--workers", help="local dask workers, one device each; an input per task")
    ] = None,
    scheduler: Annotated[
        str | None, typer.Option("--scheduler", help="address of a running dask scheduler to predict on")
    ] = None,
    trust_checkpoint: TrustCheckpointOption = False,
    trust_run: Annotated[
        bool, typer.Option("--trust-run", help="import the python: SSL encoder the run's record names (only for a "
                                               "run you trust: it runs that code)")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="predict again the inputs whose outputs in --out another run, head, "
                                               "backbone, input file or settings made (they are refused otherwise)")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")] = False,
) -> None:
    """Segment new images and slides with a trained head: label map, QuPath GeoJSON, overlay, per-class areas."""
    from pathseg.predict.command import predict_images

    if object_type not in ("annotation", "detection"):
        raise PathsegError(f"--object-type {object_type!r} is not annotation or detection")
    if simplify < 0:
        raise PathsegError(f"--simplify {simplify} is negative; give a tolerance in px, or 0")
    if workers is not None and workers < 1:
        raise PathsegError(f"--workers {workers}: give 1 or more")
    summary = predict_images(run, inputs, out, backbone=backbone, device=device, workers=workers or 1,
                             scheduler=scheduler, show_progress=not quiet, mpp=mpp, force_mpp=force_mpp,
                             object_type=object_type,
                             simplify=simplify, use_tissue_mask=not no_tissue_mask,
                             tissue_threshold=tissue_threshold, probabilities=probabilities,
                             trust_checkpoint=trust_checkpoint, trust_run=trust_run, overwrite=overwrite)
    if summary.written:
        from pathseg.predict.command import area_table

        print(area_table(summary.written))
    say(f"predicted {len(summary.written)} inputs into {out}" +
        (f" ({len(summary.skipped)} already done)" if summary.skipped else ""))
