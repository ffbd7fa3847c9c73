"""Which device extraction runs on and in what precision, and one precision per store.

Shared by the single-process runner, the dask workers (each answering for its own GPU) and predict.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from pathseg.errors import PathsegError
from pathseg.store import FeatureStore


def pick_device(name: str, setting: str = "extract.device") -> torch.device:
    """The torch device a setting names; `setting` is what the one-line error points at."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise PathsegError(f"{setting} {name!r} is not a torch device (try auto, cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PathsegError(f"{setting} is {name!r} but no CUDA GPU is visible; use auto or cpu")
    return device


def compute_dtype(device: torch.device, setting: str) -> torch.dtype:
    """bfloat16 on GPUs by default (fp32 accumulation, no overflow); exact fp32 on CPU unless asked.

    Never a silent float16: a GPU without bfloat16 (before Ampere) computes `auto` in float32, and an
    explicit `bfloat16` there is refused. float16 only when asked, since it also runs the full-resolution
    first-stage encoder in float16, where activations can overflow.
    """
    if setting == "off" or (setting == "auto" and device.type != "cuda"):
        return torch.float32
    if setting == "float16":
        return torch.float16
    if device.type == "cuda" and not _bf16_supported_on(device):
        if setting == "auto":
            return torch.float32
        raise PathsegError(
            f"extract.autocast is 'bfloat16' but {device} has no bfloat16 support; set extract.autocast to off "
            "(exact float32) or float16 (faster; runs the first-stage encoder in float16 too)"
        )
    return torch.bfloat16


def _bf16_supported_on(device: torch.device) -> bool:
    """On this GPU, not the current one: each dask worker answers for its own device."""
    if device.index is None:
        return torch.cuda.is_bf16_supported()
    with torch.cuda.device(device.index):
        return torch.cuda.is_bf16_supported()


def autocast_for(device: torch.device, setting: str):
    dtype = compute_dtype(device, setting)
    return nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)


def resolved_precision(device: torch.device, setting: str) -> str:
    """float32, bfloat16 or float16: what `extract.autocast` means on this device."""
    return str(compute_dtype(device, setting)).removeprefix("torch.")


def check_precision(store: FeatureStore, precision: str, setting: str, where: str) -> None:
    """One precision per store: features and z_0 computed under bfloat16 and float32 differ beyond fp16 storage.

    Not part of the fingerprint, because `auto` resolves by device and a store extracted on a GPU must
    still be found by fit-head on a CPU; instead the store records the precision its first computing
    run used, and a run that would compute in another one is refused.
    """
    recorded = store.compute_precision
    if recorded is None:
        store.record_compute_precision(precision)
    elif recorded != precision:
        raise PathsegError(
            f"{store.path} was computed in {recorded}; this run would compute in {precision} "
            f"(extract.autocast={setting!r} {where}); set extract.autocast to match, or use another "
            "--store / --overwrite"
        )
