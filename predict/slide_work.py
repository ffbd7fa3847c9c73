"""A slide's tile logits on disk while it is being predicted: batch by batch, each flagged once written.

A slide is thousands of backbone forwards; a crash (or kill -9) must not throw them away. Each batch of
tissue tiles is written as one shard of a Zarr array and then flagged, so a rerun computes only unflagged
batches: at most the batch in flight is lost. The store records what it was made from (run, slide, mpp,
tissue settings, batch size); a store made from anything else is discarded rather than mixed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from pathseg.store import digest


class SlideWork:
    def __init__(self, path: Path, group: zarr.Group) -> None:
        self.path = path
        self.group = group

    @classmethod
    def open_or_create(cls, path: Path, identity: dict, tiles: np.ndarray, logits_shape: tuple[int, int, int],
                       batch_size: int) -> SlideWork:
        """The working store for this identity: reused when it matches, made anew otherwise."""
        path = Path(path)
        key = digest(identity)
        if (path / "zarr.json").exists():
            try:
                group = zarr.open_group(str(path), mode="r+")
                if group.attrs.get("identity_digest") == key:
                    return cls(path, group)
            except (ValueError, OSError):
                pass
            shutil.rmtree(path)
        building = path.with_name(path.name + ".creating")
        if building.exists():
            shutil.rmtree(building)
        group = zarr.open_group(str(building), mode="w")
        group.create_array("tiles", data=np.asarray(tiles, dtype=np.int64), chunks=(max(len(tiles), 1),))
        n_batches = -(-len(tiles) // batch_size)
        group.create_array("logits", shape=(len(tiles), *logits_shape), dtype="float32",
                           chunks=(1, *logits_shape), shards=(batch_size, *logits_shape),
                           compressors=ZstdCodec(level=1), fill_value=0)
        group.create_array("done", shape=(n_batches,), dtype="uint8", chunks=(1,), fill_value=0)
        group.attrs.update({"identity": identity, "identity_digest": key, "batch_size": batch_size})
        building.rename(path)
        return cls(path, zarr.open_group(str(path), mode="r+"))

    @property
    def batch_size(self) -> int:
        return int(self.group.attrs["batch_size"])

    @property
    def tiles(self) -> np.ndarray:
        return np.asarray(self.group["tiles"][:])

    def pending_batches(self) -> list[int]:
        return np.flatnonzero(np.asarray(self.group["done"][:]) == 0).tolist()

    def batch_range(self, batch: int) -> tuple[int, int]:
        return batch * self.batch_size, min((batch + 1) * self.batch_size, self.group["tiles"].shape[0])

    def write_batch(self, batch: int, logits: np.ndarray) -> None:
        start, stop = self.batch_range(batch)
        self.group["logits"][start:stop] = logits.astype(np.float32, copy=False)
        self.group["done"][batch] = 1

    def read(self, positions: np.ndarray) -> np.ndarray:
        from pathseg.store.disk import read_rows

        return read_rows(self.group["logits"], positions)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
