"""How large do decoder activations get? Decides whether float16 storage can hold a backbone's features.

float16 holds |x| <= 65504; beyond that a stored value becomes inf and fit-head's BatchNorm turns it into
NaN logits. The store refuses such shards (issue 11, item 3); this measures how close real features come.
For every decoder block of the backbone and each timestep it runs the UNet (exactly as extraction does:
z_0, the seeded per-tile noise, the null context) over tiles of a real dataset and reports the largest
|value|, the 99.99th percentile of |value|, and the headroom to float16's maximum.

    python bench/activation_range.py --backbone paper-random --dataset glas \
        --data-root ../shared/data/glas --tiles 8 --timesteps 50,150,250,500,999 --json bench/results/x.json
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from _common import add_output_options, print_table, save_json, start
from pathseg.extract.backbone_sources import load_backbone
from pathseg.extract.blocks import FeatureCapture, block_table
from pathseg.extract.precision import autocast_for
from pathseg.extract.tiles import TileSource, plan_tiles, tile_noise

from pathseg.config import load_config
from pathseg.datasets import build_dataset

FLOAT16_MAX = float(np.finfo(np.float16).max)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="paper-random")
    parser.add_argument("--dataset", default="glas")
    parser.add_argument("--data-root", default="../shared/data/glas")
    parser.add_argument("--tiles", type=int, default=8, help="tiles measured, spread evenly over the dataset")
    parser.add_argument("--timesteps", default="50,150,250,500,999")
    parser.add_argument("--autocast", default="off", help="off (float32) | bfloat16: the precision computed in")
    parser.add_argument("--batch-size", type=int, default=2)
    add_output_options(parser, "nothing")
    args = parser.parse_args()
    machine = start()

    config = load_config(None, {"dataset.name": args.dataset, "dataset.root": args.data_root,
                                "backbone.name": args.backbone})
    records = build_dataset(config.dataset).records()
    t = config.tiling
    entries, _ = plan_tiles(records, t.tile_size, t.stride)
    source = TileSource(records, entries, t.tile_size, t.stride, t.pad_mode)
    total = len(source.origins)
    picked = np.unique(np.linspace(0, total - 1, args.tiles).round().astype(int))
    backbone = load_backbone(args.backbone)
    blocks = [name for name in block_table(backbone.unet)]
    capture = FeatureCapture(backbone.unet, blocks)
    timesteps = [int(x) for x in args.timesteps.split(",")]
    device = torch.device("cpu")
    largest: dict[tuple[int, str], float] = {}
    quantile: dict[tuple[int, str], list[float]] = {}
    started = time.perf_counter()
    for first in range(0, len(picked), args.batch_size):
        chosen = picked[first : first + args.batch_size]
        pixels = np.stack([source.tiles(int(i), int(i) + 1)[0] for i in chosen])
        images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0
        keys = [source.noise_keys(int(i), int(i) + 1)[0] for i in chosen]
        with torch.inference_mode(), autocast_for(device, args.autocast):
            z0 = backbone.encode(images * 2 - 1).float()
            noise = tile_noise(config.extract.noise_seed, keys, tuple(z0.shape[1:]))
            context = backbone.projector.null_context(len(chosen))
            for timestep in timesteps:
                abar = backbone.scheduler.alphas_cumprod[timestep]
                zt = abar.sqrt() * z0 + (1 - abar).sqrt() * noise
                out = capture(zt, torch.full((len(chosen),), timestep), context)
                for block, value in out.items():
                    magnitude = value.float().abs()
                    key = (timestep, block)
                    largest[key] = max(largest.get(key, 0.0), float(magnitude.max()))
                    quantile.setdefault(key, []).append(float(torch.quantile(magnitude.flatten()[::7], 0.9999)))
    seconds = time.perf_counter() - started
    rows, results = [], []
    for (timestep, block), peak in sorted(largest.items(), key=lambda kv: (kv[0][0], blocks.index(kv[0][1]))):
        q = max(quantile[(timestep, block)])
        rows.append([timestep, block, f"{peak:.4g}", f"{q:.4g}", f"{FLOAT16_MAX / peak:.3g}x"])
        results.append({"timestep": timestep, "block": block, "max_abs": peak, "p99_99_abs": q,
                        "float16_headroom": FLOAT16_MAX / peak})
    print_table(f"{args.backbone}: |activation| over {len(picked)} {args.dataset} tiles ({args.autocast})",
                ["t", "block", "max |x|", "p99.99 |x|", "float16 headroom"], rows)
    overall = max(largest.values())
    print(f"largest |x| anywhere: {overall:.4g}; float16 headroom {FLOAT16_MAX / overall:.3g}x; {seconds:.0f} s")
    save_json(args.json, {"machine": machine, "args": vars(args), "tiles": picked.tolist(), "seconds": seconds,
                          "results": results, "largest": overall})


if __name__ == "__main__":
    main()
