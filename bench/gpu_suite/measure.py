"""Clocks with limits, timers patched into pathseg's own functions, and readers of GPU and host memory and GPU load.

Every part runs pathseg's real code; what the suite adds is only observation: a timer around a function, a
progress callback that records when each batch or step ended (and stops the work once the part's time is up),
peak-memory counters reset before a step and read after it, and a thread sampling GPU utilisation.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


class LimitReached(Exception):  # noqa: N818 - a stop, not an error
    """Raised from inside pathseg's loops (through a patched progress callback) when a part's time is up."""


class Clock:
    """A part's time limit: work checks `left()` between batches, and stops rather than overruns."""

    def __init__(self, limit_s: float) -> None:
        self.limit_s = max(0.0, limit_s)
        self.started = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def left(self) -> float:
        return self.limit_s - self.elapsed()

    def expired(self) -> bool:
        return self.left() <= 0

    def share(self, fraction: float) -> Clock:
        """A clock for one step of this part: `fraction` of what is left, never past this clock's own end."""
        return Clock(max(0.0, self.left()) * min(max(fraction, 0.0), 1.0))


def synchronize(device: torch.device) -> None:
    """GPU work is asynchronous: a clock read means something only once the device has caught up."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Ticks:
    """When each unit of work (batch, step) ended, as reported through pathseg's progress callback."""

    times: list[float] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)

    @property
    def done(self) -> int:
        return sum(self.counts)


class Patches:
    """Attributes of pathseg's modules replaced for the duration of a `with`, always restored afterwards."""

    def __init__(self) -> None:
        self._undo: list[tuple[object, str, Any]] = []

    def replace(self, owner: object, name: str, value: Any) -> None:
        self._undo.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    def timer(self, owner: object, name: str, seconds: dict[str, float], label: str) -> None:
        """Wall time inside `owner.name` added to `seconds[label]` (calls from any thread)."""
        original = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                seconds[label] = seconds.get(label, 0.0) + time.perf_counter() - started

        self.replace(owner, name, timed)

    def progress(self, module: object, clock: Clock, ticks: Ticks | None, device: torch.device,
                 label: str | None = None) -> None:
        """`module.progress_bar` swapped for one whose `advance(n)` records a synchronised tick (of the loop whose
        description is `label`, or of every loop), and stops the work with LimitReached once `clock` has run out
        (the unit just finished counts)."""

        @contextmanager
        def limited(description: str, total: int, unit: str = "tiles", enabled: bool = True) -> Iterator:
            def advance(n: int = 1) -> None:
                if ticks is not None and label in (None, description):
                    synchronize(device)
                    ticks.times.append(time.perf_counter())
                    ticks.counts.append(int(n))
                if clock.expired():
                    raise LimitReached(f"{description}: stopped after {n} more {unit} of {total}")

            yield advance

        self.replace(module, "progress_bar", limited)

    def __enter__(self) -> Patches:
        return self

    def __exit__(self, *_exc: object) -> None:
        for owner, name, original in reversed(self._undo):
            setattr(owner, name, original)
        self._undo.clear()


class GpuMemory:
    """Peak GPU memory allocated by what runs inside the `with`, above what was allocated before it (None on CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.before = 0
        self.peak_bytes: int | None = None

    def __enter__(self) -> GpuMemory:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self.before

    @property
    def peak_gib(self) -> float | None:
        return None if self.peak_bytes is None else self.peak_bytes / 2**30


def _status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def reset_peak_rss() -> bool:
    """Lower this process's peak-RSS mark to its current RSS (Linux `clear_refs` 5), so the next peak read is the
    work's own; False where the kernel refuses (the peak is then the whole process's so far)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    peak, now = _status_kib("VmHWM"), _status_kib("VmRSS")
    return peak is not None and now is not None and peak <= now + 1024


def rss_mib() -> float | None:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib / 1024


def peak_rss_mib() -> float | None:
    kib = _status_kib("VmHWM")
    if kib is None:
        import resource

        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 1024


class UtilSampler:
    """GPU utilisation (%, the driver's busy fraction) polled in a thread: pynvml when importable, else nvidia-smi.

    `mean(t0, t1)` averages the samples taken between two perf_counter() times; None on CPU or with no reader.
    """

    def __init__(self, device: torch.device, interval_s: float = 0.1) -> None:
        self.device = device
        self.interval_s = interval_s
        self.samples: list[tuple[float, float]] = []
        self.source: str | None = None
        self._read: Callable[[], float] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if device.type == "cuda":
            self._read = self._nvml() or self._smi()

    def _nvml(self) -> Callable[[], float] | None:
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(self.device.index or 0)
            pynvml.nvmlDeviceGetUtilizationRates(handle)
        except Exception:  # noqa: BLE001 - no library, no driver: fall back to nvidia-smi
            return None
        self.source = "pynvml"
        return lambda: float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)

    def _smi(self) -> Callable[[], float] | None:
        command = ["nvidia-smi", f"--id={self.device.index or 0}", "--query-gpu=utilization.gpu",
                   "--format=csv,noheader,nounits"]

        def read() -> float:
            done = subprocess.run(command, capture_output=True, text=True, timeout=5, check=True)
            return float(done.stdout.split()[0])

        try:
            read()
        except (OSError, ValueError, IndexError, subprocess.SubprocessError):
            return None
        self.source = "nvidia-smi"
        self.interval_s = max(self.interval_s, 0.2)  # each call costs tens of ms
        return read

    def __enter__(self) -> UtilSampler:
        if self._read is not None:
            self._thread = threading.Thread(target=self._poll, name="gpu-suite-util", daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.perf_counter(), self._read()))
            except Exception:  # noqa: BLE001 - a failed read is a missing sample, not a failed suite
                pass
            self._stop.wait(self.interval_s)

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def mean(self, t0: float, t1: float) -> float | None:
        inside = [value for when, value in self.samples if t0 <= when <= t1]
        return sum(inside) / len(inside) if inside else None
