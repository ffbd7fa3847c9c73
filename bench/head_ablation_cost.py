"""What does one head-ablation epoch cost from the cache, against recomputing the features every batch?

The two-stage design bets that a head ablation from cached features is far cheaper than one that
runs the frozen backbone on every batch (target: >= 50x for the paper-sized backbone). Per
backbone this benchmark

  1. extracts a small "seed" store with `run_extraction` (real features of this backbone);
  2. lays out a store of the real number of training tiles (default 1062: GlaS train at 256/192)
     by repeating the seed images and their features, so size and compressibility are real;
  3. times one training epoch from that store (StoreLoader + SegmentationHead + AdamW, the steps
     of `fit_head`), and one whole `fit_head(..., train.epochs=1)` call;
  4. times one epoch over a few tiles that instead recomputes the features for every batch
     (first-stage encode, then `FeatureCapture(unet, blocks)` per timestep, then the same head
     step), and extrapolates it per tile to the real number of tiles.

For paper-random on a CPU the recompute epoch runs on a handful of tiles only (seconds per tile);
its per-tile cost is extrapolated linearly, which is fair for a per-tile workload but says nothing
of GPU batching. The cached epoch is measured on all tiles.

    python bench/head_ablation_cost.py
    python bench/head_ablation_cost.py --backbones tiny --cached-tiles 256 --json out.json
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import _common as common
import numpy as np
import torch
from pathseg.extract.backbone import Backbone
from pathseg.extract.backbone_sources import load_backbone
from pathseg.extract.blocks import FeatureCapture
from pathseg.extract.runner import run_extraction
from pathseg.extract.tiles import TileSource, tile_noise
from pathseg.train_head.fit import fit_head, segmentation_loss
from pathseg.train_head.head import SegmentationHead
from pathseg.train_head.loader import StoreLoader

from pathseg.config import PipelineConfig
from pathseg.datasets import build_dataset
from pathseg.store import FeatureStore, ImageEntry, digest
from pathseg.store import feature_store as store_module

PRESETS = {
    # backbone: (seed images, image HxW, recompute tiles by default)
    "tiny": (4, (288, 352), 16),
    "paper-random": (1, (256, 256), 4),
}


@contextmanager
def without_fsync() -> Iterator[None]:
    """The replica is scratch data: skip the store's durability fsyncs while laying it out.

    `FeatureStore.write_image` fsyncs the whole `tiles/labels` and `images/done` trees after every
    image, so laying out N images costs O(N x tiles) fsyncs (see docs/benchmarks.md); on this
    machine that made a 266-image replica take minutes. What is timed later (reads) is unaffected.
    """
    names = ("_fsync_tree", "_fsync_file", "_fsync_dir")
    saved = {name: getattr(store_module, name) for name in names if hasattr(store_module, name)}
    for name in saved:
        setattr(store_module, name, lambda _path: None)
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(store_module, name, function)


def replicate_store(seed: FeatureStore, path: Path, tiles_wanted: int) -> FeatureStore:
    """A store of at least `tiles_wanted` tiles: the seed's images repeated, with their labels and features."""
    with without_fsync():
        return _replicate(seed, path, tiles_wanted)


def _replicate(seed: FeatureStore, path: Path, tiles_wanted: int) -> FeatureStore:
    copies = math.ceil(tiles_wanted / seed.n_tiles)
    n_seed = seed.n_tiles
    entries = [
        ImageEntry(**{**entry.__dict__, "id": f"{entry.id}#{k}", "split": "train",
                      "first_tile": k * n_seed + entry.first_tile})
        for k in range(copies)
        for entry in seed.images
    ]
    attrs = seed.attrs
    identity = {**attrs["identity"], "benchmark_replica": {"of": seed.fingerprint, "copies": copies}}
    big = FeatureStore.create(
        common.fresh(path),
        fingerprint=digest(identity),
        identity=identity,
        config=attrs["config"],
        class_names=seed.class_names,
        ignore_index=seed.ignore_index,
        tile_size=seed.tile_size,
        stride=seed.stride,
        images=entries,
        origins=np.tile(seed.tile_origins(), (copies, 1)),
        has_instances=seed.has_instances,
        compression_level=int(attrs["compression_level"]),
        tiles_per_shard=seed.tiles_per_shard,
    )
    big.record_block_aliases(attrs.get("block_aliases", {}))
    seed_images = [
        (seed.image_rgb(i), seed.image_labels(i), seed.image_instances(i),
         seed.tile_labels(slice(e.first_tile, e.first_tile + e.n_tiles)))
        for i, e in enumerate(seed.images)
    ]
    for index in range(len(entries)):
        big.write_image(index, *seed_images[index % len(seed_images)])
    for info in seed.feature_infos():
        big.ensure_feature(info.timestep, info.block, info.channels, info.height, info.width)
        features = seed.read_features(info.timestep, info.block, slice(None))
        for shard in range(big.n_shards):
            start, stop = big.shard_range(shard)
            big.write_shard(info.timestep, info.block, shard, features[np.arange(start, stop) % n_seed])
    return big


def build_head(config: PipelineConfig, in_channels: list[int], classes: int) -> SegmentationHead:
    h = config.head
    return SegmentationHead(in_channels, classes, h.width, h.depth, h.dropout, h.projection_width)


def head_step(head: SegmentationHead, optimizer: torch.optim.Optimizer, features: list[torch.Tensor],
              labels: torch.Tensor, tile_size: int, config: PipelineConfig, ignore_index: int | None) -> float:
    """The training step of `fit_head` (minus the LR scheduler, which costs nothing measurable)."""
    logits = head(features, tile_size)
    loss = segmentation_loss(logits, labels, config.train.loss, ignore_index)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.item())


def cached_epoch(store: FeatureStore, config: PipelineConfig, pairs: list[tuple[int, str]]) -> tuple[float, float]:
    """One training epoch over the store's train tiles; (total s, of which in the head step)."""
    tiles = store.tiles_of_splits(["train"])
    torch.manual_seed(0)
    head = build_head(config, [store.feature_array(t, b).shape[1] for t, b in pairs], len(store.class_names))
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.train.lr, weight_decay=config.train.weight_decay)
    loader = StoreLoader(store, pairs, tiles, config.train.batch_size, shuffle=True, augment=config.train.augment,
                         seed=0, prefetch=config.train.prefetch)
    head.train()
    in_head = 0.0
    started = time.perf_counter()
    for batch in loader:
        stepping = time.perf_counter()
        head_step(head, optimizer, batch.features, batch.labels, store.tile_size, config, store.ignore_index)
        in_head += time.perf_counter() - stepping
    return time.perf_counter() - started, in_head


def recompute_epoch(store: FeatureStore, config: PipelineConfig, pairs: list[tuple[int, str]], backbone: Backbone,
                    tiles: np.ndarray) -> tuple[float, float]:
    """One epoch over `tiles` computing every batch's features with the backbone; (total s, backbone s)."""
    records = build_dataset(config.dataset).records()
    t = config.tiling
    source = TileSource(records, store.images, t.tile_size, t.stride, t.pad_mode)
    latent = t.tile_size // 4
    blocks = list(dict.fromkeys(b for _, b in pairs))
    timesteps = list(dict.fromkeys(ts for ts, _ in pairs))
    alphas = backbone.scheduler.alphas_cumprod.to(torch.float32)
    capture = FeatureCapture(backbone.unet, blocks)
    torch.manual_seed(0)
    head = build_head(config, [store.feature_array(ts, b).shape[1] for ts, b in pairs], len(store.class_names))
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.train.lr, weight_decay=config.train.weight_decay)
    head.train()
    rng = np.random.default_rng(0)
    order = tiles[rng.permutation(len(tiles))]
    backbone_s = 0.0
    started = time.perf_counter()
    for lo in range(0, len(order), config.train.batch_size):
        group = np.sort(order[lo : lo + config.train.batch_size])
        computing = time.perf_counter()
        rgb = np.concatenate([source.tiles(int(i), int(i) + 1) for i in group])
        noise = tile_noise(config.extract.noise_seed, sum((source.noise_keys(int(i), int(i) + 1) for i in group), []),
                           (3, latent, latent))
        with torch.no_grad():
            images01 = torch.from_numpy(rgb).permute(0, 3, 1, 2).float().div_(255.0)
            z0 = backbone.encode(images01 * 2.0 - 1.0).float()
            context = backbone.projector.null_context(len(group))
            maps: dict[tuple[int, str], torch.Tensor] = {}
            for timestep in timesteps:
                zt = alphas[timestep].sqrt() * z0 + (1.0 - alphas[timestep]).sqrt() * noise
                steps = torch.full((len(group),), timestep, dtype=torch.long)
                for block, value in capture(zt, steps, context).items():
                    maps[(timestep, block)] = value.float()
        backbone_s += time.perf_counter() - computing
        features = [maps[pair] for pair in pairs]
        labels = torch.from_numpy(store.tile_labels(group).astype(np.int64))
        if config.train.augment:  # the loader's dihedral augmentation, on tensors
            for i in range(len(group)):
                k, flip = int(rng.integers(4)), bool(rng.integers(2))
                for f in [*features, labels]:
                    rotated = torch.rot90(f[i], k, dims=(-2, -1))
                    f[i] = rotated.flip(-1) if flip else rotated
        head_step(head, optimizer, features, labels, store.tile_size, config, store.ignore_index)
    return time.perf_counter() - started, backbone_s


def run_case(name: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    images, (height, width), default_recompute = PRESETS[name]
    images = args.seed_images or images
    config = common.synthetic_config(
        workdir / name,
        {
            "backbone.name": name,
            "dataset.synthetic.train": images,
            "dataset.synthetic.height": height,
            "dataset.synthetic.width": width,
            "tiling.tile_size": 256,
            "tiling.stride": 192,
            "extract.timesteps": [int(t) for t in args.timesteps.split(",")],
            "extract.blocks": [b.strip() for b in args.blocks.split(",")],
            "extract.batch_size": args.batch_size,
            "train.batch_size": args.batch_size,
            "train.epochs": 1,
        },
    )
    seed_path = common.fresh(workdir / f"{name}-seed.zarr")
    print(f"\n[{name}] extracting the seed store ...", flush=True)
    seed_s, summary = common.timed(lambda: run_extraction(config, show_progress=False, store_path=seed_path))
    seed = FeatureStore.open(seed_path)
    pairs = [(ts, b) for ts in config.extract.timesteps for b in dict.fromkeys(config.extract.blocks)]
    print(f"  seed: {seed.n_tiles} tiles in {seed_s:.1f} s; replicating to >= {args.cached_tiles} tiles ...",
          flush=True)
    write_s, big = common.timed(lambda: replicate_store(seed, workdir / f"{name}-cached.zarr", args.cached_tiles))
    big_bytes = common.bytes_under(big.path / "features")
    print(f"  cached store: {big.n_tiles} tiles, {big_bytes / 1e9:.2f} GB of features, written in {write_s:.1f} s",
          flush=True)

    cached_runs = [cached_epoch(big, config, pairs) for _ in range(args.repeats)]
    cached = [total for total, _ in cached_runs]
    cached_head = min(cached_runs)[1]
    print(f"  cached epoch(s): {[round(s, 2) for s in cached]} s (head step {cached_head:.1f} s, the rest waits on "
          "the loader)", flush=True)
    fit_s = None
    if name in [b.strip() for b in args.fit_head_backbones.split(",")]:
        fit_s, _ = common.timed(lambda: fit_head(config, store_path=big.path, run_dir=workdir / f"{name}-run",
                                                 show_progress=False))
        print(f"  fit_head(train.epochs=1): {fit_s:.1f} s", flush=True)

    backbone = load_backbone(name, None, config.backbone.seed)
    n_recompute = min(args.recompute_tiles or default_recompute, seed.n_tiles)
    recompute_tiles = np.arange(n_recompute)
    recompute_epoch(seed, config, pairs, backbone, recompute_tiles[: min(2, n_recompute)])  # warm-up
    recompute_s, backbone_s = recompute_epoch(seed, config, pairs, backbone, recompute_tiles)
    print(f"  recompute epoch on {n_recompute} tiles: {recompute_s:.1f} s (backbone {backbone_s:.1f} s)", flush=True)
    del backbone

    n = big.n_tiles
    cached_best = min(cached)
    recompute_per_tile = recompute_s / n_recompute
    recompute_epoch_s = recompute_per_tile * n
    common.fresh(big.path)
    return {
        "backbone": name,
        "pairs": pairs,
        "batch_size": args.batch_size,
        "seed_tiles": seed.n_tiles,
        "seed_extraction_s": seed_s,
        "cached_tiles": n,
        "cached_feature_bytes": big_bytes,
        "cached_store_write_s": write_s,
        "cached_epoch_s": cached,
        "cached_epoch_head_step_s": cached_head,
        "cached_epoch_loader_wait_s": min(cached) - cached_head,
        "ratio_if_reads_were_free": recompute_epoch_s / cached_head,
        "fit_head_one_epoch_s": fit_s,
        "recompute_tiles_measured": n_recompute,
        "recompute_measured_s": recompute_s,
        "recompute_backbone_s": backbone_s,
        "recompute_s_per_tile": recompute_per_tile,
        "cached_s_per_tile": cached_best / n,
        "recompute_epoch_s_extrapolated": recompute_epoch_s,
        "ratio": recompute_epoch_s / cached_best,
        "ratio_vs_fit_head": recompute_epoch_s / fit_s if fit_s else None,
        "recompute_extrapolated": n_recompute < n,
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--backbones", default="tiny,paper-random")
    parser.add_argument("--cached-tiles", type=int, default=1062,
                        help="training tiles of the cached epoch (1062 = GlaS train split at 256/192)")
    parser.add_argument("--recompute-tiles", type=int, default=None,
                        help="tiles of the measured recompute epoch (default: tiny 16, paper-random 4)")
    parser.add_argument("--seed-images", type=int, default=None,
                        help="synthetic images extracted for real (default: tiny 4 of 288x352, paper-random 1 "
                        "of 256x256; 4 tiles each)")
    parser.add_argument("--timesteps", default="50,150,250")
    parser.add_argument("--blocks", default="up1,up2.2,up3.2")
    parser.add_argument("--batch-size", type=int, default=8, help="train.batch_size (and extract.batch_size)")
    parser.add_argument("--repeats", type=int, default=1, help="cached epochs to time (best kept)")
    parser.add_argument("--fit-head-backbones", default="tiny",
                        help="backbones whose cached store is also timed through a whole fit_head call "
                        "(comma-separated; empty: none)")
    common.add_output_options(parser, "stores")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    machine = common.start()
    results = []
    with common.work_directory(args.workdir, "pathseg-bench-ablation-") as workdir:
        for name in [b.strip() for b in args.backbones.split(",") if b.strip()]:
            if name not in PRESETS:
                raise SystemExit(f"unknown backbone {name!r}; use tiny or paper-random")
            results.append(run_case(name, args, workdir))

    common.print_table(
        "one head-training epoch: cached features vs recomputing them every batch (target >= 50x for paper-random)",
        ["backbone", "tiles", "cached epoch s", "fit_head 1 epoch s", "recompute s/tile (tiles measured)",
         "recompute epoch s", "ratio", "ratio vs fit_head", "cached: head step s", "cached: loader wait s"],
        [[r["backbone"], r["cached_tiles"], min(r["cached_epoch_s"]), r["fit_head_one_epoch_s"] or "-",
          f"{r['recompute_s_per_tile']:.3g} ({r['recompute_tiles_measured']})",
          f"{r['recompute_epoch_s_extrapolated']:,.0f}" + (" (extrapolated)" if r["recompute_extrapolated"] else ""),
          r["ratio"], r["ratio_vs_fit_head"] or "-", r["cached_epoch_head_step_s"], r["cached_epoch_loader_wait_s"]]
         for r in results],
    )
    for r in results:
        target = common.verdict(r["ratio"], 50, True) if r["backbone"] == "paper-random" else "(no target)"
        print(f"{r['backbone']}: cached {r['cached_s_per_tile'] * 1e3:.1f} ms/tile, recompute "
              f"{r['recompute_s_per_tile'] * 1e3:.0f} ms/tile, ratio {r['ratio']:.1f}x {target}; with reads for free "
              f"(head step only) {r['ratio_if_reads_were_free']:.1f}x")
    common.save_json(args.json, {"benchmark": "head_ablation_cost", "machine": machine, "results": results})


if __name__ == "__main__":
    main()
