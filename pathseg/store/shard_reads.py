"""Whole shards of a store's tile arrays, decoded straight from their files.

Stage 2 reads tiles far more often than extraction writes them. Through zarr 3.1 a 16-tile shard of a
tiny-backbone feature array decodes at ~2,200 tiles/s on one core; the same bytes decoded here, index
parsed and inner chunks handed to numcodecs' zstd directly into the destination rows, at ~6,800 tiles/s
(measured on the GlaS tiny store, 64 x 32 x 32 float16, hot page cache). The difference is zarr's per-chunk
asyncio and codec-pipeline overhead, which is paid per tile here because every tile is its own inner chunk.

Only the layouts pathseg itself writes are read this way (zarr v3 on a local filesystem; one row per
chunk; `sharding_indexed` with a `bytes` + `crc32c` index, or no sharding; `bytes` + `zstd` per chunk),
each checked against the array's own metadata. Anything else (another codec chain, a remote store, a
store written by a future version) goes through zarr, which gives the same values more slowly. The tests
compare both paths on every layout. zstd frames written with a content checksum are verified by zstd
itself, and the shard index by its crc32c, so damage is caught as zarr would catch it, in one line.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr
from numcodecs import CRC32C, Zstd

from pathseg.store.disk import damaged, read_array, tile_span

EMPTY = np.uint64(2**64 - 1)  # the sharding spec's offset and length of a chunk that was never written


def _codec_names(codecs) -> list[str]:
    return [getattr(codec, "codec_name", None) or type(codec).__name__ for codec in codecs]


class ShardRows:
    """Rows of one array, a shard (or, unsharded, one row) at a time: `read(unit)` -> its rows as numpy."""

    def __init__(self, array: zarr.Array, root: Path | None) -> None:
        self.array = array
        self.n_rows = int(array.shape[0])
        self.row_shape = tuple(int(s) for s in array.shape[1:])
        self.dtype = np.dtype(array.dtype)
        self.fill_value = array.fill_value
        shards = array.shards
        self.rows_per_unit = int(shards[0]) if shards is not None else int(array.chunks[0])
        self.n_units = -(-self.n_rows // self.rows_per_unit)
        self.directory = Path(root) / array.path if root is not None else None
        self.direct = self.directory is not None and self._layout_is_ours(array)
        self._zstd = Zstd()
        self._crc = CRC32C()

    def _layout_is_ours(self, array: zarr.Array) -> bool:
        """True for the one-row-per-chunk, bytes + zstd layouts `pathseg.store` writes, sharded or not."""
        metadata = array.metadata
        if getattr(metadata, "zarr_format", None) != 3 or self.dtype.byteorder == ">":
            return False
        if tuple(array.chunks) != (1, *self.row_shape):
            return False
        codecs = list(metadata.codecs)
        if _codec_names(codecs) == ["ShardingCodec"]:
            sharding = codecs[0]
            if sharding.index_location.value != "end" or _codec_names(sharding.index_codecs) != [
                "BytesCodec", "Crc32cCodec"
            ]:
                return False
            if tuple(array.shards[1:]) != self.row_shape:
                return False
            codecs = list(sharding.codecs)
            self.sharded = True
        else:
            self.sharded = False
        if _codec_names(codecs) != ["BytesCodec", "ZstdCodec"]:
            return False
        endian = getattr(codecs[0], "endian", None)
        return endian is None or getattr(endian, "value", endian) == "little" or self.dtype.itemsize == 1

    def unit_rows(self, unit: int) -> tuple[int, int]:
        first = unit * self.rows_per_unit
        return first, min(first + self.rows_per_unit, self.n_rows)

    def read(self, unit: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows of shard `unit` (all of them; the last shard may be short), into `out` when given."""
        first, stop = self.unit_rows(unit)
        if out is None:
            out = np.empty((stop - first, *self.row_shape), dtype=self.dtype)
        if not self.direct:
            out[...] = read_array(self.array, slice(first, stop), tile_span(first, stop - 1))
            return out
        try:
            if self.sharded:
                self._read_shard(unit, stop - first, out)
            else:
                self._read_chunk(unit, out)
        except (OSError, RuntimeError, ValueError) as error:
            raise damaged(self.array, tile_span(first, stop - 1), error) from None
        return out

    def _file(self, unit: int) -> Path:
        return self.directory.joinpath("c", str(unit), *["0"] * len(self.row_shape))

    def _fill(self, out: np.ndarray) -> None:
        out[...] = self.fill_value if self.fill_value is not None else 0

    def _read_shard(self, unit: int, rows: int, out: np.ndarray) -> None:
        try:
            data = self._file(unit).read_bytes()
        except FileNotFoundError:
            self._fill(out)  # zarr's reading of a shard never written
            return
        index_bytes = self.rows_per_unit * 16 + 4
        if len(data) < index_bytes:
            raise ValueError(f"shard file of {len(data)} bytes is shorter than its index")
        index = np.frombuffer(self._crc.decode(data[-index_bytes:]), dtype="<u8").reshape(-1, 2)
        view = memoryview(data)
        for row in range(rows):
            offset, length = index[row]
            if offset == EMPTY and length == EMPTY:
                self._fill(out[row])
                continue
            if offset + length > len(data) - index_bytes:
                raise ValueError(f"chunk {row} lies outside its shard file")
            self._decode(view[int(offset) : int(offset + length)], out[row])

    def _read_chunk(self, unit: int, out: np.ndarray) -> None:
        try:
            data = self._file(unit).read_bytes()
        except FileNotFoundError:
            self._fill(out)
            return
        self._decode(data, out[0])

    def _decode(self, compressed, row: np.ndarray) -> None:
        decoded = self._zstd.decode(compressed, out=row)
        if not np.shares_memory(decoded, row):  # numcodecs returned its own buffer: the sizes differ
            raise ValueError(f"a chunk decoded to {np.asarray(decoded).nbytes} bytes, expected {row.nbytes}")
