"""What does the feature cache cost on disk, and how fast does stage 2 read it back?

The point of caching is that one extraction serves many head ablations; that only pays if the
cache is small enough to keep (target: <= 0.5x the bytes of raw float32 features) and reads back
fast enough not to starve the head. This benchmark extracts a small store with the tiny backbone
from synthetic data (or takes `--store`), then reports

  * bytes per tile on disk under `features/` (per (timestep, block) array and in total) against
    raw float32 (C*h*w*4 bytes per tile per array);
  * for each tile count in `--tiles` (the store's first N tiles), the read throughput of
    `pathseg.train_head.loader.StoreLoader`, shuffled, streaming from the store (prefetch=2) and serving
    epochs from RAM (`train.memory_budget`; the one-off load is timed apart), against the same batches
    fancy-indexed from raw `.npy` copies opened with `np.load(mmap_mode="r")` and converted to float32
    (float16 and float32 copies), and against the loader before issue 16 (`read_rows` per batch through
    zarr, in one thread), as a before/after in one run.

Targets (issue 16): streaming >= 0.5x and RAM epochs >= 0.9x the tiles/s of the float16 `.npy`.
Everything is read hot from the page cache: this measures decode cost, not the disk. Features of a
random-weight UNet are not those of a trained one, so a trained backbone's features may compress
somewhat differently; the float16 cast alone gives 0.5x, zstd adds what it can on top.

    python bench/cache_economics.py
    python bench/cache_economics.py --images 128 --tiles 32,512
    python bench/cache_economics.py --store cache/glas-tiny-XXXX.zarr --timesteps 50,150 --tiles 32,512
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
from pathseg.train_head.tile_sources import InMemoryFeatures, ShardSource, decode_threads

from pathseg.store import FeatureStore, feature_key
from pathseg.store.disk import read_rows

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


def write_npy(store: FeatureStore, pairs: list[tuple[int, str]], n_tiles: int, directory: Path,
              dtype: str) -> list[Path]:
    """One .npy per array (the first `n_tiles` tiles), plus their labels: the uncompressed alternative."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for timestep, block in pairs:
        path = directory / f"t{timestep:04d}_{block}.npy"
        np.save(path, read_rows(store.feature_array(timestep, block), slice(0, n_tiles)).astype(dtype))
        paths.append(path)
    labels = directory / "labels.npy"
    np.save(labels, np.asarray(store.group["tiles/labels"][:n_tiles]))
    return paths + [labels]


def store_pass(loader: StoreLoader, epoch: int) -> tuple[float, list[np.ndarray]]:
    """One epoch of a loader made once, as fit-head makes it (its buffers and threads outlive the epoch)."""
    loader.set_epoch(epoch)
    batches = []
    started = time.perf_counter()
    for batch in loader:
        batches.append(batch.tiles)
    return time.perf_counter() - started, batches


def before_pass(store: FeatureStore, pairs, batches: list[np.ndarray]) -> float:
    """The loader before issue 16, on the same batches: `read_rows` per array through zarr, one thread."""
    arrays = [store.feature_array(t, b) for t, b in pairs]
    labels = store.group["tiles/labels"]
    started = time.perf_counter()
    for tiles in batches:
        index = np.sort(tiles)
        [torch.from_numpy(read_rows(array, index).astype(np.float32)) for array in arrays]
        torch.from_numpy(read_rows(labels, index).astype(np.int64))
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


READERS = ["StoreLoader, streaming (prefetch=2)", "StoreLoader, epochs from RAM (prefetch=2)",
           "raw .npy float16 (mmap)", "raw .npy float32 (mmap)", "before issue 16: read_rows per batch (zarr)"]
BASELINE = "raw .npy float16 (mmap)"


def measure(store: FeatureStore, pairs, count: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Every reader over the first `count` tiles, interleaved epoch by epoch so load drifts hit all alike."""
    tiles = np.arange(count)
    npy32 = write_npy(store, pairs, count, workdir / f"npy32-{count}", "float32")
    npy16 = write_npy(store, pairs, count, workdir / f"npy16-{count}", "float16")
    source = ShardSource(store, pairs, True, decode_threads(0))
    ram_load_s, memory = common.timed(lambda: InMemoryFeatures.load(source, tiles))
    source.close()
    times: dict[str, list[float]] = {name: [] for name in READERS}
    streaming = StoreLoader(store, pairs, tiles, args.batch_size, shuffle=True, prefetch=2)
    in_ram = StoreLoader(store, pairs, tiles, args.batch_size, shuffle=True, prefetch=2, memory=memory)
    store_pass(streaming, 10_000)  # warm-up: page cache, zarr metadata, buffers
    store_pass(in_ram, 10_000)
    for epoch in range(args.epochs):
        seconds, batches = store_pass(streaming, epoch)
        times[READERS[0]].append(seconds)
        times[READERS[1]].append(store_pass(in_ram, epoch)[0])
        times[READERS[2]].append(npy_pass(npy16, batches))
        times[READERS[3]].append(npy_pass(npy32, batches))
        times[READERS[4]].append(before_pass(store, pairs, batches))
    per_tile_f32 = sum(int(np.prod(store.feature_array(t, b).shape[1:])) * 4 for t, b in pairs)
    reads = [{"reader": name, "seconds": times[name], "tiles_per_s": count / min(times[name]),
              "float32_MB_per_s": count * per_tile_f32 / min(times[name]) / MB} for name in READERS]
    rate = {r["reader"]: r["tiles_per_s"] for r in reads}
    return {
        "tiles": count,
        "ram_load_s": ram_load_s,
        "ram_bytes": memory.nbytes,
        "npy_float16_bytes_per_tile": sum(p.stat().st_size for p in npy16[:-1]) / count,
        "reads": reads,
        "ratios": {"stream": rate[READERS[0]] / rate[BASELINE], "ram": rate[READERS[1]] / rate[BASELINE],
                   "stream_vs_before": rate[READERS[0]] / rate[READERS[4]]},
    }


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
    parser.add_argument("--tiles", default="32,all", help="tile counts to time (the store's first N; all = every tile)")
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
        wanted_t = {int(t) for t in args.timesteps.split(",")}
        wanted_b = {b.strip() for b in args.blocks.split(",")}
        pairs = [(i.timestep, i.block) for i in sorted(store.feature_infos(), key=lambda i: (i.timestep, i.block))
                 if i.timestep in wanted_t and i.block in wanted_b]
        n_tiles = store.n_tiles
        sizes = array_sizes(store)
        per_tile_disk = sum(r["bytes_per_tile_on_disk"] for r in sizes)
        per_tile_f32 = sum(r["bytes_per_tile_float32"] for r in sizes)
        print(f"store {store_path}: {n_tiles} tiles, {len(pairs)} arrays", flush=True)

        counts = [n_tiles if c.strip() == "all" else min(int(c), n_tiles) for c in args.tiles.split(",")]
        measured = [measure(store, pairs, count, args, workdir) for count in counts]

    common.print_table(
        f"bytes per tile on disk ({n_tiles} tiles; target total <= 0.5x raw float32)",
        ["array", "C x h x w", "on disk B/tile", "raw float32 B/tile", "ratio"],
        [[r["array"], "x".join(map(str, r["shape_per_tile"])), r["bytes_per_tile_on_disk"],
          r["bytes_per_tile_float32"], r["ratio_to_float32"]] for r in sizes]
        + [["total", "", per_tile_disk, per_tile_f32, per_tile_disk / per_tile_f32]],
    )
    for result in measured:
        reads, base = result["reads"], result["reads"][READERS.index(BASELINE)]["tiles_per_s"]
        common.print_table(
            f"read throughput over {result['tiles']} tiles, batch {args.batch_size}, shuffled (best of {args.epochs}; "
            f"MB/s = float32 features delivered; RAM load {result['ram_load_s']:.2f} s once)",
            ["reader", "tiles/s", "MB/s", "vs .npy float16"],
            [[r["reader"], r["tiles_per_s"], r["float32_MB_per_s"], r["tiles_per_s"] / base] for r in reads],
        )
        stream, ram = result["ratios"]["stream"], result["ratios"]["ram"]
        print(f"{result['tiles']} tiles: streaming {stream:.2f}x .npy float16 -> {common.verdict(stream, 0.5, True)}; "
              f"RAM epochs {ram:.2f}x -> {common.verdict(ram, 0.9, True)}; "
              f"streaming is {result['ratios']['stream_vs_before']:.1f}x the loader before issue 16")
    ratio = per_tile_disk / per_tile_f32
    print(f"\nsize on disk: {ratio:.3f}x raw float32 -> {common.verdict(ratio, 0.5, False)}")
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
            "batch_size": args.batch_size,
            "decode_threads": decode_threads(0),
            "measured": measured,
        },
    )


if __name__ == "__main__":
    main()
