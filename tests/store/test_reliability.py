"""Crash safety, concurrent writers, full disks and store integrity.

The kill and concurrency tests run real `pathseg extract` processes: a lock or a flag order that only
holds within one process would pass an in-process test and still corrupt a store in practice.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr
from pathseg.extract import runner
from pathseg.train_head.fit import fit_head

from pathseg.config import config_to_dict
from pathseg.errors import PathsegError
from pathseg.store import FeatureStore, store_lock, store_path_for
from pathseg.store.integrity import store_info
from tests.conftest import run_cli, small_config

ROOT = Path(__file__).resolve().parents[2]


def cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    return run_cli(monkeypatch, capsys, *args)


def write_config(tmp_path: Path, **overrides) -> Path:
    config = small_config(tmp_path, **overrides)
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(config)))
    return path


def extract_process(config_path: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "pathseg.cli", "extract", "--config", str(config_path), "--quiet", *extra]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def assert_same_store(a: Path, b: Path) -> None:
    left, right = FeatureStore.open(a), FeatureStore.open(b)
    assert left.fingerprint == right.fingerprint
    assert store_info(left)["complete"] and store_info(right)["complete"]
    assert sorted(left.attrs["features"]) == sorted(right.attrs["features"])
    for info in left.feature_infos():
        np.testing.assert_array_equal(left.read_features(info.timestep, info.block, slice(None)),
                                      right.read_features(info.timestep, info.block, slice(None)))
    np.testing.assert_array_equal(left.tile_labels(slice(None)), right.tile_labels(slice(None)))
    for index in range(len(left.images)):
        np.testing.assert_array_equal(left.image_rgb(index), right.image_rgb(index))


@pytest.fixture(scope="module")
def clean_store(tmp_path_factory) -> Path:
    """An uninterrupted extraction of the config the crash tests use."""
    tmp = tmp_path_factory.mktemp("clean")
    config = small_config(tmp, **{"dataset.synthetic.train": 10, "extract.timesteps": [50, 150]})
    return runner.run_extraction(config, show_progress=False).store


# ---- resume after SIGKILL ------------------------------------------------------------------------


def test_sigkill_mid_extraction_resumes_to_the_same_store(tmp_path, clean_store):
    config_path = write_config(tmp_path, **{"dataset.synthetic.train": 10, "extract.timesteps": [50, 150]})
    config = small_config(tmp_path, **{"dataset.synthetic.train": 10, "extract.timesteps": [50, 150]})
    store_path = store_path_for(config)
    process = extract_process(config_path)
    flags = store_path / "done"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if flags.exists() and any(p.is_file() for p in flags.rglob("*") if "c" in p.parts):
            break
        time.sleep(0.02)
    assert process.poll() is None, "extraction finished before it could be killed; make the dataset larger"
    process.send_signal(signal.SIGKILL)
    process.wait()

    interrupted = FeatureStore.open(store_path)
    assert not store_info(interrupted)["complete"]  # some work was lost, none was marked done wrongly
    resumed = runner.run_extraction(config, show_progress=False)
    assert 0 < resumed.computed_tiles < interrupted.n_tiles * 2
    assert not list(store_path.rglob("*.partial"))
    assert_same_store(store_path, clean_store)


# ---- two writers ---------------------------------------------------------------------------------


def test_two_concurrent_extractions_share_one_store_safely(tmp_path, clean_store):
    overrides = {"dataset.synthetic.train": 10}
    first = extract_process(write_config(tmp_path, **overrides, **{"extract.timesteps": [50]}))
    (tmp_path / "second").mkdir()
    second_config = small_config(tmp_path, **overrides, **{"extract.timesteps": [50, 150]})
    second_path = tmp_path / "second" / "pipeline.yaml"
    second_path.write_text(yaml.safe_dump(config_to_dict(second_config)))
    second = extract_process(second_path)
    for process in (first, second):
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err
    assert_same_store(store_path_for(second_config), clean_store)


def test_the_lock_excludes_a_second_holder(tmp_path):
    target = tmp_path / "store.zarr"
    with store_lock(target):
        with pytest.raises(PathsegError, match="being written by pid"):
            with store_lock(target, wait=False):
                pass
        with pytest.raises(PathsegError, match="still being written"):
            with store_lock(target, timeout=0.3):
                pass
    with store_lock(target, wait=False):  # released on exit
        pass


# ---- full disk -----------------------------------------------------------------------------------


def test_full_disk_is_one_clear_error_and_the_run_resumes(tmp_path, monkeypatch, clean_store):
    config = small_config(tmp_path, **{"dataset.synthetic.train": 10, "extract.timesteps": [50, 150]})
    real_write = FeatureStore.write_shard
    calls = {"n": 0}

    def write_until_full(self, *args):
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, *args)

    monkeypatch.setattr(FeatureStore, "write_shard", write_until_full)
    with pytest.raises(PathsegError, match="no space left") as caught:
        runner.run_extraction(config, show_progress=False)
    assert "\n" not in str(caught.value) and "rerun" in str(caught.value)
    monkeypatch.setattr(FeatureStore, "write_shard", real_write)
    assert not store_info(FeatureStore.open(store_path_for(config)))["complete"]
    runner.run_extraction(config, show_progress=False)
    assert_same_store(store_path_for(config), clean_store)


# ---- integrity -----------------------------------------------------------------------------------


def test_cache_verify_passes_a_sound_store_and_names_each_fault(tmp_path, monkeypatch, capsys):
    config = small_config(tmp_path)
    path = runner.run_extraction(config, show_progress=False).store
    code, out, _ = cli(monkeypatch, capsys, "cache", "verify", str(path), "--quiet")
    assert code == 0 and "OK" in out

    store = FeatureStore.open(path, mode="a")
    array = store.group["features/t0050/up1"]
    tile = np.asarray(array[5])
    tile[0, 0, 0] = np.nan
    array[5] = tile
    store.group["done/t0150/up3.2"][1] = 0
    code, out, _ = cli(monkeypatch, capsys, "cache", "verify", str(path), "--quiet")
    assert code == 1
    assert "features/t0050/up1: 1 tiles hold NaN or Inf (tiles 5)" in out
    assert "features/t0150/up3.2: 1 of" in out and "shards missing" in out

    with pytest.raises(PathsegError, match="incomplete"):
        fit_head(config, show_progress=False, **{"store_path": path})


def test_edited_attrs_are_refused_by_every_consumer(tmp_path, monkeypatch, capsys):
    config = small_config(tmp_path)
    path = runner.run_extraction(config, show_progress=False).store
    group = zarr.open_group(str(path), mode="a")
    identity = dict(group.attrs["identity"])
    identity["noise_seed"] = 7  # features of seed 0 would pass as seed 7
    group.attrs["identity"] = identity
    for args in (("cache", "verify", str(path)), ("fit-head", "--store", str(path), "--quiet")):
        code, _, err = cli(monkeypatch, capsys, *args)
        assert code == 2 and "does not match its fingerprint" in err and "Traceback" not in err
    with pytest.raises(PathsegError, match="rerun with --overwrite|does not match"):
        runner.run_extraction(config, show_progress=False)
    runner.run_extraction(config, show_progress=False, overwrite=True)
    assert store_info(FeatureStore.open(path))["complete"]


def test_half_created_store_is_never_taken_for_a_store(tmp_path, monkeypatch):
    config = small_config(tmp_path)

    def die(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(FeatureStore, "write_image", die)
    with pytest.raises(KeyboardInterrupt):
        runner.run_extraction(config, show_progress=False)
    path = store_path_for(config)
    store = FeatureStore.open(path)
    assert not store.image_done().any() and not store_info(store)["complete"]
    with pytest.raises(PathsegError, match="not all written"):
        fit_head(config, show_progress=False)
    monkeypatch.undo()
    assert runner.run_extraction(config, show_progress=False).prepared_images == len(store.images)


def test_interrupted_creation_leaves_no_store(tmp_path, monkeypatch):
    import pathseg.store.feature_store as store_module

    config = small_config(tmp_path)
    real_sync = store_module._fsync_tree

    def killed_before_rename(path):
        if str(path).endswith(".creating"):
            raise KeyboardInterrupt
        return real_sync(path)

    monkeypatch.setattr(store_module, "_fsync_tree", killed_before_rename)
    with pytest.raises(KeyboardInterrupt):
        runner.run_extraction(config, show_progress=False)
    monkeypatch.undo()
    path = store_path_for(config)
    assert not (path / "zarr.json").exists()
    assert runner.run_extraction(config, show_progress=False).prepared_images > 0
    assert not path.with_name(path.name + ".creating").exists()


def test_leftover_partial_files_are_cleaned_on_resume(tmp_path):
    config = small_config(tmp_path)
    path = runner.run_extraction(config, show_progress=False).store
    leftover = path / "features" / "t0050" / "up1" / "c" / "0.1234abcd.partial"
    leftover.write_bytes(b"half a shard")
    runner.run_extraction(config, show_progress=False)
    assert not leftover.exists()
    assert os.path.exists(path / "zarr.json")
