"""One backbone shared by the threads of a dask worker (`dask worker --nthreads 2`): no task reads another's
features.

The UNet's hooks keep what they capture on a shared object, so two forwards at once used to swap or lose
each other's blocks. A short sleep in the UNet's forward makes the two tasks overlap on every run.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from pathseg.extract.backbone_sources import load_backbone
from pathseg.extract.extractor import Extractor
from pathseg.extract.tiles import tile_noise
from PIL import Image

from pathseg.store import FeatureStore
from tests.conftest import small_config


def slow_forwards(unet: torch.nn.Module, seconds: float = 0.05):
    """A pre-hook that holds every UNet forward long enough for another thread to start its own."""
    return unet.register_forward_pre_hook(lambda *_: time.sleep(seconds))


def test_two_threads_on_one_extractor_get_their_own_features(tmp_path):
    config = small_config(tmp_path)
    extractor = Extractor(load_backbone("tiny"), config, torch.device("cpu"))
    latent_shape = extractor.backbone.latent_shape(config.tiling.tile_size)
    wanted = {50: ["up1", "up3.2"], 150: ["up1"]}
    rng = np.random.default_rng(0)
    jobs = []
    for k in range(4):
        tiles = rng.integers(0, 255, size=(2, 128, 128, 3), dtype=np.uint8)
        jobs.append((tiles, tile_noise(0, [f"img{k}:0:0", f"img{k}:0:96"], latent_shape)))
    expected = [extractor.features(tiles, noise, wanted)[0] for tiles, noise in jobs]

    handle = slow_forwards(extractor.backbone.unet)
    results: dict[int, object] = {}
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            results[k] = extractor.features(*jobs[k], wanted)[0]
        except BaseException as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    handle.remove()
    assert not errors, errors
    for k, features in enumerate(expected):
        assert sorted(results[k]) == sorted(features)
        for key, (values, largest) in features.items():
            np.testing.assert_array_equal(results[k][key][0], values)
            np.testing.assert_array_equal(results[k][key][1], largest)


def test_predict_on_a_two_thread_worker_equals_one_process(extracted_small, fitted_run, tmp_path, monkeypatch):
    distributed = pytest.importorskip("distributed")
    from pathseg.extract import backbone_sources
    from pathseg.predict.command import predict_images

    store, (_, run_dir) = FeatureStore.open(extracted_small[1]), fitted_run
    folder = tmp_path / "in"
    folder.mkdir()
    for k in range(3):
        Image.fromarray(store.image_rgb(k)).save(folder / f"image{k}.png")
    predict_images(run_dir, [str(folder)], tmp_path / "alone", show_progress=False)

    real_load = backbone_sources.load_backbone

    def slowed(*args, **kwargs):
        built = real_load(*args, **kwargs)
        slow_forwards(built.unet)
        return built

    monkeypatch.setattr("pathseg.predict.predictor.load_backbone", slowed)
    two_threads = distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None)
    with two_threads:
        predict_images(run_dir, [str(folder)], tmp_path / "threads", scheduler=two_threads.scheduler_address,
                       show_progress=False)
    for k in range(3):
        alone = np.asarray(Image.open(tmp_path / "alone" / f"image{k}" / "labels.png"))
        threaded = np.asarray(Image.open(tmp_path / "threads" / f"image{k}" / "labels.png"))
        np.testing.assert_array_equal(threaded, alone)
