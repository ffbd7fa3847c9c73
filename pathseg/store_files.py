"""Durable files for the feature store: fsync of written chunks and their folders, leftovers of killed
writers, bytes on disk. Only `pathseg/store.py` and its integrity checks use these."""

from __future__ import annotations

import os
from pathlib import Path


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
