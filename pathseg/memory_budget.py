"""How much RAM a stage may fill with cached features: `train.memory_budget` read as bytes.

"auto" takes half of what the kernel reports as available when the run starts, so a head ablation
never pushes the machine into swap or the OOM killer, and leaves room for the page cache and for
whatever else runs beside it. A size ("6GB", "512MiB", "2.5G") or a byte count is taken as given;
0 or "off" always streams from the store.
"""

from __future__ import annotations

import os
import re

from pathseg.errors import PathsegError

AUTO_FRACTION = 0.5
UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
         "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def available_memory() -> int:
    """MemAvailable from /proc/meminfo (Linux); elsewhere the free physical pages the OS reports."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return 0


def parse_size(value: str | int | float, setting: str = "train.memory_budget") -> int:
    """Bytes of a size written as a number or with a unit; refuses anything else in one line."""
    if isinstance(value, bool):
        raise PathsegError(f"{setting} must be a size like 6GB, 512MiB or a byte count, not {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise PathsegError(f"{setting} must not be negative (got {value})")
        return int(value)
    text = str(value).strip().lower()
    if text in ("off", "none", "0"):
        return 0
    match = SIZE.match(text)
    if match is None or match.group(2) not in UNITS:
        raise PathsegError(
            f"{setting} must be 'auto', 'off', a byte count or a size like 6GB / 512MiB (got {value!r})"
        )
    return int(float(match.group(1)) * UNITS[match.group(2)])


def resolve_budget(value: str | int | float) -> int:
    """`train.memory_budget` in bytes; "auto" is half of the memory available now."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return int(available_memory() * AUTO_FRACTION)
    return parse_size(value)
