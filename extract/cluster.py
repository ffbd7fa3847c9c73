"""Extraction on dask.distributed workers: one process per device, each computing and writing whole shards.

A first extraction of a real dataset is hours of GPU; on a machine with several GPUs (or a cluster
with a shared file system) the shards are independent, so they are spread over workers. The
coordinator (`runner._extract_locked`) keeps everything that touches the store's metadata: it holds
the store lock, writes the images, creates every array and the z_0 array before any worker starts,
and records the precision. Workers only write shard files and their done flags, and no two workers
ever get the same shard, so no file has two writers. A worker that dies loses only its unflagged
shards; rerunning the command computes them.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pathseg.extract.tiles import TileSource

from pathseg.config import ExtractConfig, PipelineConfig, with_absolute_paths
from pathseg.datasets import build_dataset
from pathseg.errors import PathsegError
from pathseg.progress import progress_bar
from pathseg.store import FeatureStore, digest

CONNECT_TIMEOUT = "20s"
SHARDS_PER_TASK_MAX = 8  # a few shards per task keep the reader and writer threads overlapped inside it

_worker_state: dict[str, Any] = {}  # per worker process: the last backbone built and the last dataset listed
_worker_lock = threading.RLock()  # a worker with several threads runs tasks at once; they share that state


def _distributed():
    try:
        import distributed
    except ImportError:
        raise PathsegError(
            "extract.workers > 1 or extract.scheduler needs dask.distributed: pip install \"pathseg[distributed]\""
        ) from None
    return distributed


class ExtractionCluster:
    """A LocalCluster of `extract.workers` processes, or a client of the scheduler at `extract.scheduler`."""

    def __init__(self, settings: ExtractConfig, show_progress: bool = True) -> None:
        self.settings = settings
        self.show_progress = show_progress
        self.cluster = None
        self.client = None
        self.environ: dict[str, str] = {}

    def __enter__(self) -> ExtractionCluster:
        distributed = _distributed()
        # dask's nannies hand settings to their workers through this process's environment (OMP_NUM_THREADS=1,
        # PYTHONHASHSEED...) and leave them there; they are put back on exit so later child processes of
        # this one (pathseg run's, a test suite's) run as they would have.
        self.environ = dict(os.environ)
        try:
            if self.settings.scheduler:
                self.client = distributed.Client(self.settings.scheduler, timeout=CONNECT_TIMEOUT)
            else:
                # Task errors reach this process and are reported from here; the workers' own log lines are
                # mostly shutdown races (a heartbeat to a scheduler that just closed), noise in a CLI's output.
                self.cluster = distributed.LocalCluster(
                    n_workers=self.settings.workers, threads_per_worker=1, processes=True,
                    dashboard_address=None, silence_logs=logging.CRITICAL,
                )
                self.client = distributed.Client(self.cluster, timeout=CONNECT_TIMEOUT)
            self.client.wait_for_workers(1, timeout=CONNECT_TIMEOUT)
        except (OSError, TimeoutError) as error:
            self.__exit__(None, None, None)
            if self.settings.scheduler:
                where = f"reach the dask scheduler at {self.settings.scheduler}"
                hint = "check extract.scheduler and that its workers are running, or leave it empty"
            else:
                where = f"start a local dask cluster of {self.settings.workers} workers"
                hint = "lower extract.workers, or set it to 1 to extract in this process"
            raise PathsegError(f"could not {where} ({str(error).splitlines()[0]}); {hint}") from None
        return self

    def __exit__(self, *_exc: object) -> None:
        try:
            if self.client is not None:
                self.client.close()
            if self.cluster is not None:
                self.cluster.close()
        finally:
            if self.environ:
                os.environ.clear()
                os.environ.update(self.environ)

    @property
    def n_workers(self) -> int:
        return len(self.client.scheduler_info()["workers"])

    def precision(self) -> str:
        """The precision every worker would compute in on its own device; they must agree, or one store would
        mix them."""
        answers = self.client.run(worker_precision, self.settings.device, self.settings.autocast)
        found = sorted(set(answers.values()))
        if len(found) != 1:
            raise PathsegError(
                f"the dask workers would compute in different precisions ({', '.join(found)}) with "
                f"extract.device={self.settings.device!r} and extract.autocast={self.settings.autocast!r}; "
                "give workers the same kind of device, or set extract.autocast explicitly"
            )
        return found[0]

    def extract(self, config: PipelineConfig, store_path, work: dict[int, dict[int, list[str]]],
                total_tiles: int) -> None:
        """Spread the shards over the workers in tasks of a few shards each, and wait for all of them."""
        distributed = _distributed()
        config = with_absolute_paths(config)  # workers may run in another working directory, or on another host
        store_path = Path(store_path).resolve()
        shards = sorted(work)
        workers = max(1, self.n_workers)
        per_task = max(1, min(SHARDS_PER_TASK_MAX, math.ceil(len(shards) / (4 * workers))))
        threads = max(1, (os.cpu_count() or 1) // workers) if self.cluster is not None else None
        futures = [
            self.client.submit(extract_task, config, str(store_path),
                               {shard: work[shard] for shard in shards[first:first + per_task]}, threads, pure=False)
            for first in range(0, len(shards), per_task)
        ]
        with progress_bar("extract", int(total_tiles), "tiles", self.show_progress) as advance:
            try:
                wait_all(distributed.as_completed(futures), advance, distributed.KilledWorker)
            except BaseException:
                self.client.cancel(futures)
                raise


def wait_all(completed, advance: Callable[[int], object], killed_worker: type[Exception]) -> None:
    """Results in completion order; a task whose workers kept dying becomes one line, not dask's traceback."""
    for future in completed:
        try:
            advance(future.result())
        except killed_worker as error:
            last = getattr(getattr(error, "last_worker", None), "address", "unknown")
            raise PathsegError(
                f"dask workers died while extracting, {getattr(error, 'allowed_failures', 'several')} times on one "
                f"task (last on {last}); look at their memory (RAM and GPU), then rerun the same command: "
                "finished shards are kept and only the rest is computed"
            ) from None


def worker_slot(dask_worker=None) -> int:
    """This worker's index among local workers (named 0, 1, ...): which GPU `cuda` means for it.

    `client.run` hands the worker in as `dask_worker` (distributed's `get_worker()` only works inside a task);
    inside a task it is looked up.
    """
    if dask_worker is None:
        try:
            from distributed import get_worker

            dask_worker = get_worker()
        except (ImportError, ValueError):
            return 0
    name = dask_worker.name
    return name if isinstance(name, int) else int(name) if str(name).isdigit() else 0


def worker_device(setting: str, dask_worker=None) -> torch.device:
    """`cuda` without an index means this worker's own GPU."""
    from pathseg.extract.precision import pick_device

    device = pick_device(setting)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", worker_slot(dask_worker) % torch.cuda.device_count())
    return device


def worker_precision(device_setting: str, autocast: str, dask_worker=None) -> str:
    """Run through `client.run` on every worker, each answering for its own device."""
    from pathseg.extract.precision import resolved_precision

    return resolved_precision(worker_device(device_setting, dask_worker), autocast)


def extract_task(config: PipelineConfig, store_path: str, work: dict[int, dict[int, list[str]]],
                 threads: int | None) -> int:
    """On a worker: compute and write these shards; returns the number of tiles done."""
    from pathseg.extract.extractor import extract_shards

    if threads is not None:
        torch.set_num_threads(threads)
    store = FeatureStore.open(store_path, mode="a")
    extractor = _extractor(config, worker_device(config.extract.device))
    extract_shards(extractor, store, _source(config, store), work, advance=lambda _n: None, config=config)
    return store.tiles_in(work)


def _extractor(config: PipelineConfig, device: torch.device):
    """The backbone is built once per worker and kept for the next task of the same settings.

    A worker may run several tasks at once (`dask worker --nthreads N`): the lock makes sure they build it once,
    and the extractor's own lock serialises their forwards. The key covers every setting the extractor itself
    reads, so a task never runs on one made for other settings (the rest of the task's config travels with it).
    """
    from pathseg.extract.backbone_sources import load_backbone
    from pathseg.extract.extractor import Extractor, prepare_for_device

    key = digest({"backbone": config.backbone.model_dump(mode="json"),
                  "conditioning": config.conditioning.model_dump(mode="json"),
                  "device": str(device), "compile": config.extract.compile,
                  "autocast": config.extract.autocast, "feature_dtype": config.extract.feature_dtype})
    with _worker_lock:
        if _worker_state.get("extractor_key") != key:
            _worker_state.pop("extractor", None)
            b = config.backbone
            backbone = load_backbone(b.name, b.config, b.seed, trust_checkpoint=b.trust_checkpoint)
            _worker_state["extractor"] = Extractor(prepare_for_device(backbone, device, config.extract.compile),
                                                    config, device,
                                                    allowed_code=config.conditioning.code_specs())  # the user's own
            _worker_state["extractor_key"] = key
        return _worker_state["extractor"]


def _source(config: PipelineConfig, store: FeatureStore) -> TileSource:
    """One tile source per worker and store, so the images it decoded last serve the next task too: a large ROI
    cut over several tasks is decoded and resampled once per worker, not once per task."""
    key = digest({"records": config.dataset.model_dump(mode="json"), "store": str(store.path),
                  "fingerprint": store.fingerprint, "tiling": config.tiling.model_dump(mode="json")})
    with _worker_lock:
        if _worker_state.get("source_key") != key:
            t = config.tiling
            _worker_state["source"] = TileSource(_records(config, store), store.images, t.tile_size, t.stride,
                                                 t.pad_mode)
            _worker_state["source_key"] = key
        return _worker_state["source"]


def _records(config: PipelineConfig, store: FeatureStore) -> list:
    """The dataset as this worker sees it, checked against the store's image table (same files, same order)."""
    key = digest(config.dataset.model_dump(mode="json"))
    with _worker_lock:
        if _worker_state.get("records_key") != key:
            _worker_state["records"] = build_dataset(config.dataset).records()
            _worker_state["records_key"] = key
        records = _worker_state["records"]
    expected = [entry.id for entry in store.images]
    if [record.id for record in records] != expected:
        raise PathsegError(
            f"a dask worker lists other images for dataset {config.dataset.name!r} than {store.path} holds; "
            "workers must see the data at the same path as the machine that runs `pathseg extract`"
        )
    return records
