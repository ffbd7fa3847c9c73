"""The feature arrays of a store: one per (timestep, block) plus z0, in shards of tiles, each shard flagged
done only after its bytes are on disk. A mixin of `FeatureStore`, which supplies `group`, `attrs`, `path`,
`n_tiles`, `_array` and `_flags`; kept apart because writing and checking shards is its own job.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from pathseg.errors import PathsegError
from pathseg.store.disk import _fsync_file, read_array, read_rows, shard_file, shard_lost, tile_span
from pathseg.store.names import feature_key, is_z0, nonfinite_message, pair_label


def zstd(level: int) -> ZstdCodec:
    """zstd with its content checksum: without it most flipped bits decode silently into other values."""
    return ZstdCodec(level=level, checksum=True)


@dataclass(frozen=True)
class FeatureInfo:
    timestep: int
    block: str
    channels: int
    height: int
    width: int
    dtype: str = "float16"  # float32 for blocks whose values float16 cannot hold (extract.feature_dtype)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)


class FeatureArrays:
    @property
    def tiles_per_shard(self) -> int:
        """Fixed for the store's life, so one shard index means the same tiles in every array."""
        return int(self.attrs["tiles_per_shard"])

    @property
    def n_shards(self) -> int:
        return math.ceil(self.n_tiles / self.tiles_per_shard)

    def feature_infos(self) -> list[FeatureInfo]:
        return [FeatureInfo(**row) for row in self.attrs["features"].values()]

    def has_feature(self, timestep: int, block: str) -> bool:
        if is_z0(block):
            return self.member("latents/z0") is not None
        return feature_key(timestep, block) in self.attrs["features"]

    def ensure_feature(self, timestep: int, block: str, channels: int, height: int, width: int,
                       dtype: str = "float16") -> None:
        """Create the (timestep, block) array and its shard flags unless they exist with this shape.

        An existing array keeps the dtype it was made with (values already written fit it), unless none of
        its shards is written yet.
        """
        key = feature_key(timestep, block)
        registry = dict(self.attrs["features"])
        info = FeatureInfo(timestep, block, channels, height, width, dtype)
        if key in registry and registry[key].get("dtype", "float16") != dtype and not self._any_shard_done(key):
            del registry[key]  # nothing written yet: made again in the dtype now asked for
        if key in registry:
            if FeatureInfo(**registry[key]).shape != info.shape:
                raise PathsegError(
                    f"{self.path}: cached {key} has shape {registry[key]}, but the backbone now gives {info.__dict__}; "
                    "re-extract with --overwrite"
                )
            return
        n = self.n_tiles
        per_shard = self.tiles_per_shard
        self.group.create_array(
            f"features/{key}",
            shape=(n, channels, height, width),
            dtype=dtype,
            chunks=(1, channels, height, width),
            shards=(per_shard, channels, height, width),
            compressors=zstd(int(self.attrs["compression_level"])),
            fill_value=0,
            overwrite=True,
        )
        self.group.create_array(
            f"done/{key}", shape=(self.n_shards,), dtype="uint8", chunks=(1,), fill_value=0, overwrite=True,
            compressors=zstd(int(self.attrs["compression_level"])),
        )
        registry[key] = info.__dict__
        self.group.attrs["features"] = registry

    def _any_shard_done(self, key: str) -> bool:
        return bool(self._flags(f"done/{key}").any())

    def shard_range(self, shard: int) -> tuple[int, int]:
        return shard * self.tiles_per_shard, min((shard + 1) * self.tiles_per_shard, self.n_tiles)

    def tiles_in(self, shards) -> int:
        return sum(stop - start for start, stop in map(self.shard_range, shards))

    def missing_shards(self, timestep: int, block: str) -> list[int]:
        if not self.has_feature(timestep, block):
            raise KeyError(feature_key(timestep, block))
        if is_z0(block):
            return np.flatnonzero(~self.latent_shards_done()).tolist()
        return np.flatnonzero(~self._flags(f"done/{feature_key(timestep, block)}")).tolist()

    def write_shard(self, timestep: int, block: str, shard: int, data: np.ndarray,
                    largest: np.ndarray | None = None) -> None:
        """A whole shard at once (so no two writers ever share a shard file), then its done flag.

        A shard holding NaN or inf once in the array's dtype is refused before anything is written, so fit-head
        never meets it; `largest` (each tile's max |value| before any cast) says whether the model or the
        storage dtype is to blame.
        """
        key = feature_key(timestep, block)
        start, stop = self.shard_range(shard)
        if data.shape[0] != stop - start:
            raise ValueError(f"shard {shard} of {key} holds {stop - start} tiles, got {data.shape[0]}")
        array = self._array(f"features/{key}")
        stored = data.astype(array.dtype, copy=False)
        finite = np.isfinite(stored).reshape(len(stored), -1).all(axis=1)
        if not finite.all():
            raise PathsegError(nonfinite_message(timestep, block, start + int(np.argmin(finite)),
                                                 largest if largest is not None else data, str(array.dtype)))
        array[start:stop] = stored
        _fsync_file(self.path / "features" / key / "c" / str(shard))
        self._array(f"done/{key}")[shard] = 1
        _fsync_file(self.path / "done" / key / "c" / str(shard))

    # ---- first-stage latents: z_0 per tile, so extending a store never re-runs the encoder ----------

    def latent_shards_done(self) -> np.ndarray:
        if self.member("done/latents") is None:
            return np.zeros(self.n_shards, dtype=bool)
        return self._flags("done/latents")

    def read_latents(self, start: int, stop: int) -> np.ndarray:
        return read_array(self._array("latents/z0"), slice(start, stop), tile_span(start, stop - 1))

    def ensure_latents(self, per_tile: tuple[int, ...]) -> None:
        """The z_0 array and its shard flags, unless they exist. Parallel writers need it made before they start."""
        if self.member("latents/z0") is not None:
            return
        self.group.create_array(
            "latents/z0", shape=(self.n_tiles, *per_tile), dtype="float32", chunks=(1, *per_tile),
            shards=(self.tiles_per_shard, *per_tile),
            compressors=zstd(int(self.attrs["compression_level"])), fill_value=0, overwrite=True,
        )
        self.group.create_array("done/latents", shape=(self.n_shards,), dtype="uint8", chunks=(1,),
                                fill_value=0, overwrite=True, compressors=zstd(int(self.attrs["compression_level"])))

    def write_latents(self, shard: int, data: np.ndarray) -> None:
        """z_0 of a whole shard (float32, exact), the array created on first use, then its done flag."""
        self.ensure_latents(tuple(data.shape[1:]))
        start, stop = self.shard_range(shard)
        self._array("latents/z0")[start:stop] = data.astype(np.float32, copy=False)
        _fsync_file(self.path / "latents" / "z0" / "c" / str(shard))
        self._array("done/latents")[shard] = 1
        _fsync_file(self.path / "done" / "latents" / "c" / str(shard))

    def feature_array(self, timestep: int, block: str) -> zarr.Array:
        """A (timestep, block) feature array; block `z0` is the first-stage latent, cached by every extraction."""
        key = feature_key(timestep, block)
        if is_z0(block):
            if not self.has_feature(timestep, block):
                raise PathsegError(f"{self.path} has no first-stage latents (z0) yet; run `pathseg extract` first")
            return self._array("latents/z0")
        if not self.has_feature(timestep, block):
            cached = ", ".join(sorted(self.attrs["features"])) or "none"
            raise PathsegError(
                f"{self.path} has no features for timestep {timestep}, block {block!r} (cached: {cached}); "
                f"run `pathseg extract` with them first"
            )
        return self._array(f"features/{key}")

    def read_features(self, timestep: int, block: str, tiles: np.ndarray | slice) -> np.ndarray:
        return read_rows(self.feature_array(timestep, block), tiles)

    def is_complete(self, timestep: int, block: str) -> bool:
        return self.has_feature(timestep, block) and not self.missing_shards(timestep, block)

    def require(self, pairs: list[tuple[int, str]]) -> None:
        """Stage 2's gate: every requested array present and complete, and every image written."""
        if not self.image_done().all():
            raise PathsegError(
                f"{self.path}: images are not all written (an extraction stopped); rerun `pathseg extract`"
            )
        for timestep, block in pairs:
            self.feature_array(timestep, block)
            missing = self.missing_shards(timestep, block)
            if missing:
                raise PathsegError(
                    f"{self.path}: features t={timestep} {block} are incomplete ({len(missing)} shards missing); "
                    "rerun `pathseg extract` to finish them"
                )
            lost = self.lost_shards(timestep, block)
            if lost:
                raise PathsegError(
                    f"{self.path}: {self.feature_array(timestep, block).path} ({pair_label(timestep, block)}): shards "
                    f"{lost[:5]} are flagged done but their files are gone or empty (damaged store); run `pathseg "
                    "cache verify`, then re-extract with --overwrite"
                )

    def lost_shards(self, timestep: int, block: str) -> list[int]:
        """Shards flagged done whose shard file is not on disk: zarr would read them as zeros, silently."""
        array = self.feature_array(timestep, block)
        done = np.flatnonzero(~np.isin(np.arange(self.n_shards), self.missing_shards(timestep, block)))
        return [int(s) for s in done if shard_lost(shard_file(self.path, array.path, int(s), array.ndim))]

    @property
    def compute_precision(self) -> str | None:
        """float32, bfloat16 or float16: what the backbone computed in (None until a run computed something)."""
        return self.attrs.get("compute_precision")

    def record_compute_precision(self, precision: str) -> None:
        self.group.attrs["compute_precision"] = precision

    def record_block_aliases(self, aliases: dict[str, str]) -> None:
        """Name -> canonical block, so stage 2 resolves `output_blocks.K` without the backbone."""
        if self.attrs.get("block_aliases") != aliases:
            self.group.attrs["block_aliases"] = aliases
