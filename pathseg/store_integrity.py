"""Checking and describing a feature store: `pathseg cache verify` and `pathseg cache info`.

Part of the store's code (it reads the layout `pathseg/store.py` defines), kept apart because it reads
everything and writes nothing.
"""

from __future__ import annotations

import numpy as np
import zarr

from pathseg.store import FeatureInfo, FeatureStore, digest, feature_key
from pathseg.store_files import bytes_under


def verify_store(store: FeatureStore, check_values: bool = True, progress=None) -> dict:
    """Everything that can be wrong with a store, as a list of one-line problems (empty: sound).

    Checks the fingerprint against the recorded identity and config, the tile and image tables,
    every feature array's shape, dtype and chunking against the attrs, completeness flags, and
    (with `check_values`) NaN/Inf in every finished shard, read shard by shard through dask.
    """
    problems: list[str] = []
    attrs = store.attrs
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
    n, size = store.n_tiles, store.tile_size
    planned = sum(entry.n_tiles for entry in store.images)
    if planned != n:
        problems.append(f"image table plans {planned} tiles but tiles/image holds {n}")
    for key, shape, dtype in (("tiles/origin", (n, 2), "int32"), ("tiles/labels", (n, size, size), "uint8")):
        array = store.group.get(key)
        if array is None or tuple(array.shape) != shape or str(array.dtype) != dtype:
            found = "missing" if array is None else f"{tuple(array.shape)} {array.dtype}"
            problems.append(f"{key} is {found}, expected {shape} {dtype}")
    unwritten = int((~store.image_done()).sum())
    if unwritten:
        problems.append(f"{unwritten} of {len(store.images)} images not written (rerun `pathseg extract`)")
    for index, entry in enumerate(store.images):
        if not store.image_done()[index]:
            continue
        rgb = store.group.get(f"images/{index}/rgb")
        if rgb is None or tuple(rgb.shape) != (entry.height, entry.width, 3):
            problems.append(f"image {entry.id!r}: stored pixels missing or not {entry.height}x{entry.width}")
    registry = attrs.get("features", {})
    checked = nonfinite_total = 0
    for key, row in sorted(registry.items()):
        info = FeatureInfo(**row)
        array = store.group.get(f"features/{key}")
        flags = store.group.get(f"done/{key}")
        expected = (n, info.channels, info.height, info.width)
        if array is None or flags is None:
            problems.append(f"features/{key}: recorded in attrs but its array or done flags are missing")
            continue
        if tuple(array.shape) != expected or str(array.dtype) != info.dtype:
            problems.append(f"features/{key} is {tuple(array.shape)} {array.dtype}, attrs say {expected} "
                            f"{info.dtype}")
            continue
        if tuple(array.chunks) != (1, *expected[1:]) or tuple(flags.shape) != (store.n_shards,):
            problems.append(f"features/{key}: chunking or done flags differ from one tile per chunk, "
                            f"{store.tiles_per_shard} tiles per shard")
            continue
        done = np.asarray(flags[:]).astype(bool)
        if not done.all():
            problems.append(f"features/{key}: {int((~done).sum())} of {len(done)} shards missing "
                            "(rerun `pathseg extract` to finish them)")
        if check_values:
            bad = _nonfinite_tiles(store, array, done)
            checked += int(sum(store.shard_range(s)[1] - store.shard_range(s)[0] for s in np.flatnonzero(done)))
            if bad:
                nonfinite_total += len(bad)
                shown = ", ".join(str(t) for t in bad[:5]) + (" ..." if len(bad) > 5 else "")
                problems.append(f"features/{key}: {len(bad)} tiles hold NaN or Inf (tiles {shown})")
        if progress is not None:
            progress(1)
    present = {f"{t.basename}/{a}" for t in _children(store.group.get("features")) for a in _names(t)}
    for stray in sorted(present - set(registry)):
        problems.append(f"features/{stray} is not recorded in the store's attrs (left by an interrupted run?)")
    return {"path": str(store.path), "problems": problems, "arrays": len(registry),
            "tiles_value_checked": checked, "nonfinite_tiles": nonfinite_total}


def _nonfinite_tiles(store: FeatureStore, array: zarr.Array, done: np.ndarray) -> list[int]:
    """Indices of finished tiles holding NaN/Inf; dask reads one shard per task, in parallel."""
    import dask.array as da

    per_shard = store.tiles_per_shard
    lazy = da.from_zarr(array, chunks=(per_shard, *array.shape[1:]))
    bad_tiles = (~da.isfinite(lazy)).any(axis=(1, 2, 3))
    flags = np.asarray(bad_tiles.compute(scheduler="threads"))
    finished = np.repeat(done, per_shard)[: store.n_tiles]
    return np.flatnonzero(flags & finished).tolist()

# ---- reporting -----------------------------------------------------------------------------


def store_info(store: FeatureStore) -> dict:
    """What is cached, its size on disk, compression ratio and completeness."""
    rows = []
    for info in store.feature_infos():
        key = feature_key(info.timestep, info.block)
        array = store.group[f"features/{key}"]
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
