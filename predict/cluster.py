"""Many slides on dask.distributed workers: a whole input per task, one device per worker.

The same machinery as extraction (`extract/cluster.py`): a LocalCluster of `--workers` processes or the
workers of a running scheduler. Each worker builds the run's predictor once and keeps it; each task
predicts one image or slide into its own folder, so no two workers write the same file, and a rerun
skips inputs whose outputs are finished by the same head and settings (see `predict.command`).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from pathseg.extract.cluster import ExtractionCluster, _distributed, wait_all, worker_device
from pathseg.predict.one_input import PredictOptions

from pathseg.config import ExtractConfig
from pathseg.progress import progress_bar

_worker_state: dict[str, Any] = {}
_worker_lock = threading.Lock()  # a worker with several threads runs tasks at once: they build one predictor


def predict_on_cluster(run_dir: Path, jobs: list[tuple[Path, Path]], options: PredictOptions, *,
                       backbone: str | None, device: str | None, workers: int, scheduler: str | None,
                       show_progress: bool, trust_checkpoint: bool = False, trust_run: bool = False) -> None:
    distributed = _distributed()
    settings = ExtractConfig(workers=max(1, workers), scheduler=scheduler, device=device or "auto")
    backbone = str(Path(backbone).resolve()) if backbone and Path(backbone).exists() else backbone
    with ExtractionCluster(settings, show_progress) as cluster:
        futures = [cluster.client.submit(predict_task, str(run_dir.resolve()), str(path.resolve()),
                                         str(folder.resolve()), options, backbone, settings.device,
                                         trust_checkpoint, trust_run, pure=False)
                   for path, folder in jobs]
        with progress_bar("predict", len(jobs), "inputs", show_progress) as advance:
            try:
                wait_all(distributed.as_completed(futures), advance, distributed.KilledWorker)
            except BaseException:
                cluster.client.cancel(futures)
                raise


def predict_task(run_dir: str, path: str, folder: str, options: PredictOptions, backbone: str | None,
                 device_setting: str, trust_checkpoint: bool = False, trust_run: bool = False) -> int:
    """On a worker: one input end to end; the predictor is built once per worker and shared by its threads (its
    extractor serialises their forwards)."""
    from pathseg.predict.one_input import predict_one
    from pathseg.predict.predictor import Predictor

    device = str(worker_device(device_setting))
    key = f"{run_dir}|{backbone}|{device}|{trust_checkpoint}|{trust_run}"
    with _worker_lock:
        if _worker_state.get("key") != key:
            _worker_state["predictor"] = Predictor(Path(run_dir), backbone=backbone, device=device,
                                                   trust_checkpoint=trust_checkpoint, trust_run=trust_run)
            _worker_state["key"] = key
        predictor = _worker_state["predictor"]
    predict_one(Path(path), Path(folder), predictor, options, show_progress=False)
    return 1
