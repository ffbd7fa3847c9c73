"""`pathseg cache ls|info|verify`: what the stores under the cache hold, and whether they are sound.

Reads stores through `pathseg.store` and never writes one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from pathseg.cli_options import ConfigOption, QuietOption, SetOption, build_config
from pathseg.progress import say
from pathseg.store.integrity import store_info, verify_store

cache_app = typer.Typer(no_args_is_help=True, help="Inspect and check feature stores.")


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

    info = store_info(FeatureStore.open(store))
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
        report = verify_store(feature_store, check_values=not quick, progress=advance)
    if report["problems"]:
        for problem in report["problems"]:
            print(f"{store}: {problem}")
        raise typer.Exit(1)
    checked = "values not read (--quick)" if quick else f"{report['tiles_value_checked']} tile arrays read, all finite"
    print(f"{store}: OK ({report['arrays']} feature arrays complete, {feature_store.n_tiles} tiles; {checked})")
