"""What does the feature cache cost on disk, and how fast does stage 2 read it back?

The point of caching is that one extraction serves many head ablations; that only pays if the
cache is small enough to keep (target: <= 0.5x the bytes of raw float32 features) and reads back
fast enough not to starve the head. This benchmark extracts a small store with the tiny backbone
from synthetic data (or takes `--store`), then reports

  * bytes per tile on disk under `features/` (per (timestep, block) array and in total) against
    raw float32 (C*h*w*4 bytes per tile per array);
  * the read throughput of `pathseg.train_head.loader.StoreLoader` (shuffled, prefetch=2) over all
    tiles, against the same shuffled batches (sorted indices, converted to float32) fancy-indexed
    from raw `.npy` files opened with `np.load(mmap_mode="r")` (float32 and float16 copies).

Both are read hot from the page cache: this measures decode cost, not the disk. Features of a
random-weight UNet are not those of a trained one, so a trained backbone's features may compress
somewhat differently; the float16 cast alone gives 0.5x, zstd adds what it can on top.

    python bench/cache_economics.py
    python bench/cache_economics.py --images 16 --timesteps 50,150,250 --json out.json
    python bench/cache_economics.py --store cache/synthetic-tiny-XXXX.zarr   # an existing store
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import _common as common
import numpy as np
import torch
from pathseg.extract.runner import run_extraction
from pathseg.train_head.loader import StoreLoader

from pathseg.store import FeatureStore, feature_key

MB = 1e6


def array_sizes(store: FeatureStore) -> list[dict[str, Any]]:
    rows = []
    n = store.n_tiles
    for info in sorted(store.feature_infos(), key=lambda i: (i.timestep, i.block)):
        on_disk = common.bytes_under(store.path / "features" / feature_key(info.timestep, info.block))
        raw32 = info.channels * info.height * info.width * 4
        rows.append(
            {
                "array": feature_key(info.timestep, info.block),
                "shape_per_tile": [info.channels, info.height, info.width],
                "bytes_per_tile_on_disk": on_disk / n,
                "bytes_per_tile_float32": raw32,
                "ratio_to_float32": on_disk / n / raw32,
            }
        )
    return rows


def write_npy(store: FeatureStore, pairs: list[tuple[int, str]], directory: Path, dtype: str) -> list[Path]:
    """One .npy per array (all tiles), plus the tile labels: the uncompressed alternative to the store."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for timestep, block in pairs:
        path = directory / f"t{timestep:04d}_{block}.npy"
        np.save(path, store.read_features(timestep, block, slice(None)).astype(dtype))
        paths.append(path)
    labels = directory / "labels.npy"
    np.save(labels, np.asarray(store.group["tiles/labels"][:]))
    return paths + [labels]


def store_pass(store: FeatureStore, pairs, tiles: np.ndarray, batch_size: int, epoch: int,
               prefetch: int) -> tuple[float, list[np.ndarray]]:
    loader = StoreLoader(store, pairs, tiles, batch_size, shuffle=True, prefetch=prefetch)
    loader.set_epoch(epoch)
    batches = []
    started = time.perf_counter()
    for batch in loader:
        batches.append(batch.tiles)
    return time.perf_counter() - started, batches


def per_tile_pass(store: FeatureStore, pairs, batches: list[np.ndarray]) -> float:
    """Diagnostic, not the project's loader: the same batches read one tile (one chunk) at a time.

    `StoreLoader` reads a batch as slices of consecutive tiles (`pathseg.store.read_rows`); before that
    it used `get_orthogonal_selection`, which zarr 3.1 served ~4x slower per tile on sharded arrays.
    """
    arrays = [store.feature_array(t, b) for t, b in pairs]
    labels = store.group["tiles/labels"]
    started = time.perf_counter()
    for tiles in batches:
        index = [int(i) for i in np.sort(tiles)]
        [torch.from_numpy(np.stack([array[i] for i in index]).astype(np.float32)) for array in arrays]
        torch.from_numpy(np.stack([labels[i] for i in index]).astype(np.int64))
    return time.perf_counter() - started


def npy_pass(paths: list[Path], batches: list[np.ndarray]) -> float:
    """The store pass's exact batches, read the way a raw-array cache would be: mmap + fancy index + float32."""
    started = time.perf_counter()
    *features, labels = [np.load(path, mmap_mode="r") for path in paths]
    for tiles in batches:
        index = np.sort(tiles)
        [torch.from_numpy(np.ascontiguousarray(array[index], dtype=np.float32)) for array in features]
        torch.from_numpy(np.asarray(labels[index], dtype=np.int64))
    return time.perf_counter() - started


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--store", default=None, help="measure this existing store instead of extracting one")
    parser.add_argument("--images", type=int, default=8, help="synthetic images (288x352: 4 tiles of 256 px each)")
    parser.add_argument("--tile", default="256/192", help="tile_size/stride")
    parser.add_argument("--timesteps", default="50,150")
    parser.add_argument("--blocks", default="up1,up2.2,up3.2")
    parser.add_argument("--compression-level", type=int, default=3, help="extract.compression_level (zstd)")
    parser.add_argument("--batch-size", type=int, default=8, help="StoreLoader batch size (train.batch_size)")
    parser.add_argument("--epochs", type=int, default=5, help="timed passes over all tiles per reader (best kept)")
    common.add_output_options(parser, "the store and .npy files")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    machine = common.start()
    with common.work_directory(args.workdir, "pathseg-bench-cache-") as workdir:
        if args.store:
            store_path = Path(args.store)
            extraction_s = None
        else:
            tile, stride = (int(v) for v in args.tile.split("/"))
            config = common.synthetic_config(
                workdir,
                {
                    "dataset.synthetic.train": args.images,
                    "tiling.tile_size": tile,
                    "tiling.stride": stride,
                    "extract.timesteps": [int(t) for t in args.timesteps.split(",")],
                    "extract.blocks": [b.strip() for b in args.blocks.split(",")],
                    "extract.compression_level": args.compression_level,
                },
            )
            store_path = common.fresh(workdir / "store.zarr")
            print("extracting the store with the tiny backbone ...", flush=True)
            extraction_s, _ = common.timed(
                lambda: run_extraction(config, show_progress=False, store_path=store_path)
            )
        store = FeatureStore.open(store_path)
        pairs = [(i.timestep, i.block) for i in sorted(store.feature_infos(), key=lambda i: (i.timestep, i.block))]
        n_tiles = store.n_tiles
        tiles = np.arange(n_tiles)
        sizes = array_sizes(store)
        per_tile_disk = sum(r["bytes_per_tile_on_disk"] for r in sizes)
        per_tile_f32 = sum(r["bytes_per_tile_float32"] for r in sizes)
        print(f"store {store_path}: {n_tiles} tiles, {len(pairs)} arrays", flush=True)

        npy32 = write_npy(store, pairs, workdir / "npy32", "float32")
        npy16 = write_npy(store, pairs, workdir / "npy16", "float16")
        readers = ["store (StoreLoader, prefetch=2)", "store (StoreLoader, prefetch=0)", "raw .npy float32 (mmap)",
                   "raw .npy float16 (mmap)", "store, one tile per read (diagnostic, prefetch=0)"]
        times: dict[str, list[float]] = {name: [] for name in readers}
        store_pass(store, pairs, tiles, args.batch_size, 10_000, 2)  # warm-up: page cache, zarr metadata, threads
        for epoch in range(args.epochs):
            seconds, batches = store_pass(store, pairs, tiles, args.batch_size, epoch, 2)
            times[readers[0]].append(seconds)
            times[readers[1]].append(store_pass(store, pairs, tiles, args.batch_size, epoch, 0)[0])
            times[readers[2]].append(npy_pass(npy32, batches))
            times[readers[3]].append(npy_pass(npy16, batches))
            times[readers[4]].append(per_tile_pass(store, pairs, batches))
        npy32_bytes = sum(p.stat().st_size for p in npy32[:-1]) / n_tiles
        npy16_bytes = sum(p.stat().st_size for p in npy16[:-1]) / n_tiles

    common.print_table(
        f"bytes per tile on disk ({n_tiles} tiles; target total <= 0.5x raw float32)",
        ["array", "C x h x w", "on disk B/tile", "raw float32 B/tile", "ratio"],
        [[r["array"], "x".join(map(str, r["shape_per_tile"])), r["bytes_per_tile_on_disk"],
          r["bytes_per_tile_float32"], r["ratio_to_float32"]] for r in sizes]
        + [["total", "", per_tile_disk, per_tile_f32, per_tile_disk / per_tile_f32]],
    )
    delivered = n_tiles * per_tile_f32  # float32 feature bytes every reader hands over per epoch
    reads = []
    for name in readers:
        best = min(times[name])
        reads.append({"reader": name, "seconds": times[name], "tiles_per_s": n_tiles / best,
                      "float32_MB_per_s": delivered / best / MB})
    base = reads[2]["tiles_per_s"]
    common.print_table(
        f"read throughput over all {n_tiles} tiles, batch {args.batch_size}, shuffled (best of {args.epochs}; "
        "MB/s = float32 features delivered)",
        ["reader", "tiles/s", "MB/s", "vs .npy float32"],
        [[r["reader"], r["tiles_per_s"], r["float32_MB_per_s"], r["tiles_per_s"] / base] for r in reads],
    )
    ratio = per_tile_disk / per_tile_f32
    print(f"\nsize on disk: {ratio:.3f}x raw float32 -> {common.verdict(ratio, 0.5, False)}")
    print(f"one-tile-per-read diagnostic: {reads[4]['tiles_per_s'] / reads[1]['tiles_per_s']:.1f}x the tiles/s of "
          "StoreLoader (prefetch=0)")
    print(f"StoreLoader reads at {reads[0]['tiles_per_s'] / base:.3f}x the tiles/s of raw float32 .npy "
          f"(.npy float32 would take {npy32_bytes / per_tile_disk:.1f}x the disk, "
          f"float16 {npy16_bytes / per_tile_disk:.2f}x)")
    common.save_json(
        args.json,
        {
            "benchmark": "cache_economics",
            "machine": machine,
            "store": str(store_path),
            "tiles": n_tiles,
            "extraction_s": extraction_s,
            "arrays": sizes,
            "bytes_per_tile_on_disk": per_tile_disk,
            "bytes_per_tile_float32": per_tile_f32,
            "ratio_to_float32": ratio,
            "npy_float32_bytes_per_tile": npy32_bytes,
            "npy_float16_bytes_per_tile": npy16_bytes,
            "batch_size": args.batch_size,
            "reads": reads,
        },
    )


if __name__ == "__main__":
    main()
