"""`pathseg predict` on whole-slide images: pyramidal TIFFs the tests write, with tissue and blank glass."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from pathseg.extract.runner import run_extraction
from pathseg.predict import predictor as predictor_module
from pathseg.predict.command import predict_images
from pathseg.predict.slide_work import SlideWork
from pathseg.train_head.fit import fit_head
from PIL import Image
from rasterio.features import rasterize
from shapely.affinity import scale as scale_geometry
from shapely.geometry import mapping, shape

from tests.conftest import run_cli, small_config, write_glas_fixture
from tests.imaging.test_slides import he_like_slide, write_pyramid
from tests.predict.test_glands import check_gland_outputs

tifffile = pytest.importorskip("tifffile")
GLAS_MPP = 0.62005


@pytest.fixture(scope="module")
def glas_run(tmp_path_factory):
    """A head trained on GlaS-layout files: it knows its training resolution (0.62005 µm/px)."""
    tmp = tmp_path_factory.mktemp("glas-run")
    root = write_glas_fixture(tmp / "glas", per_split={"train": 3, "testA": 1}, size=(90, 120))
    config = small_config(tmp, **{"dataset.name": "glas", "dataset.root": str(root), "extract.timesteps": [50],
                                  "extract.blocks": ["up1", "up3.2"], "train.epochs": 1})
    run_extraction(config, show_progress=False)
    return fit_head(config, show_progress=False).run_dir


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory):
    rgb, _ = he_like_slide(700, 900, seed=1)
    path = tmp_path_factory.mktemp("slide") / "case 1.tif"  # a space, as real file names have
    write_pyramid(path, rgb, mpp=GLAS_MPP / 2, levels=3, tile=128)
    return path


def _count_tiles(monkeypatch) -> list[int]:
    seen: list[int] = []
    real = predictor_module.Predictor.tile_logits

    def counting(self, tiles, keys, output_size=None):
        seen.append(len(tiles))
        return real(self, tiles, keys, output_size)

    monkeypatch.setattr(predictor_module.Predictor, "tile_logits", counting)
    return seen


def test_slide_outputs_tissue_only_and_geojson_round_trip(glas_run, slide_path, tmp_path, monkeypatch):
    seen = _count_tiles(monkeypatch)
    predict_images(glas_run, [str(slide_path)], tmp_path / "out", probabilities=True, show_progress=False)
    folder = tmp_path / "out" / "case 1"
    assert not (folder / ".work.zarr").exists() and not (folder / ".probabilities.zarr").exists()
    with tifffile.TiffFile(folder / "labels.ome.tif") as tif:
        labels = tif.series[0].levels[0].asarray()
        assert tif.is_ome and len(tif.series[0].levels) >= 1
        assert f'PhysicalSizeX="{GLAS_MPP}"' in tif.ome_metadata
    assert labels.shape == (350, 450)  # the slide at the training mpp
    import zarr

    chances = np.asarray(zarr.open_array(str(folder / "probabilities.zarr"), mode="r")[:]).astype(np.float32)
    covered = chances.sum(axis=0) > 0
    assert chances.shape == (2, 350, 450) and covered.any() and not covered.all()
    np.testing.assert_allclose(chances.sum(axis=0)[covered], 1.0, atol=2e-3)
    decided = covered & (np.abs(chances[1] - chances[0]) > 2e-3)  # float16 rounds near-ties together
    np.testing.assert_array_equal(chances.argmax(axis=0)[decided], labels[decided])
    grid_tiles = 4 * 5  # 128 px tiles every 96 px over 350 x 450
    assert 0 < sum(seen) < grid_tiles  # blank glass never went through the backbone
    regions = json.loads((folder / "regions.geojson").read_text())
    level0_per_px = 2.0  # the slide is scanned at half the training mpp
    for index, name in enumerate(["background", "gland"]):
        if index == 0:
            continue
        ours = [f for f in regions["features"] if f["properties"]["classification"]["name"] == name]
        back = rasterize([(mapping(scale_geometry(shape(f["geometry"]), 1 / level0_per_px, 1 / level0_per_px,
                                                  origin=(0, 0))), 1) for f in ours],
                         out_shape=labels.shape, fill=0, dtype="uint8") if ours else np.zeros_like(labels)
        truth = labels == index
        union = (truth | (back == 1)).sum()
        assert union == 0 or (truth & (back == 1)).sum() / union >= 0.99
    with (folder / "areas.csv").open() as handle:
        rows = {row["class"]: row for row in csv.DictReader(handle)}
    assert sum(int(r["pixels"]) + int(r["outside_tissue_pixels"]) for r in rows.values()) == labels.size
    assert 0 < int(rows["background"]["outside_tissue_pixels"]) < labels.size  # the glass, apart from the tissue
    assert sum(float(r["fraction_of_tissue"]) for r in rows.values()) == pytest.approx(1.0, abs=1e-5)
    expected = int(rows["gland"]["pixels"]) * (GLAS_MPP / 1000) ** 2
    assert float(rows["gland"]["area_mm2"]) == pytest.approx(expected, rel=1e-5)
    assert Image.open(folder / "overlay.png").size[1] > 10
    assert check_gland_outputs(folder) > 0  # glands as objects, ids shared by OME-TIFF, table and GeoJSON


def test_an_image_gets_glands_as_objects_with_shared_ids(glas_run, tmp_path):
    rgb, _ = he_like_slide(140, 180, seed=3)
    Image.fromarray(rgb).save(tmp_path / "image.png")
    predict_images(glas_run, [str(tmp_path / "image.png")], tmp_path / "out", show_progress=False)
    folder = tmp_path / "out" / "image"
    check_gland_outputs(folder)
    with tifffile.TiffFile(folder / "instances.tif") as tif:
        assert tif.series[0].shape == (140, 180)  # the input's own size

    # a val choice recorded after the outputs were written changes the glands: the rerun must not keep them
    from pathseg.train_head.instance_choice import write_choice
    from pathseg.train_head.runs import load_run

    from pathseg.config import PipelineConfig
    from pathseg.errors import PathsegError

    run = load_run(glas_run)
    write_choice(run, PipelineConfig.model_validate(run.record["config"]),
                 {"marker_threshold": 0.5, "min_area": 7, "baseline_min_area": 7}, [])
    with pytest.raises(PathsegError, match="gland decoding values"):
        predict_images(glas_run, [str(tmp_path / "image.png")], tmp_path / "out", show_progress=False)
    (glas_run / "instances.json").unlink()


def test_a_killed_slide_resumes_and_ends_as_an_uninterrupted_run(glas_run, slide_path, tmp_path, monkeypatch):
    seen = _count_tiles(monkeypatch)
    predict_images(glas_run, [str(slide_path)], tmp_path / "whole", show_progress=False)
    total = sum(seen)
    seen.clear()
    real_write = SlideWork.write_batch
    writes = {"n": 0}

    def die_after_one(self, batch, logits):
        if writes["n"] == 1:
            raise KeyboardInterrupt  # as Ctrl-C (or a kill) between two batches
        writes["n"] += 1
        return real_write(self, batch, logits)

    monkeypatch.setattr(SlideWork, "write_batch", die_after_one)
    with pytest.raises(KeyboardInterrupt):
        predict_images(glas_run, [str(slide_path)], tmp_path / "resumed", show_progress=False)
    folder = tmp_path / "resumed" / "case 1"
    assert (folder / ".work.zarr").exists() and not (folder / "areas.csv").exists()
    first = sum(seen)
    batch = seen[0]
    assert first == 2 * batch and total > first  # one batch written, the next computed and lost
    monkeypatch.setattr(SlideWork, "write_batch", real_write)
    predict_images(glas_run, [str(slide_path)], tmp_path / "resumed", show_progress=False)
    assert sum(seen) - first == total - batch  # the rerun computes all but the batch that was written
    with tifffile.TiffFile(folder / "labels.ome.tif") as a, \
            tifffile.TiffFile(tmp_path / "whole" / "case 1" / "labels.ome.tif") as b:
        np.testing.assert_array_equal(a.series[0].asarray(), b.series[0].asarray())


def test_blank_slide_is_not_a_failure_and_missing_mpp_is_one_line(glas_run, tmp_path, monkeypatch, capsys):
    blank = np.full((400, 500, 3), 245, dtype=np.uint8)
    write_pyramid(tmp_path / "blank.tif", blank, mpp=0.5, levels=2, tile=128)
    code, _, err = run_cli(monkeypatch, capsys, "predict", str(glas_run), str(tmp_path / "blank.tif"), "--out",
                           str(tmp_path / "out"), "--quiet")
    assert code == 0 and "no tissue found" in err
    assert json.loads((tmp_path / "out" / "blank" / "regions.geojson").read_text())["features"] == []
    rgb, _ = he_like_slide(400, 500)
    write_pyramid(tmp_path / "no-mpp.tif", rgb, mpp=None, levels=2, tile=128)
    code, _, err = run_cli(monkeypatch, capsys, "predict", str(glas_run), str(tmp_path / "no-mpp.tif"), "--out",
                           str(tmp_path / "out"), "--quiet")
    assert code == 2 and "no-mpp.tif: the slide records no microns per pixel; pass --mpp" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out" / "no-mpp" / "areas.csv").exists()


def test_label_pyramid_levels_are_nearest_samples_of_level_zero(tmp_path):
    import zarr
    from pathseg.predict.slide_outputs import write_label_ome_tiff

    rng = np.random.default_rng(0)
    values = rng.integers(0, 3, size=(1100, 2300), dtype=np.uint8)
    labels = zarr.create_array(store={}, shape=values.shape, dtype="uint8", chunks=(256, 1024))
    labels[:] = values
    write_label_ome_tiff(tmp_path / "l.ome.tif", labels, 0.5, ["a", "b", "c"])
    with tifffile.TiffFile(tmp_path / "l.ome.tif") as tif:
        levels = tif.series[0].levels
        assert [level.shape for level in levels] == [(1100, 2300), (550, 1150), (275, 575)]
        for index, level in enumerate(levels):
            np.testing.assert_array_equal(level.asarray(), values[:: 2**index, :: 2**index])


def test_inputs_spread_over_dask_workers_give_a_single_process_outputs(glas_run, slide_path, tmp_path):
    pytest.importorskip("distributed")
    import os

    rgb, _ = he_like_slide(180, 240, seed=3)
    image = tmp_path / "roi.png"
    Image.fromarray(rgb).save(image)
    inputs = [str(slide_path), str(image)]
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what each dask worker runs with: the same arithmetic, bit for bit
    try:
        predict_images(glas_run, inputs, tmp_path / "one", show_progress=False)
    finally:
        torch.set_num_threads(threads)
    environ = dict(os.environ)
    try:
        predict_images(glas_run, inputs, tmp_path / "two", workers=2, show_progress=False)
    finally:
        os.environ.clear()
        os.environ.update(environ)
    for relative in ("roi/labels.png", "case 1/labels.ome.tif"):
        ones, twos = (tmp_path / run / relative for run in ("one", "two"))
        if relative.endswith(".png"):
            np.testing.assert_array_equal(np.asarray(Image.open(twos)), np.asarray(Image.open(ones)))
        else:
            np.testing.assert_array_equal(tifffile.imread(twos), tifffile.imread(ones))
    again = predict_images(glas_run, inputs, tmp_path / "two", workers=2, show_progress=False)
    assert again.written == [] and len(again.skipped) == 2  # finished inputs: no cluster is even started


def test_ome_tiff_slides_are_read_with_their_physical_pixel_size(glas_run, tmp_path):
    rgb, _ = he_like_slide(400, 520, seed=2)
    path = tmp_path / "case.ome.tif"
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tif:
        tif.write(rgb, subifds=1, tile=(128, 128), photometric="rgb", resolutionunit="CENTIMETER",
                  resolution=(1e4 / GLAS_MPP, 1e4 / GLAS_MPP),
                  metadata={"axes": "YXS", "PhysicalSizeX": GLAS_MPP, "PhysicalSizeY": GLAS_MPP})
        tif.write(rgb[::2, ::2], subfiletype=1, tile=(128, 128), photometric="rgb")
    predict_images(glas_run, [str(path)], tmp_path / "out", show_progress=False)
    labels = tifffile.imread(tmp_path / "out" / "case.ome" / "labels.ome.tif")
    assert labels.shape == (400, 520)  # recorded at the training mpp already: no resampling


def test_kill_9_mid_slide_then_rerun_loses_at_most_the_batch_in_flight(glas_run, tmp_path, monkeypatch):
    import signal
    import subprocess
    import sys
    import time

    rgb, _ = he_like_slide(1400, 1800, seed=4)
    slide = tmp_path / "big.tif"
    write_pyramid(slide, rgb, mpp=GLAS_MPP / 2, levels=3, tile=128)
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "pathseg.cli", "predict", str(glas_run), str(slide), "--out",
                                str(out), "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    flags = out / "big" / ".work.zarr" / "done" / "c"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if flags.is_dir() and any(flags.iterdir()):
            break
        time.sleep(0.02)
    assert process.poll() is None, "predict finished before it could be killed; make the slide larger"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "big" / "areas.csv").exists() and not (out / "big" / "labels.ome.tif").exists()
    import zarr

    group = zarr.open_group(str(out / "big" / ".work.zarr"), mode="r")
    done = np.asarray(group["done"][:]).astype(bool)
    tiles, batch = group["tiles"].shape[0], int(group.attrs["batch_size"])
    assert 0 < done.sum() < len(done)
    kept = sum(min((b + 1) * batch, tiles) - b * batch for b in np.flatnonzero(done))
    seen = _count_tiles(monkeypatch)
    predict_images(glas_run, [str(slide)], out, show_progress=False)
    assert sum(seen) == tiles - kept  # every flagged batch is kept; only unflagged work (the one in flight) is redone
    assert (out / "big" / "areas.csv").exists() and not (out / "big" / ".work.zarr").exists()
    predict_images(glas_run, [str(slide)], tmp_path / "uninterrupted", show_progress=False)
    np.testing.assert_array_equal(tifffile.imread(out / "big" / "labels.ome.tif"),
                                  tifffile.imread(tmp_path / "uninterrupted" / "big" / "labels.ome.tif"))


def test_a_working_store_of_another_head_is_not_resumed(glas_run, slide_path, tmp_path, monkeypatch):
    """A head refit in place (same size; the time stamp put back, as a copy that keeps it does) must not resume
    on tile logits of the old head."""
    import os
    import shutil

    from tests.predict.test_images import background_head

    run = tmp_path / "run"
    shutil.copytree(glas_run, run)
    seen = _count_tiles(monkeypatch)
    real_write = SlideWork.write_batch

    def die_after_one(self, batch, logits):
        if self.group["done"][:].sum() == 1:
            raise KeyboardInterrupt
        return real_write(self, batch, logits)

    monkeypatch.setattr(SlideWork, "write_batch", die_after_one)
    with pytest.raises(KeyboardInterrupt):
        predict_images(run, [str(slide_path)], tmp_path / "out", show_progress=False)
    import zarr

    work = zarr.open_group(str(tmp_path / "out" / "case 1" / ".work.zarr"), mode="r")
    total, done = work["tiles"].shape[0], int(np.asarray(work["done"][:]).sum())
    assert done == 1 and total > int(work.attrs["batch_size"])
    monkeypatch.setattr(SlideWork, "write_batch", real_write)
    head = run / "head.safetensors"
    stamp = head.stat()
    background_head(run)
    os.utime(head, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    seen.clear()
    predict_images(run, [str(slide_path)], tmp_path / "out", show_progress=False)
    with tifffile.TiffFile(tmp_path / "out" / "case 1" / "labels.ome.tif") as tif:
        labels = tif.series[0].levels[0].asarray()
    assert sum(seen) == total, f"resumed: {sum(seen)} of {total} tiles computed with the new head"
    assert (labels == 0).all()  # the new head's labels everywhere


def test_force_mpp_reads_a_slide_at_the_given_resolution_instead_of_its_own(glas_run, tmp_path, monkeypatch, capsys):
    """`--mpp` alone never overrides a file's own µm/px (one line says they differ); `--force-mpp` does."""
    blank = np.full((400, 500, 3), 245, dtype=np.uint8)
    write_pyramid(tmp_path / "scan.tif", blank, mpp=0.5, levels=2, tile=128)
    heights = {}
    for flags, out in ((["--mpp", "0.25"], "own"), (["--mpp", "0.25", "--force-mpp"], "forced")):
        code, _, err = run_cli(monkeypatch, capsys, "predict", str(glas_run), str(tmp_path / "scan.tif"), "--out",
                               str(tmp_path / out), "--quiet", *flags)
        assert code == 0, err
        assert ("records 0.5 µm/px" in err) == (out == "own")
        with tifffile.TiffFile(tmp_path / out / "scan" / "labels.ome.tif") as labels:
            heights[out] = labels.pages[0].shape[0]  # at the training resolution, 0.62005 µm/px
    assert heights == {"own": round(400 * 0.5 / GLAS_MPP), "forced": round(400 * 0.25 / GLAS_MPP)}
