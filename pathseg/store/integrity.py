"""Checking and describing a feature store: `pathseg cache verify` and `pathseg cache info`.

Part of the store's code (it reads the layout `feature_store.py` defines), kept apart because it reads
everything and writes nothing.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import zarr

from pathseg.errors import PathsegError
from pathseg.store.disk import bytes_under, error_reason, read_array, shard_file, shard_lost, tile_span
from pathseg.store.feature_arrays import FeatureInfo
from pathseg.store.feature_store import FeatureStore
from pathseg.store.identity import digest
from pathseg.store.names import feature_key


def verify_store(store: FeatureStore, check_values: bool = True, progress=None) -> dict:
    """Everything that can be wrong with a store, as a list of one-line problems (empty: sound).

    Checks the fingerprint against the recorded identity and config, the tile and image tables,
    every feature array's shape, dtype and chunking against the attrs, completeness flags (values 0/1, and
    a non-empty shard file behind every flag), and (with `check_values`) decodes every chunk of every array,
    which checks each chunk's checksum, and looks for NaN/Inf in every finished shard.
    """
    problems: list[str] = []
    attrs = store.attrs
    _check_identity(attrs, problems)
    _check_tables(store, check_values, problems)
    registry = dict(attrs.get("features", {}))
    z0 = _checked(problems, store, lambda: store.member("latents/z0"))
    if isinstance(z0, zarr.Array) and z0.ndim == 4:
        registry["latents/z0"] = {"timestep": -1, "block": "z0", "channels": z0.shape[1], "height": z0.shape[2],
                                  "width": z0.shape[3], "dtype": "float32"}
    checked = nonfinite_total = 0
    for key, row in sorted(registry.items()):
        tiles, nonfinite = _check_features(store, key, FeatureInfo(**row), check_values, problems)
        checked, nonfinite_total = checked + tiles, nonfinite_total + nonfinite
        if progress is not None and key != "latents/z0":  # the caller counts the feature arrays of the attrs
            progress(1)
    for stray in sorted(_present_features(store, problems) - set(registry)):
        problems.append(f"features/{stray} is not recorded in the store's attrs (left by an interrupted run?)")
    return {"path": str(store.path), "problems": problems, "arrays": len(registry),
            "tiles_value_checked": checked, "nonfinite_tiles": nonfinite_total}


def _check_identity(attrs: dict, problems: list[str]) -> None:
    identity, config = attrs.get("identity", {}), attrs.get("config", {})
    if digest(identity) != attrs.get("fingerprint"):
        problems.append("fingerprint does not match the recorded identity")
    recorded = {
        "tiling": (identity.get("tiling"), config.get("tiling")),
        "noise seed": (identity.get("noise_seed"), config.get("extract", {}).get("noise_seed")),
        "backbone": (identity.get("backbone", {}).get("name"), config.get("backbone", {}).get("name")),
        "conditioning mode": (identity.get("conditioning", {}).get("mode"),
                              config.get("conditioning", {}).get("mode")),
    }
    for what, (in_identity, in_config) in recorded.items():
        if in_identity != in_config:
            problems.append(f"{what} in the fingerprint ({in_identity}) differs from the recorded config "
                            f"({in_config})")


def _check_tables(store: FeatureStore, check_values: bool, problems: list[str]) -> None:
    """The tile tables, the per-tile labels and every written image (pixels, labels, instances)."""
    n, size = store.n_tiles, store.tile_size
    tables = (("tiles/image", (n,), "int32"), ("tiles/origin", (n, 2), "int32"), ("tiles/labels", (n, size, size),
                                                                                  "uint8"))
    for key, shape, dtype in tables:
        array = _checked(problems, store, lambda k=key: store.member(k))
        if array is False:
            continue
        if not isinstance(array, zarr.Array) or tuple(array.shape) != shape or str(array.dtype) != dtype:
            found = "missing" if array is None else f"{getattr(array, 'shape', '?')} {getattr(array, 'dtype', '')}"
            problems.append(f"{key} is {found}, expected {shape} {dtype}")
        elif check_values:
            _checked(problems, store, lambda a=array: read_array(a))
    image_done = _checked(problems, store, lambda: store.image_done())
    if image_done is False:
        image_done = np.zeros(len(store.images), dtype=bool)
    unwritten = int((~image_done).sum())
    if unwritten:
        problems.append(f"{unwritten} of {len(store.images)} images not written (rerun `pathseg extract`)")
    parts = (store.image_rgb, store.image_labels, store.image_instances)
    for index in np.flatnonzero(image_done):
        if check_values:
            _checked(problems, store, lambda i=int(index): [part(i) for part in parts])
        else:
            _checked(problems, store, lambda i=int(index): store._image_array(i, "rgb"))


def _check_features(store: FeatureStore, key: str, info: FeatureInfo, check_values: bool,
                    problems: list[str]) -> tuple[int, int]:
    """One feature array (or z0): shape, chunking, flags, shard files, and decoded values. (tiles read, NaN tiles)"""
    name = key if key == "latents/z0" else f"features/{key}"
    array = _checked(problems, store, lambda: store.member(name))
    flags = _checked(problems, store, lambda: store.member("done/latents" if key == "latents/z0" else f"done/{key}"))
    expected = (store.n_tiles, info.channels, info.height, info.width)
    if array is False or flags is False:
        return 0, 0
    if not isinstance(array, zarr.Array) or not isinstance(flags, zarr.Array):
        problems.append(f"{name}: recorded in attrs but its array or done flags are missing")
        return 0, 0
    if tuple(array.shape) != expected or str(array.dtype) != info.dtype:
        problems.append(f"{name} is {tuple(array.shape)} {array.dtype}, attrs say {expected} {info.dtype}")
        return 0, 0
    if tuple(array.chunks) != (1, *expected[1:]) or tuple(flags.shape) != (store.n_shards,):
        problems.append(f"{name}: chunking or done flags differ from one tile per chunk, "
                        f"{store.tiles_per_shard} tiles per shard")
        return 0, 0
    done = _checked(problems, store, lambda: store._flags(flags.path))
    if done is False:
        return 0, 0
    if not done.all():
        problems.append(f"{name}: {int((~done).sum())} of {len(done)} shards missing "
                        "(rerun `pathseg extract` to finish them)")
    lost = [int(s) for s in np.flatnonzero(done) if shard_lost(shard_file(store.path, name, int(s), 4))]
    if lost:
        problems.append(f"{name}: shards {_shown(lost)} are flagged done but their files are gone or empty")
    if not check_values:
        return 0, 0
    readable = done.copy()
    readable[lost] = False
    bad, unreadable = _nonfinite_tiles(store, array, readable)
    problems.extend(f"{name}: shard {shard} {reason}" for shard, reason in unreadable)
    if bad:
        problems.append(f"{name}: {len(bad)} tiles hold NaN or Inf (tiles {_shown(bad)})")
    return int(sum(store.shard_range(s)[1] - store.shard_range(s)[0] for s in np.flatnonzero(readable))), len(bad)


def _present_features(store: FeatureStore, problems: list[str]) -> set[str]:
    """`t0050/up1` & co. found under features/, whatever the attrs say."""
    features = _checked(problems, store, lambda: store.member("features"))
    if not isinstance(features, zarr.Group):
        return set()
    try:
        return {f"{t.basename}/{a}" for t in _children(features) for a in _names(t)}
    except Exception as error:  # a member's metadata does not parse: zarr raises whatever its parser meets
        problems.append(f"features/ holds unreadable metadata ({error_reason(error)})")
        return set()


def _checked(problems: list[str], store: FeatureStore, read):
    """`read()`, or False with its one-line reason appended to `problems` (a damaged chunk, flag array or array
    metadata): the store's path, which `cache verify` prints already, and the advice after the first `; ` left out."""
    try:
        return read()
    except PathsegError as error:
        problems.append(str(error).removeprefix(f"{store.path}: ").split("; ")[0])
        return False


def _shown(items: list[int]) -> str:
    return ", ".join(str(t) for t in items[:5]) + (" ..." if len(items) > 5 else "")


def _nonfinite_tiles(store: FeatureStore, array: zarr.Array, done: np.ndarray) -> tuple[list[int], list[tuple]]:
    """Finished tiles holding NaN/Inf, and (shard, reason) for shards that do not decode; shards read in parallel."""

    def scan(shard: int) -> tuple[np.ndarray, str | None]:
        start, stop = store.shard_range(shard)
        try:
            values = np.asarray(array[start:stop])
        except Exception as error:  # any decoding failure is damage on disk, reported rather than raised
            reason = f"({tile_span(start, stop - 1)}) cannot be read ({error_reason(error)})"
            return np.array([], dtype=np.int64), reason
        finite = np.isfinite(values).reshape(len(values), -1).all(axis=1)
        return start + np.flatnonzero(~finite), None

    shards = np.flatnonzero(done).tolist()
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        results = list(pool.map(scan, shards))
    bad = [int(t) for tiles, _ in results for t in tiles]
    unreadable = [(shard, reason) for shard, (_, reason) in zip(shards, results, strict=True) if reason]
    return bad, unreadable

# ---- reporting -----------------------------------------------------------------------------


def store_info(store: FeatureStore) -> dict:
    """What is cached, its size on disk, compression ratio and completeness."""
    rows = []
    for info in store.feature_infos():
        key = feature_key(info.timestep, info.block)
        array = store.feature_array(info.timestep, info.block)
        stored = bytes_under(store.path / "features" / key)
        raw = int(np.prod(array.shape)) * array.dtype.itemsize
        missing = len(store.missing_shards(info.timestep, info.block))
        rows.append(
            {
                "timestep": info.timestep,
                "block": info.block,
                "shape": list(array.shape),
                "dtype": str(array.dtype),
                "bytes_on_disk": stored,
                "compression_ratio": round(raw / stored, 2) if stored else None,
                "complete": missing == 0,
                "missing_shards": missing,
            }
        )
    entries = store.images
    splits: dict[str, int] = {}
    for entry in entries:
        splits[entry.split] = splits.get(entry.split, 0) + 1
    images_done = store.image_done()
    return {
        "path": str(store.path),
        "fingerprint": store.fingerprint,
        "dataset": store.attrs["identity"].get("dataset", {}).get("name"),
        "backbone": store.attrs["identity"].get("backbone"),
        "images": len(entries),
        "images_written": int(images_done.sum()),
        "splits": splits,
        "tiles": store.n_tiles,
        "tile_size": store.tile_size,
        "compute_precision": store.compute_precision,
        "bytes_on_disk": bytes_under(store.path),
        "features": rows,
        "complete": bool(images_done.all()) and all(row["complete"] for row in rows),
    }


def _children(group: zarr.Group | None) -> list[zarr.Group]:
    if group is None:
        return []
    return [member for _, member in group.members() if isinstance(member, zarr.Group)]


def _names(group: zarr.Group) -> list[str]:
    return [name for name, member in group.members() if isinstance(member, zarr.Array)]
