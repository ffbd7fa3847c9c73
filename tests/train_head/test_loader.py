"""The stage-2 loader: direct shard decoding equals zarr's, the shard-window shuffle, RAM vs streaming.

The store is the session's small extracted one (28 tiles, 4 per shard) unless a test writes its own.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr
from pathseg.train_head.fit import fit_head
from pathseg.train_head.loader import StoreLoader, epoch_windows
from pathseg.train_head.runs import run_key
from pathseg.train_head.tile_sources import InMemoryFeatures, ShardSource, footprint, plan_memory
from safetensors.torch import load_file

from pathseg.errors import PathsegError
from pathseg.memory_budget import parse_size, resolve_budget
from pathseg.store import Z0_PAIR, FeatureStore
from pathseg.store.shard_reads import ShardRows
from tests.conftest import run_cli

PAIRS = [(50, "up1"), (150, "up3.2"), Z0_PAIR]


@pytest.fixture(scope="module")
def store(extracted_small):
    return FeatureStore.open(extracted_small[1])


def all_batches(loader: StoreLoader) -> list[tuple[list[int], list[np.ndarray], np.ndarray]]:
    """Copies: a batch's tensors are reused buffers, valid until the next batch is drawn."""
    return [(b.tiles.tolist(), [f.numpy().copy() for f in b.features], b.labels.numpy().copy()) for b in loader]


def test_direct_shard_reads_equal_zarr_for_every_array_of_a_store(store):
    arrays = [store.feature_array(t, b) for t, b in PAIRS] + [store.group["tiles/labels"]]
    for array in arrays:
        rows = ShardRows(array, store.path)
        assert rows.direct, array.path  # the layouts pathseg writes are all read directly
        for unit in range(rows.n_units):
            first, stop = rows.unit_rows(unit)
            np.testing.assert_array_equal(rows.read(unit), np.asarray(array[first:stop]))


def test_another_layout_is_read_through_zarr_with_the_same_values(tmp_path):
    data = np.random.default_rng(0).standard_normal((10, 3, 4, 4)).astype(np.float16)
    for options in ({"chunks": (2, 3, 4, 4)},  # two tiles per chunk
                    {"chunks": (1, 3, 4, 4), "shards": (5, 3, 4, 4), "compressors": None},  # uncompressed
                    {"chunks": (1, 3, 2, 4), "shards": (5, 3, 4, 4)}):  # chunks split inside a tile
        root = tmp_path / f"a{len(list(tmp_path.iterdir()))}.zarr"
        array = zarr.create_array(root, data=data, **options)
        rows = ShardRows(array, root)
        assert not rows.direct
        got = np.concatenate([rows.read(u) for u in range(rows.n_units)])
        np.testing.assert_array_equal(got, data)


def test_a_missing_shard_reads_as_zarr_does_and_a_damaged_one_fails_in_one_line(tmp_path):
    data = np.arange(8 * 2 * 3 * 3, dtype=np.float16).reshape(8, 2, 3, 3)
    array = zarr.create_array(tmp_path / "a.zarr", shape=data.shape, dtype="float16", chunks=(1, 2, 3, 3),
                              shards=(4, 2, 3, 3), compressors=zarr.codecs.ZstdCodec(level=3, checksum=True),
                              fill_value=0)
    array[4:8] = data[4:8]  # shard 0 never written
    rows = ShardRows(array, tmp_path / "a.zarr")  # a standalone array: its path in the store is ""
    assert rows.direct
    np.testing.assert_array_equal(rows.read(0), np.asarray(array[0:4]))
    np.testing.assert_array_equal(rows.read(1), data[4:8])
    shard = tmp_path / "a.zarr" / "c" / "1" / "0" / "0" / "0"
    raw = bytearray(shard.read_bytes())
    raw[20] ^= 0xFF  # inside the first chunk's zstd frame: its content checksum no longer matches
    shard.write_bytes(bytes(raw))
    with pytest.raises(PathsegError) as error:
        rows.read(1)
    assert "\n" not in str(error.value) and "damaged" in str(error.value) and "tiles 4-7" in str(error.value)


def test_a_shuffled_epoch_is_a_permutation_drawn_window_by_window_from_random_shards():
    tiles = np.arange(3, 90)  # a split that starts and ends inside shards
    rng = np.random.default_rng([7, 0])
    windows = epoch_windows(tiles, 8, 3, True, rng)
    order = np.concatenate(windows)
    assert sorted(order.tolist()) == tiles.tolist()
    shards = [set((w // 8).tolist()) for w in windows]
    assert all(len(s) == 3 for s in shards[:-1]) and set().union(*shards) == set((tiles // 8).tolist())
    assert all(not (a & b) for i, a in enumerate(shards) for b in shards[i + 1 :])  # each shard in one window
    again = np.concatenate(epoch_windows(tiles, 8, 3, True, np.random.default_rng([7, 0])))
    other = np.concatenate(epoch_windows(tiles, 8, 3, True, np.random.default_rng([7, 1])))
    assert np.array_equal(order, again) and not np.array_equal(order, other)
    assert not np.array_equal(np.sort(windows[0]), windows[0])  # shuffled within the window too
    in_order = epoch_windows(tiles, 8, 3, False, None)
    assert np.array_equal(np.concatenate(in_order), tiles) and len(in_order) == 4


def test_ram_and_streaming_give_the_same_batches_epoch_after_epoch(store):
    tiles = store.tiles_of_splits(["train"])
    source = ShardSource(store, PAIRS, True, threads=2)
    memory = InMemoryFeatures.load(source, tiles)
    source.close()
    assert memory.nbytes == footprint(store, PAIRS, len(tiles), with_labels=True)
    for epoch in range(2):
        streamed = StoreLoader(store, PAIRS, tiles, 3, shuffle=True, augment=True, seed=4, window_tiles=8)
        in_ram = StoreLoader(store, PAIRS, tiles, 3, shuffle=True, augment=True, seed=4, window_tiles=8,
                             memory=memory, prefetch=0)
        streamed.set_epoch(epoch)
        in_ram.set_epoch(epoch)
        a, b = all_batches(streamed), all_batches(in_ram)
        assert [x[0] for x in a] == [x[0] for x in b]
        for (_, fa, la), (_, fb, lb) in zip(a, b, strict=True):
            assert all(np.array_equal(x, y) for x, y in zip(fa, fb, strict=True)) and np.array_equal(la, lb)
    assert streamed.max_decoded_tiles <= 3 * 2 * store.tiles_per_shard  # three windows of two shards


def test_batches_hold_the_stored_rows_as_float32(store):
    tiles = np.arange(store.n_tiles)
    for prefetch in (0, 2):
        for batch in StoreLoader(store, PAIRS, tiles, 5, shuffle=True, seed=1, prefetch=prefetch, window_tiles=4):
            for (t, b), features in zip(PAIRS, batch.features, strict=True):
                expected = np.stack([np.asarray(store.feature_array(t, b)[i]) for i in batch.tiles])
                assert features.dtype == torch.float32
                np.testing.assert_array_equal(features.numpy(), expected.astype(np.float32))
            expected = np.stack([np.asarray(store.group["tiles/labels"][i]) for i in batch.tiles])
            np.testing.assert_array_equal(batch.labels.numpy(), expected.astype(np.int64))


def test_the_memory_plan_follows_the_budget(store):
    train, val = store.tiles_of_splits(["train"]), store.tiles_of_splits(["val"])
    need = footprint(store, PAIRS, len(train), True)
    both = plan_memory(store, PAIRS, train, val, need + footprint(store, PAIRS, len(val), False), 1)
    assert both.train is not None and both.val is not None and both.record()["val"] == "memory"
    only_train = plan_memory(store, PAIRS, train, val, need, 1)
    assert only_train.train is not None and only_train.val is None
    only_val = plan_memory(store, PAIRS, train, val, need - 1, 1)  # train does not fit, val still does
    assert only_val.train is None and only_val.record()["train"] == "stream" and only_val.val is not None
    none = plan_memory(store, PAIRS, train, val, 0, 1)
    assert none.train is None and none.val is None and none.record()["bytes_in_memory"] == 0


def test_sizes_and_budgets(monkeypatch):
    assert parse_size("6GB") == 6 * 10**9 and parse_size("512MiB") == 512 * 2**20 and parse_size(1000) == 1000
    assert parse_size("off") == 0 and parse_size("2.5g") == 2_500_000_000
    for bad in ("lots", "5 parsecs", "-3", True):
        with pytest.raises(PathsegError):
            parse_size(bad)
    monkeypatch.setattr("pathseg.memory_budget.available_memory", lambda: 8 * 10**9)
    assert resolve_budget("auto") == 4 * 10**9 and resolve_budget("1GB") == 10**9


def test_fit_head_gives_the_same_head_from_ram_as_streamed_and_records_how(extracted_small, tmp_path):
    config, path = extracted_small
    store = FeatureStore.open(path)
    results = {}
    for budget in ("0", "8GB"):
        tuned = config.model_copy(deep=True)
        tuned.train.memory_budget = budget
        tuned.train.epochs = 2
        result = fit_head(tuned, store=store, run_dir=tmp_path / budget, show_progress=False, announce=False)
        record = json.loads((result.run_dir / "run.json").read_text())
        results[budget] = (result, record, load_file(result.run_dir / "head.safetensors"), run_key(tuned, store,
                                                                                                   result_pairs(record)))
    (streamed, rec_s, head_s, key_s), (in_ram, rec_m, head_m, key_m) = results["0"], results["8GB"]
    assert rec_s["loader"]["train"] == "stream" and rec_m["loader"]["train"] == "memory"
    assert rec_m["loader"]["val"] == "memory" and rec_m["loader"]["bytes_in_memory"] > 0
    assert [h["train_loss"] for h in streamed.history] == [h["train_loss"] for h in in_ram.history]
    assert [h["val_miou"] for h in streamed.history] == [h["val_miou"] for h in in_ram.history]
    assert all(torch.equal(head_s[k], head_m[k]) for k in head_s)
    assert key_s == key_m  # the budget is how fast, not what: the same run


def result_pairs(record: dict) -> list[tuple[int, str]]:
    return [(int(t), str(b)) for t, b in record["pairs"]]


def test_a_bad_budget_is_refused_in_one_line(monkeypatch, capsys, extracted_small):
    config, path = extracted_small
    code, _, err = run_cli(monkeypatch, capsys, "fit-head", "--store", str(path), "--set", "train.memory_budget=lots")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "memory_budget" in err, err
