"""Files of the feature store: fsync of written chunks and their folders, leftovers of killed writers, bytes on
disk, and reads that turn a damaged chunk into one line naming it. Only the store's own modules use these."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from pathseg.errors import PathsegError


def _fsync_file(path: Path) -> None:
    """Flush a written chunk or shard (a file, or the directory of its key's remaining parts) and its folder."""
    path = Path(path)
    if path.is_dir():
        _fsync_tree(path)
        return
    if not path.exists():  # an all-fill-value chunk is not written at all
        return
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass  # some file systems cannot sync directories; the file itself was synced
    finally:
        os.close(descriptor)


def _fsync_tree(root: Path) -> None:
    root = Path(root)
    if not root.exists():
        return
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync_file(Path(folder) / name)
        _fsync_dir(Path(folder))


def remove_partial_files(path: Path) -> int:
    """Temporary files a killed writer left behind (zarr writes `<chunk>.<uuid>.partial`, then renames)."""
    removed = 0
    for leftover in Path(path).rglob("*.partial"):
        if leftover.is_file():
            leftover.unlink(missing_ok=True)
            removed += 1
    return removed


def bytes_under(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def array_root(array) -> Path:
    """The store folder an opened zarr array belongs to (for messages that name the store)."""
    return Path(getattr(array.store, "root", "") or ".")


def error_reason(error: BaseException) -> str:
    """`Type: first line` of an exception, for one-line messages."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def damaged(array, what: str, error: BaseException) -> PathsegError:
    """One line for a chunk that exists but does not decode (checksum mismatch, cut short, not zstd...)."""
    root = array_root(array)
    what = f" {what}" if what else ""
    return PathsegError(f"{root}: {array.path}{what} cannot be read ({error_reason(error)}); the store is damaged: "
                        f"`pathseg cache verify {root}` lists what, then re-extract with --overwrite")


def read_array(array, selection: Any = slice(None), what: str = "") -> np.ndarray:
    """`array[selection]` as numpy; any failure to decode stored bytes is the store's damage, said in one line.

    zarr and its codecs raise many exception types for a bad chunk (RuntimeError from zstd, ValueError from a
    short buffer, struct errors from a shard index...), so all of them are caught here, at the one place
    stored bytes become arrays.
    """
    try:
        return np.asarray(array[selection])
    except Exception as error:  # the bytes on disk, not pathseg, are at fault
        raise damaged(array, what, error) from None


def shard_file(store: Path, array_path: str, shard: int, ndim: int) -> Path:
    """Where zarr keeps shard `shard` (along the first axis) of an array: `<array>/c/<shard>/0/.../0`."""
    return Path(store) / array_path / "c" / str(shard) / Path(*(["0"] * (ndim - 1)))


def shard_lost(path: Path) -> bool:
    """A shard flagged done must be on disk and hold bytes: zarr reads a missing or empty one as zeros, silently."""
    try:
        return path.stat().st_size == 0
    except FileNotFoundError:
        return True


def tile_span(first: int, last: int) -> str:
    return f"tile {first}" if first == last else f"tiles {first}-{last}"


def read_rows(array, rows: np.ndarray | slice) -> np.ndarray:
    """Rows (tiles) of an array, in the order asked, read as runs of consecutive rows.

    zarr 3's orthogonal selection over a sharded array costs several times more per tile than plain
    slices (measured in bench/head_ablation_cost.py), and a shuffled batch sorted by tile is mostly
    short runs, so slices it is.
    """
    if isinstance(rows, slice):
        return read_array(array, rows)
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    out = np.empty((len(rows), *array.shape[1:]), dtype=array.dtype)
    if len(rows) == 0:
        return out
    order = np.argsort(rows, kind="stable")
    ordered = rows[order]
    breaks = np.flatnonzero(np.diff(ordered) != 1) + 1
    start = 0
    for stop in [*breaks.tolist(), len(ordered)]:
        first, last = int(ordered[start]), int(ordered[stop - 1])
        out[order[start:stop]] = read_array(array, slice(first, last + 1), tile_span(first, last))
        start = stop
    return out
