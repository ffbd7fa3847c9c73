"""How close is a whole extraction to the cost of the UNet forwards it cannot avoid?

Stage 1 exists to pay for the backbone once. Everything it does besides the UNet forward (reading
and tiling images, the first-stage encoder, hooks, float16 conversion, zstd, Zarr writes, the
per-run backbone build) is overhead on that cost. This benchmark runs
`pathseg.extract.runner.run_extraction` into fresh stores and, on the same tiles and batch size,
the bare `backbone.unet(zt, t, encoder_hidden_states=context)` forward (one per timestep per tile),
interleaved so that both see the same machine load, and reports

    ratio = extraction tiles/s / bare-forward tiles/s        (target >= 0.9)

plus where the extraction's time went (patched-in timers, restored after each run), the
first-stage encoding per tile on its own (part of extraction, not of the bare forward), and the
ratio without the fixed per-run costs (backbone build, image table) and without the encoder.

The encoder runs once per tile and the UNet once per tile per timestep, so their FLOP counts
(`pathseg backbone info`) bound the ratio whatever the pipeline does: the "FLOP ceiling" is
T x UNet / (encoder + T x UNet) for T timesteps. The script also reports the ratio against the
compute a first extraction cannot avoid (bare UNet forwards + bare encoder), and the FLOP rate the
bare forward and the whole extraction reach; with --device cuda, their fraction of the GPU's peak
(dense fp16/bf16 tensor-core TFLOP/s, looked up from the device name or given with --peak-tflops).

    python bench/extraction_overhead.py                       # tiny and paper-random, a few minutes on 2 cores
    python bench/extraction_overhead.py --backbones tiny --tiny-images 8 --json out.json
    python bench/extraction_overhead.py --backbones paper-random --paper-autocast bfloat16
    python bench/extraction_overhead.py --device cuda --backbones paper-random --paper-autocast bfloat16 \
        --paper-images 16 --paper-size 512x512 --paper-tile 256/256 --paper-timesteps 50,150,250 --paper-batch 32 \
        --paper-tiles-per-shard 64   # batches never cross a shard
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _common as common
import torch
from _bare_forwards import bare_forward_pass, batch_plan, encode_pass, peak_tflops
from pathseg.extract import backbone as backbone_module
from pathseg.extract import extractor, precision, runner
from pathseg.extract.backbone import Backbone
from pathseg.extract.backbone_info import compute_per_tile
from pathseg.extract.backbone_sources import load_backbone
from pathseg.extract.tiles import TileSource, plan_tiles

from pathseg.config import PipelineConfig
from pathseg.datasets import build_dataset
from pathseg.store import FeatureStore


@dataclass
class Case:
    """One backbone and the synthetic data it runs on."""

    backbone: str
    images: int
    height: int
    width: int
    tile_size: int
    stride: int
    timesteps: list[int]
    blocks: list[str]
    batch_size: int
    tiles_per_shard: int
    autocast: str
    device: str = "cpu"
    compile: bool = False

    def overrides(self) -> dict[str, Any]:
        return {
            "backbone.name": self.backbone,
            "dataset.synthetic.train": self.images,
            "dataset.synthetic.height": self.height,
            "dataset.synthetic.width": self.width,
            "tiling.tile_size": self.tile_size,
            "tiling.stride": self.stride,
            "extract.timesteps": self.timesteps,
            "extract.blocks": self.blocks,
            "extract.batch_size": self.batch_size,
            "extract.tiles_per_shard": self.tiles_per_shard,
            "extract.autocast": self.autocast,
            "extract.device": self.device,
            "extract.compile": self.compile,
        }


class Probe:
    """Wall time spent inside chosen functions while it is active (patched in, restored on exit)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    @contextmanager
    def patched(self, targets: list[tuple[object, str, str]]) -> Iterator[Probe]:
        undo = []
        for owner, attribute, label in targets:
            original = getattr(owner, attribute)
            setattr(owner, attribute, self._timer(original, label))
            undo.append((owner, attribute, original))
        try:
            yield self
        finally:
            for owner, attribute, original in reversed(undo):
                setattr(owner, attribute, original)

    def _timer(self, function: Callable, label: str) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - started
                self.calls[label] += 1

        return timed


PROBES = [
    (runner, "load_backbone", "backbone build"),
    (backbone_module, "state_digest", "  of which weight hashing"),
    (runner, "_prepare_images", "image table (rgb, labels)"),
    (TileSource, "tiles", "tile cutting (reader thread)"),
    (extractor, "tile_noise", "per-tile noise (reader thread)"),
    (extractor.Extractor, "features", "features() total"),
    (Backbone, "encode", "  of which first-stage encode"),
    (FeatureStore, "write_shard", "shard writes (writer thread)"),
]


def timed_extraction(config: PipelineConfig, store: Path) -> tuple[float, dict[str, float]]:
    probe = Probe()
    with probe.patched(PROBES):
        seconds, summary = common.timed(
            lambda: runner.run_extraction(config, show_progress=False, store_path=common.fresh(store))
        )
    if summary.computed_tiles == 0:
        raise RuntimeError(f"{store}: the extraction computed nothing; the store was not fresh")
    return seconds, dict(probe.seconds)


def timed_extension(config: PipelineConfig, extended: PipelineConfig, store: Path) -> tuple[float, float]:
    """Extend a freshly extracted store by one timestep: z_0 is read back, the encoder does not run.

    Returns (seconds of the extension, seconds of its backbone build).
    """
    runner.run_extraction(config, show_progress=False, store_path=common.fresh(store))
    probe = Probe()
    with probe.patched(PROBES):
        seconds, summary = common.timed(lambda: runner.run_extraction(extended, show_progress=False,
                                                                      store_path=store))
    if summary.computed_tiles == 0 or probe.calls.get("  of which first-stage encode"):
        raise RuntimeError(f"{store}: the extension computed nothing, or re-ran the encoder")
    return seconds, probe.seconds.get("backbone build", 0.0)


def run_case(case: Case, workdir: Path, repeats: int, seed: int, given_peak: float | None) -> dict[str, Any]:
    config = common.synthetic_config(workdir, case.overrides())
    device = precision.pick_device(case.device)
    cost = compute_per_tile(case.backbone, None, case.tile_size)
    records = build_dataset(config.dataset).records()
    _, origins = plan_tiles(records, case.tile_size, case.stride)
    n_tiles = len(origins)
    sizes = batch_plan(n_tiles, case.tiles_per_shard, case.batch_size)
    forwards = n_tiles * len(case.timesteps)
    print(f"\n[{case.backbone}] {n_tiles} tiles of {case.tile_size} px, timesteps {case.timesteps}, blocks "
          f"{case.blocks}, batches {sizes}, autocast {case.autocast}: {forwards} UNet forwards per pass", flush=True)

    store = workdir / f"{case.backbone}.zarr"
    cold, _ = timed_extraction(config, store)  # warm-up: first-touch allocations, imports, page cache
    print(f"  warm-up extraction {cold:.1f} s", flush=True)

    build_seconds, backbone = common.timed(lambda: load_backbone(case.backbone, None, seed))
    # The same placement, layout and compilation as the runner gives its backbone.
    backbone = extractor.prepare_for_device(backbone, device, case.compile)
    generator = torch.Generator().manual_seed(seed)
    latent = case.tile_size // 4
    inputs = [
        (torch.randn(size, 3, latent, latent, generator=generator).to(device),
         backbone.projector.null_context(size).detach())
        for size in sizes
    ]
    bare_forward_pass(backbone, inputs[:1], case.timesteps[:1], case.autocast)  # warm-up forward

    bare, extraction, encode, breakdowns = [], [], [], []
    for repeat in range(repeats):
        bare.append(bare_forward_pass(backbone, inputs, case.timesteps, case.autocast))
        seconds, breakdown = timed_extraction(config, store)
        extraction.append(seconds)
        breakdowns.append(breakdown)
        encode.append(encode_pass(backbone, sizes, case.tile_size, case.autocast))
        print(f"  repeat {repeat + 1}/{repeats}: bare {bare[-1]:.2f} s, extraction {extraction[-1]:.2f} s, "
              f"encode alone {encode[-1]:.2f} s", flush=True)
    new_timestep = max(case.timesteps) + 100
    extended = common.synthetic_config(workdir, {**case.overrides(), "extract.timesteps": [*case.timesteps,
                                                                                           new_timestep]})
    extension, extension_bare, extension_build = [], [], []
    for _ in range(repeats):
        extension_bare.append(bare_forward_pass(backbone, inputs, [new_timestep], case.autocast))
        seconds, build = timed_extension(config, extended, store)
        extension.append(seconds)
        extension_build.append(build)
        print(f"  extension by t={new_timestep}: bare {extension_bare[-1]:.2f} s, extraction {seconds:.2f} s "
              f"(backbone build {build:.2f} s)", flush=True)
    common.fresh(store)
    del backbone

    best = min(range(repeats), key=lambda k: extraction[k])
    breakdown = breakdowns[best]
    ext_s, bare_s = extraction[best], min(bare)
    fixed = breakdown.get("backbone build", 0.0) + breakdown.get("image table (rgb, labels)", 0.0)
    in_run_encode = breakdown.get("  of which first-stage encode", 0.0)
    bare_tps = n_tiles / bare_s
    ext_tps = n_tiles / ext_s
    steady_tps = n_tiles / (ext_s - fixed)
    no_encode_tps = n_tiles / (ext_s - fixed - in_run_encode)
    unavoidable_s = bare_s + min(encode)
    forward_flops = forwards * cost.unet_flops
    extraction_flops = n_tiles * cost.first_extraction_flops(len(case.timesteps))
    peak, peak_source = peak_tflops(device, case.autocast, given_peak)
    bare_tflops = forward_flops / bare_s / 1e12
    steady_tflops = extraction_flops / (ext_s - fixed) / 1e12
    return {
        "case": case.__dict__,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "compute_per_tile": cost.as_dict(timesteps=(len(case.timesteps),)),
        "flop_ceiling": cost.unet_share(len(case.timesteps)),
        "ratio_vs_unet_plus_encoder": unavoidable_s / (ext_s - fixed),
        "bare_forward_tflops": bare_tflops,
        "extraction_tflops_without_fixed_costs": steady_tflops,
        "peak_tflops": peak,
        "peak_source": peak_source,
        "bare_forward_fraction_of_peak": bare_tflops / peak if peak else None,
        "extraction_fraction_of_peak": steady_tflops / peak if peak else None,
        "tiles": n_tiles,
        "unet_forwards": forwards,
        "batch_sizes": sizes,
        "bench_backbone_build_s": build_seconds,
        "warmup_extraction_s": cold,
        "bare_forward_s": bare,
        "extraction_s": extraction,
        "encode_alone_s": encode,
        "best_extraction_breakdown_s": breakdown,
        "bare_tiles_per_s": bare_tps,
        "extraction_tiles_per_s": ext_tps,
        "ratio": ext_tps / bare_tps,
        "steady_tiles_per_s": steady_tps,
        "ratio_without_fixed_costs": steady_tps / bare_tps,
        "ratio_without_fixed_costs_and_encode": no_encode_tps / bare_tps,
        "encode_s_per_tile_in_run": in_run_encode / n_tiles,
        "encode_s_per_tile_alone": min(encode) / n_tiles,
        "bare_forward_s_per_tile": bare_s / n_tiles,
        "extraction_s_per_tile": ext_s / n_tiles,
        "extension_timestep": new_timestep,
        "extension_s": extension,
        "extension_bare_forward_s": extension_bare,
        "extension_build_s": extension_build,
        "extension_ratio": min(extension_bare) / min(extension),
        "extension_ratio_without_build": min(extension_bare)
        / min(e - b for e, b in zip(extension, extension_build, strict=True)),
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--backbones", default="tiny,paper-random", help="comma-separated: tiny, paper-random")
    parser.add_argument("--blocks", default="up1,up2.2,up3.2", help="blocks extracted (both backbones)")
    parser.add_argument("--repeats", type=int, default=2, help="timed bare/extraction pairs per backbone (best kept)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny-images", type=int, default=4, help="synthetic images for tiny (4 tiles each)")
    parser.add_argument("--tiny-size", default="288x352", help="HxW of each synthetic image for tiny")
    parser.add_argument("--tiny-tile", default="256/192", help="tile_size/stride for tiny")
    parser.add_argument("--tiny-timesteps", default="50,150")
    parser.add_argument("--tiny-batch", type=int, default=8)
    parser.add_argument("--tiny-tiles-per-shard", type=int, default=8)
    parser.add_argument("--tiny-autocast", default="off", choices=["off", "auto", "bfloat16", "float16"])
    parser.add_argument("--paper-images", type=int, default=2, help="synthetic images for paper-random")
    parser.add_argument("--paper-size", default="128x256", help="HxW of each synthetic image for paper-random")
    parser.add_argument("--paper-tile", default="128/128", help="tile_size/stride for paper-random")
    parser.add_argument("--paper-timesteps", default="50")
    parser.add_argument("--paper-batch", type=int, default=2)
    parser.add_argument("--paper-tiles-per-shard", type=int, default=2)
    parser.add_argument("--paper-autocast", default="off", choices=["off", "auto", "bfloat16", "float16"],
                        help="extract.autocast for paper-random (and the bare forward); bfloat16 is not faster here")
    parser.add_argument("--device", default="cpu", help="extract.device for both cases: cpu, cuda, cuda:1, auto")
    parser.add_argument("--compile", action="store_true", help="extract.compile (torch.compile the UNet) for both")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's peak TFLOP/s at the precision measured (default: looked up for GPUs)")
    common.add_output_options(parser, "stores")
    return parser.parse_args()


def make_case(args: argparse.Namespace, prefix: str, backbone: str) -> Case:
    height, width = (int(v) for v in getattr(args, f"{prefix}_size").split("x"))
    tile, stride = (int(v) for v in getattr(args, f"{prefix}_tile").split("/"))
    return Case(
        backbone=backbone,
        images=getattr(args, f"{prefix}_images"),
        height=height,
        width=width,
        tile_size=tile,
        stride=stride,
        timesteps=[int(t) for t in getattr(args, f"{prefix}_timesteps").split(",")],
        blocks=[b.strip() for b in args.blocks.split(",")],
        batch_size=getattr(args, f"{prefix}_batch"),
        tiles_per_shard=getattr(args, f"{prefix}_tiles_per_shard"),
        autocast=getattr(args, f"{prefix}_autocast"),
        device=args.device,
        compile=args.compile,
    )


def main() -> None:
    args = parse_args()
    machine = common.start()
    prefixes = {"tiny": "tiny", "paper-random": "paper"}
    results = []
    with common.work_directory(args.workdir, "pathseg-bench-extract-") as workdir:
        for name in [b.strip() for b in args.backbones.split(",") if b.strip()]:
            if name not in prefixes:
                raise SystemExit(f"unknown backbone {name!r}; use tiny or paper-random")
            results.append(run_case(make_case(args, prefixes[name], name), workdir, args.repeats, args.seed,
                                    args.peak_tflops))

    common.print_table(
        "extraction vs bare UNet forward (best of repeats; ratio target >= 0.9)",
        ["backbone", "tiles", "forwards", "bare tiles/s", "extract tiles/s", "ratio", "ratio w/o build+images",
         "ratio w/o build+images+encode", "encode s/tile (alone)"],
        [[r["case"]["backbone"], r["tiles"], r["unet_forwards"], r["bare_tiles_per_s"], r["extraction_tiles_per_s"],
          r["ratio"], r["ratio_without_fixed_costs"], r["ratio_without_fixed_costs_and_encode"],
          f"{r['encode_s_per_tile_in_run']:.3g} ({r['encode_s_per_tile_alone']:.3g})"] for r in results],
    )
    common.print_table(
        "what the FLOPs allow: the encoder runs once per tile, the UNet once per tile per timestep",
        ["backbone", "encoder GFLOP/tile", "UNet GFLOP/forward", "timesteps", "FLOP ceiling",
         "ratio w/o build+images", "ratio vs bare UNet + bare encoder"],
        [[r["case"]["backbone"], r["compute_per_tile"]["first_stage_gflop"],
          r["compute_per_tile"]["unet_gflop_per_timestep"], len(r["case"]["timesteps"]), r["flop_ceiling"],
          r["ratio_without_fixed_costs"], r["ratio_vs_unet_plus_encoder"]] for r in results],
    )
    common.print_table(
        "FLOP rate (TFLOP/s; fraction of the peak where known)",
        ["backbone", "device", "autocast", "bare forward", "whole extraction w/o build+images", "peak", "bare/peak",
         "extraction/peak"],
        [[r["case"]["backbone"], r["device_name"], r["case"]["autocast"], r["bare_forward_tflops"],
          r["extraction_tflops_without_fixed_costs"], r["peak_tflops"] or "-",
          r["bare_forward_fraction_of_peak"] or "-", r["extraction_fraction_of_peak"] or "-"] for r in results],
    )
    for r in results:
        total = min(r["extraction_s"])
        parts = r["best_extraction_breakdown_s"]
        rows = [[label, seconds, 100.0 * seconds / total] for label, seconds in parts.items()]
        unet = parts.get("features() total", 0.0) - parts.get("  of which first-stage encode", 0.0)
        rows.append(["  features() minus encode (UNet+hooks+fp16)", unet, 100.0 * unet / total])
        other = total - sum(parts.get(k, 0.0) for k in ("backbone build", "image table (rgb, labels)",
                                                         "features() total"))
        rows.append(["rest of main thread (dataset, store setup, waits)", other, 100.0 * other / total])
        rows.append(["bare forward, same forwards", min(r["bare_forward_s"]), 100.0 * min(r["bare_forward_s"]) / total])
        rows.append(["whole extraction", total, 100.0])
        common.print_table(f"where the best {r['case']['backbone']} extraction spent its time "
                           "(writer thread overlaps the main thread)", ["part", "seconds", "% of extraction"], rows)
    common.print_table(
        "extending the store by one timestep (z_0 cached: no encoder, no image decoding) vs bare forward",
        ["backbone", "tiles", "bare s", "extension s", "ratio", "ratio w/o backbone build"],
        [[r["case"]["backbone"], r["tiles"], min(r["extension_bare_forward_s"]), min(r["extension_s"]),
          r["extension_ratio"], r["extension_ratio_without_build"]] for r in results],
    )
    for r in results:
        print(f"{r['case']['backbone']}: ratio {r['ratio']:.3f} -> {common.verdict(r['ratio'], 0.9, True)}; "
              f"extension ratio {r['extension_ratio']:.3f} -> {common.verdict(r['extension_ratio'], 0.9, True)}")
    common.save_json(args.json, {"benchmark": "extraction_overhead", "machine": machine, "results": results})


if __name__ == "__main__":
    main()
