"""The compute an extraction cannot avoid, timed on its own: bare UNet forwards and first-stage encodes in the
runner's batch sizes, with the GPU synchronised around the clock, and the GPU's datasheet peak to compare with.

Kept apart from `extraction_overhead.py`, which times whole extractions against these.
"""

from __future__ import annotations

import time

import torch
from pathseg.extract import precision
from pathseg.extract.backbone import Backbone


def batch_plan(n_tiles: int, tiles_per_shard: int, batch_size: int) -> list[int]:
    """Batch sizes exactly as the runner forms them: batches never cross a shard boundary."""
    per_shard = max(1, min(tiles_per_shard, n_tiles))
    sizes = []
    for start in range(0, n_tiles, per_shard):
        stop = min(start + per_shard, n_tiles)
        sizes += [min(batch_size, stop - lo) for lo in range(start, stop, batch_size)]
    return sizes


# Dense fp16/bf16 tensor-core peaks from the vendors' datasheets (TFLOP/s, without sparsity); the first
# name contained in torch.cuda.get_device_name() wins, so the more specific names come first.
PEAK_16BIT_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4),
                     ("A100", 312.0), ("L40S", 362.1), ("A10G", 70.0)]


def synchronize(device: torch.device) -> None:
    """GPU work is asynchronous: a clock read is only meaningful once the device has caught up."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_tflops(device: torch.device, autocast: str, given: float | None) -> tuple[float | None, str]:
    if given is not None:
        return given, "--peak-tflops"
    if device.type != "cuda" or autocast == "off":
        return None, "unknown (CPU, or fp32 on a GPU: give --peak-tflops)"
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_16BIT_TFLOPS:
        if key in name:
            return tflops, f"{name}: dense fp16/bf16 datasheet peak"
    return None, f"{name}: not in the table, give --peak-tflops"


def bare_forward_pass(backbone: Backbone, inputs: list[tuple[torch.Tensor, torch.Tensor]], timesteps: list[int],
                      autocast: str) -> float:
    """The same UNet forwards as the extraction (one per timestep per tile), nothing else."""
    device = backbone.device
    synchronize(device)
    started = time.perf_counter()
    with torch.inference_mode(), precision.autocast_for(device, autocast):
        for zt, context in inputs:
            for timestep in timesteps:
                steps = torch.full((zt.shape[0],), timestep, dtype=torch.long, device=device)
                backbone.unet(zt, steps, encoder_hidden_states=context)
    synchronize(device)
    return time.perf_counter() - started


def encode_pass(backbone: Backbone, sizes: list[int], tile_size: int, autocast: str) -> float:
    """The first-stage encoder alone on random tiles of the same batch sizes (and layout) as the runner's."""
    device = backbone.device
    layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    images = [(torch.rand(size, 3, tile_size, tile_size, device=device) * 2.0 - 1.0).contiguous(memory_format=layout)
              for size in sizes]
    synchronize(device)
    started = time.perf_counter()
    with torch.inference_mode(), precision.autocast_for(device, autocast):
        for batch in images:
            backbone.encode(batch)
    synchronize(device)
    return time.perf_counter() - started
