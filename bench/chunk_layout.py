"""Which chunk and shard sizes should a feature array have? Measured on real store data, in one run.

The store writes each (timestep, block) array as one tile per chunk and `extract.tiles_per_shard`
tiles per shard file (16 by default). Both choices trade against each other:

  * chunk size: zarr decodes whole chunks, and stage 2 reads shuffled batches, so a chunk of k tiles
    decodes up to k tiles per tile asked for; bigger chunks may compress a little better;
  * shard size: a shard is one file, written once with its done flag after an fsync, so it is also
    the unit of work a killed extraction loses; small shards mean many files and many fsyncs, big
    ones a bigger index read per access and more work lost in a crash.

This benchmark takes one feature array (the largest of a store you name, or of a small store it
extracts with the tiny backbone from synthetic data), rewrites it under each layout with the
store's codec (float16, zstd at the store's level), and reports per layout: bytes per tile on
disk, files, write time per tile (shard by shard with an fsync each, as the runner writes), and
read throughput for shuffled batches (`pathseg.store.disk.read_rows`, as the stage-2 loader reads) and
for batches in tile order (as evaluate reads). Reads are hot from the page cache: decode cost, not
the disk.

    python bench/chunk_layout.py                                       # ~1 min on 2 cores
    python bench/chunk_layout.py --store cache/glas-tiny-XXXX.zarr --tiles 512 --json out.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import _common as common
import numpy as np
import zarr
from pathseg.extract.runner import run_extraction
from zarr.codecs import ZstdCodec

from pathseg.store import FeatureStore, feature_key
from pathseg.store.disk import _fsync_file, read_rows

DEFAULT_LAYOUT = (1, 16)  # (tiles per chunk, tiles per shard) that the store uses by default


def source_array(args: argparse.Namespace, workdir: Path) -> tuple[str, np.ndarray, int]:
    """(name, float16 tiles, zstd level): the chosen array's first `--tiles` tiles, read into memory."""
    if args.store:
        store = FeatureStore.open(Path(args.store))
    else:
        config = common.synthetic_config(workdir, {
            "dataset.synthetic.train": args.images, "tiling.tile_size": 256, "tiling.stride": 192,
            "extract.timesteps": [50], "extract.blocks": ["up1", "up2.2", "up3.2"], "backbone.name": "tiny",
        })
        store = FeatureStore.open(run_extraction(config, show_progress=False).store)
    infos = store.feature_infos()
    if args.array:
        chosen = next((i for i in infos if feature_key(i.timestep, i.block) == args.array), None)
        if chosen is None:
            raise SystemExit(f"{store.path} has no array {args.array!r}; it has "
                             f"{', '.join(feature_key(i.timestep, i.block) for i in infos)}")
    else:
        chosen = max(infos, key=lambda i: i.channels * i.height * i.width)
    n = min(args.tiles, store.n_tiles)
    data = np.asarray(store.feature_array(chosen.timestep, chosen.block)[:n])
    return feature_key(chosen.timestep, chosen.block), data, int(store.attrs["compression_level"])


def write_layout(path: Path, data: np.ndarray, per_chunk: int, per_shard: int, level: int) -> tuple[zarr.Array, float]:
    array = zarr.create_array(
        str(path), shape=data.shape, dtype="float16", chunks=(per_chunk, *data.shape[1:]),
        shards=(per_shard, *data.shape[1:]), compressors=ZstdCodec(level=level), fill_value=0, overwrite=True,
    )
    started = time.perf_counter()
    for shard, lo in enumerate(range(0, len(data), per_shard)):
        array[lo:lo + per_shard] = data[lo:lo + per_shard]
        _fsync_file(path / "c" / str(shard))
    return array, time.perf_counter() - started


def read_pass(array: zarr.Array, batches: list[np.ndarray]) -> float:
    started = time.perf_counter()
    for tiles in batches:
        read_rows(array, tiles).astype(np.float32)
    return time.perf_counter() - started


def measure(array: zarr.Array, path: Path, write_s: float, batch_size: int, epochs: int, seed: int) -> dict[str, Any]:
    n = array.shape[0]
    rng = np.random.default_rng(seed)
    shuffled = [np.sort(b) for b in np.array_split(rng.permutation(n), max(1, n // batch_size))]
    ordered = [np.arange(lo, min(lo + batch_size, n)) for lo in range(0, n, batch_size)]
    files = [p for p in path.rglob("*") if p.is_file() and p.name != "zarr.json"]
    shuffled_s = min(read_pass(array, shuffled) for _ in range(epochs))
    ordered_s = min(read_pass(array, ordered) for _ in range(epochs))
    return {
        "bytes_per_tile": sum(p.stat().st_size for p in files) / n,
        "files": len(files),
        "write_ms_per_tile": 1e3 * write_s / n,
        "shuffled_tiles_per_s": n / shuffled_s,
        "ordered_tiles_per_s": n / ordered_s,
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--store", default=None, help="take the array from this store instead of extracting one")
    parser.add_argument("--array", default=None, help="t0050/up3.2 style key (default: the largest per tile)")
    parser.add_argument("--images", type=int, default=32, help="synthetic images when no --store (4 tiles each)")
    parser.add_argument("--tiles", type=int, default=128, help="tiles of the array to lay out")
    parser.add_argument("--chunks", default="1,2,4", help="tiles per chunk to try")
    parser.add_argument("--shards", default="1,4,16,64", help="tiles per shard to try (multiples of the chunk)")
    parser.add_argument("--batch-size", type=int, default=8, help="tiles per read (train.batch_size)")
    parser.add_argument("--epochs", type=int, default=3, help="timed passes per reader (best kept)")
    parser.add_argument("--seed", type=int, default=0)
    common.add_output_options(parser, "arrays")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    machine = common.start()
    results = []
    with common.work_directory(args.workdir, "pathseg-bench-layout-") as workdir:
        name, data, level = source_array(args, workdir)
        print(f"array {name}: {data.shape[0]} tiles of {'x'.join(map(str, data.shape[1:]))} float16, zstd {level}",
              flush=True)
        for per_chunk in (int(v) for v in args.chunks.split(",")):
            for per_shard in (int(v) for v in args.shards.split(",")):
                if per_shard % per_chunk or per_shard > len(data):
                    continue
                path = workdir / f"layout_c{per_chunk}_s{per_shard}.zarr"
                array, write_s = write_layout(path, data, per_chunk, per_shard, level)
                row = {"tiles_per_chunk": per_chunk, "tiles_per_shard": per_shard,
                       **measure(array, path, write_s, args.batch_size, args.epochs, args.seed)}
                results.append(row)
                common.fresh(path)
                print(f"  chunk {per_chunk}, shard {per_shard}: {row['shuffled_tiles_per_s']:.0f} tiles/s shuffled",
                      flush=True)
    raw = data[0].size * 4
    common.print_table(
        f"layouts of {name} ({data.shape[0]} tiles; raw float32 {raw:,} B/tile); default marked *",
        ["chunk", "shard", "B/tile on disk", "vs float32", "files", "write ms/tile (fsync per shard)",
         "shuffled reads tiles/s", "ordered reads tiles/s"],
        [[f"{r['tiles_per_chunk']}{'*' if (r['tiles_per_chunk'], r['tiles_per_shard']) == DEFAULT_LAYOUT else ''}",
          r["tiles_per_shard"], r["bytes_per_tile"], r["bytes_per_tile"] / raw, r["files"], r["write_ms_per_tile"],
          r["shuffled_tiles_per_s"], r["ordered_tiles_per_s"]] for r in results],
    )
    common.save_json(args.json, {"benchmark": "chunk_layout", "machine": machine, "array": name,
                                 "tiles": int(data.shape[0]), "shape_per_tile": list(data.shape[1:]),
                                 "compression_level": level, "results": results})


if __name__ == "__main__":
    main()
