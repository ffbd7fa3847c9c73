"""Extraction on dask.distributed workers writes the store a single process writes, and fails in one line."""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from pathseg.extract import cluster as cluster_module
from pathseg.extract import runner

from pathseg.errors import PathsegError
from pathseg.store import FeatureStore
from pathseg.store.integrity import store_info
from tests.conftest import small_config

distributed = pytest.importorskip("distributed")


def assert_same_store(expected: FeatureStore, actual: FeatureStore) -> None:
    assert sorted(actual.attrs["features"]) == sorted(expected.attrs["features"])
    for info in expected.feature_infos():
        want = expected.read_features(info.timestep, info.block, slice(None)).astype(np.float32)
        got = actual.read_features(info.timestep, info.block, slice(None)).astype(np.float32)
        # Bit-identical when the thread counts match (they do here); fp16 rounding otherwise.
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3, err_msg=f"{info.timestep}/{info.block}")
        assert not actual.missing_shards(info.timestep, info.block)
    np.testing.assert_allclose(actual.read_latents(0, actual.n_tiles), expected.read_latents(0, expected.n_tiles),
                               rtol=1e-5, atol=1e-6)
    assert actual.latent_shards_done().all()
    assert store_info(actual)["complete"] and actual.compute_precision == expected.compute_precision == "float32"


def test_two_local_workers_write_what_one_process_writes(tmp_path, monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))  # what each of the two workers gets
    try:
        single = runner.run_extraction(small_config(tmp_path), show_progress=False, store_path=tmp_path / "a.zarr")
        extended = small_config(tmp_path, **{"extract.timesteps": [50, 150, 250]})
        runner.run_extraction(extended, show_progress=False, store_path=single.store)
    finally:
        torch.set_num_threads(threads)

    on_cluster = small_config(tmp_path, **{"extract.workers": 2})
    environ = dict(os.environ)
    first = runner.run_extraction(on_cluster, show_progress=False, store_path=tmp_path / "b.zarr")
    assert dict(os.environ) == environ  # dask's settings for its workers (OMP_NUM_THREADS=1...) do not leak
    assert first.computed_tiles == FeatureStore.open(first.store).n_tiles == 28
    assert first.computed_arrays == ["t0050/up1", "t0050/up3.2", "t0150/up1", "t0150/up3.2"]
    # Extending on the cluster: workers read z_0 back instead of re-encoding.
    more = small_config(tmp_path, **{"extract.timesteps": [50, 150, 250], "extract.workers": 2})
    second = runner.run_extraction(more, show_progress=False, store_path=first.store)
    assert second.computed_arrays == ["t0250/up1", "t0250/up3.2"]
    assert_same_store(FeatureStore.open(single.store), FeatureStore.open(first.store))

    def no_cluster(*_args, **_kwargs):
        raise AssertionError("a cluster was started with nothing to compute")

    monkeypatch.setattr(runner, "ExtractionCluster", no_cluster)
    assert runner.run_extraction(more, show_progress=False, store_path=first.store).nothing_to_do


def test_worker_errors_arrive_as_one_line(tmp_path):
    """A worker that cannot use the asked device fails the run before any array is created."""
    config = small_config(tmp_path, **{"extract.workers": 2, "extract.device": "cuda"})
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(PathsegError, match="no CUDA GPU is visible"):
        runner.run_extraction(config, show_progress=False, store_path=tmp_path / "s.zarr")
    store = FeatureStore.open(tmp_path / "s.zarr")
    assert store.attrs["features"] == {} and store.compute_precision is None


def test_unreachable_scheduler(tmp_path, monkeypatch):
    monkeypatch.setattr(cluster_module, "CONNECT_TIMEOUT", "1s")
    config = small_config(tmp_path, **{"extract.scheduler": "tcp://127.0.0.1:9"})
    with pytest.raises(PathsegError, match=r"could not reach the dask scheduler at tcp://127.0.0.1:9"):
        runner.run_extraction(config, show_progress=False)


def test_without_distributed_installed(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # import fails as if not installed
    config = small_config(tmp_path, **{"extract.workers": 2})
    with pytest.raises(PathsegError, match=r"pip install \"pathseg\[distributed\]\""):
        runner.run_extraction(config, show_progress=False)


def test_a_worker_that_sees_other_data_refuses(tmp_path):
    config = small_config(tmp_path)
    store = FeatureStore.open(runner.run_extraction(config, show_progress=False).store)
    other = small_config(tmp_path, **{"dataset.synthetic.seed": 7, "dataset.synthetic.train": 5})
    with pytest.raises(PathsegError, match="same path"):
        cluster_module._records(other, store)
    assert len(cluster_module._records(config, store)) == len(store.images)


def test_cli_scheduler_flag_fails_in_one_line(tmp_path, monkeypatch, capsys):
    from tests.conftest import run_cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cluster_module, "CONNECT_TIMEOUT", "1s")
    code, out, err = run_cli(monkeypatch, capsys, "extract", "--set", "tiling.tile_size=128", "--set",
                             "tiling.stride=128", "--scheduler", "tcp://127.0.0.1:9", "--quiet")
    assert code == 2
    assert "could not reach the dask scheduler at tcp://127.0.0.1:9" in out + err
    assert "Traceback" not in out + err


def test_workers_that_keep_dying_end_in_one_line():
    """dask gives up on a task after its workers died `allowed-failures` times; the user gets what to do."""

    class Done:
        def result(self):
            return 16

    class Killed:
        def result(self):
            raise distributed.KilledWorker("extract_task-1", SimpleNamespace(address="tcp://10.0.0.2:40000"), 3)

    advanced = []
    with pytest.raises(PathsegError, match=r"died while extracting, 3 times on one task \(last on tcp://10.0.0.2:40000\)"
                       r".*rerun the same command"):
        cluster_module.wait_all([Done(), Killed(), Done()], advanced.append, distributed.KilledWorker)
    assert advanced == [16]


def test_extraction_on_a_running_scheduler(tmp_path):
    """`extract.scheduler`: the workers of someone else's cluster (here one started beside the test)."""
    import logging

    environ = dict(os.environ)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
                                  silence_logs=logging.ERROR) as running:
        config = small_config(tmp_path, **{"extract.scheduler": running.scheduler_address,
                                           "extract.timesteps": [50], "extract.blocks": ["up1"]})
        summary = runner.run_extraction(config, show_progress=False)
        assert running.scheduler_info["workers"]  # ours, still up: pathseg leaves a running cluster alone
    os.environ.clear()
    os.environ.update(environ)
    store = FeatureStore.open(summary.store)
    assert summary.computed_tiles == store.n_tiles and store_info(store)["complete"]
    reference = runner.run_extraction(small_config(tmp_path, **{"extract.timesteps": [50], "extract.blocks": ["up1"]}),
                                      show_progress=False, store_path=tmp_path / "reference.zarr")
    np.testing.assert_allclose(store.read_features(50, "up1", slice(None)).astype(np.float32),
                               FeatureStore.open(reference.store).read_features(50, "up1", slice(None)),
                               rtol=2e-3, atol=2e-3)


def test_workers_started_in_another_directory_get_absolute_paths(tmp_path, monkeypatch):
    """Relative `cache_dir` and data root are the coordinator's; workers resolving them in their own working
    directory would look for the store somewhere else."""
    import logging

    from tests.conftest import write_glas_fixture

    elsewhere = tmp_path / "workers-home"
    elsewhere.mkdir()
    project = tmp_path / "project"
    write_glas_fixture(project / "glas", per_split={"train": 2, "testA": 1}, size=(90, 120))
    environ = dict(os.environ)
    monkeypatch.chdir(elsewhere)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
                                  silence_logs=logging.ERROR) as running:
        monkeypatch.chdir(project)
        config = small_config(tmp_path, **{"extract.scheduler": running.scheduler_address, "cache_dir": "cache",
                                           "dataset.name": "glas", "dataset.root": "glas",
                                           "extract.timesteps": [50], "extract.blocks": ["up1"]})
        summary = runner.run_extraction(config, show_progress=False)
    os.environ.clear()
    os.environ.update(environ)
    store = FeatureStore.open(project / summary.store)
    assert store_info(store)["complete"] and not (elsewhere / "cache").exists()


def test_each_worker_answers_for_its_own_device():
    """`client.run` hands each worker to the function; get_worker() would fail there and every worker be cuda:0."""
    import logging

    environ = dict(os.environ)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  silence_logs=logging.ERROR) as running, distributed.Client(running) as client:
        slots = client.run(cluster_module.worker_slot)
    os.environ.clear()
    os.environ.update(environ)
    assert sorted(slots.values()) == [0, 1]


def test_a_worker_decodes_an_image_once_across_tasks(tmp_path, monkeypatch):
    from pathseg.extract import tiles

    config = small_config(tmp_path, **{"extract.tiles_per_shard": 2, "extract.timesteps": [50],
                                       "extract.blocks": ["up1"], "dataset.synthetic.train": 1,
                                       "dataset.synthetic.val": 0, "dataset.synthetic.test": 0})
    path = runner.run_extraction(config, show_progress=False).store
    store = FeatureStore.open(path, mode="a")
    assert store.images[0].n_tiles == 4 and store.n_shards == 2  # both shards cut the one image
    store.ensure_feature(150, "up1", 96, 16, 16)
    store.group["done/latents"][:] = 0  # as on a first extraction: z_0 comes from the pixels
    decoded = []

    class CountingView(tiles.PaddedView):
        def __init__(self, array, *args, **kwargs):
            decoded.append(array.shape)
            super().__init__(array, *args, **kwargs)

    monkeypatch.setattr(tiles, "PaddedView", CountingView)
    monkeypatch.setattr(cluster_module, "_worker_state", {})
    later = small_config(tmp_path, **{"extract.tiles_per_shard": 2, "extract.timesteps": [50, 150],
                                      "extract.blocks": ["up1"], "dataset.synthetic.train": 1,
                                      "dataset.synthetic.val": 0, "dataset.synthetic.test": 0})
    for shard in (0, 1):
        assert cluster_module.extract_task(later, str(path), {shard: {150: ["up1"]}}, None) == 2
    assert len(decoded) == 1
    assert not FeatureStore.open(path).missing_shards(150, "up1")
