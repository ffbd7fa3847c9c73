"""`pathseg predict` on plain images: equal to evaluate on a stored image, outputs whole, bad input in one line."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from pathseg.predict.command import predict_images
from pathseg.train_head.evaluate import evaluate_run
from pathseg.train_head.fit import fit_head
from PIL import Image

from pathseg.store import FeatureStore
from tests.conftest import REAL_GLAS, run_cli


def evaluated_label_maps(config, run_dir, monkeypatch) -> dict[int, np.ndarray]:
    """The label map `evaluate` scores for each test image, by image index."""
    from pathseg.train_head import evaluate as evaluate_module

    kept = {}
    real = evaluate_module.stitched_logits

    def keep(*args, **kwargs):
        for i, logits in real(*args, **kwargs):
            kept[i] = logits.argmax(axis=0)
            yield i, logits

    monkeypatch.setattr(evaluate_module, "stitched_logits", keep)
    evaluate_run(config, run_dir, splits=["test"], show_progress=False)
    return kept


@pytest.fixture(scope="module")
def trained(extracted_small, tmp_path_factory):
    config, store_path = extracted_small
    config = config.model_copy(update={"runs_dir": tmp_path_factory.mktemp("runs")}, deep=True)
    config.evaluate.overlays = 0
    result = fit_head(config, show_progress=False)
    return config, FeatureStore.open(store_path), result.run_dir


def test_predict_equals_evaluate_on_an_image_of_the_store(trained, tmp_path, monkeypatch):
    """Same tiles, noise, precision, float16 rounding, head and blending: the same label map."""
    config, store, run_dir = trained
    index = next(i for i, entry in enumerate(store.images) if entry.split == "test")
    entry = store.images[index]
    image = tmp_path / "in" / f"{entry.id}.png"
    image.parent.mkdir()
    Image.fromarray(store.image_rgb(index)).save(image)
    predict_images(run_dir, [str(image)], tmp_path / "out", probabilities=True, show_progress=False)
    predicted = np.asarray(Image.open(tmp_path / "out" / entry.id / "labels.png"))
    import zarr

    chances = np.asarray(zarr.open_array(str(tmp_path / "out" / entry.id / "probabilities.zarr"), mode="r")[:])
    assert chances.dtype == np.float16 and chances.shape == (len(store.class_names), *predicted.shape)
    top2 = np.sort(chances.astype(np.float32), axis=0)[-2:]
    decided = top2[1] - top2[0] > 2e-3  # float16 rounds near-ties together
    np.testing.assert_array_equal(chances.astype(np.float32).argmax(axis=0)[decided], predicted[decided])

    kept = evaluated_label_maps(config, run_dir, monkeypatch)
    np.testing.assert_array_equal(predicted, kept[index])


def test_outputs_are_whole_and_a_rerun_skips_finished_images(trained, tmp_path):
    _, store, run_dir = trained
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(store.image_rgb(0)).save(folder / "a.png")
    Image.fromarray(store.image_rgb(1)).convert("L").save(folder / "b.jpg", quality=90)  # grey JPEG still reads
    summary = predict_images(run_dir, [str(folder)], tmp_path / "out", show_progress=False)
    assert [p.name for p in summary.written] == ["a", "b"]
    for name, source in (("a", folder / "a.png"), ("b", folder / "b.jpg")):
        labels = np.asarray(Image.open(tmp_path / "out" / name / "labels.png"))
        assert labels.shape == Image.open(source).size[::-1] and labels.max() < len(store.class_names)
        with (tmp_path / "out" / name / "areas.csv").open() as handle:
            rows = list(csv.DictReader(handle))
        assert [r["class"] for r in rows] == store.class_names
        assert sum(int(r["pixels"]) for r in rows) == labels.size
        assert Image.open(tmp_path / "out" / name / "overlay.png").size[0] == 2 * labels.shape[1] + 8
        regions = json.loads((tmp_path / "out" / name / "regions.geojson").read_text())
        assert regions["type"] == "FeatureCollection"
        assert {f["properties"]["classification"]["name"] for f in regions["features"]} <= {"gland"}
    again = predict_images(run_dir, [str(folder / "*.png"), str(folder / "b.jpg")], tmp_path / "out",
                           show_progress=False)
    assert again.written == [] and len(again.skipped) == 2


def test_bad_inputs_fail_in_one_line(trained, tmp_path, monkeypatch, capsys):
    _, store, run_dir = trained
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    good = tmp_path / "good.png"
    Image.fromarray(store.image_rgb(0)).save(good)
    no_head = tmp_path / "run-copy"
    no_head.mkdir()
    (no_head / "run.json").write_text((run_dir / "run.json").read_text())
    moved = tmp_path / "run-moved"
    moved.mkdir()
    record = json.loads((run_dir / "run.json").read_text())
    record["config"]["backbone"]["name"] = str(tmp_path / "gone-backbone")
    (moved / "run.json").write_text(json.dumps(record))
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("")
    fake_slide = tmp_path / "scan.svs"
    fake_slide.write_bytes(b"II*\x00" + b"\x00" * 64)  # a TIFF header and nothing behind it
    cases = [
        ([str(run_dir), str(broken), "--out", str(tmp_path / "o1")], "broken.png: cannot read this image"),
        ([str(run_dir), str(text), "--out", str(tmp_path / "o2")], "notes.txt: not a supported image"),
        ([str(run_dir), str(tmp_path / "missing.png"), "--out", str(tmp_path / "o3")], "missing.png does not exist"),
        ([str(no_head), str(good), "--out", str(tmp_path / "o4")], "head.safetensors is missing"),
        ([str(moved), str(good), "--out", str(tmp_path / "o5")], "pass --backbone"),
        ([str(run_dir), str(good), "--out", str(blocked / "sub")], "cannot be created"),
        ([str(run_dir), str(good), "--mpp", "0.5", "--out", str(tmp_path / "o6")], "leave --mpp out"),
        ([str(run_dir), str(fake_slide), "--out", str(tmp_path / "o7")], "scan.svs: not a slide OpenSlide can read"),
    ]
    for args, message in cases:
        code, out, err = run_cli(monkeypatch, capsys, "predict", *args, "--quiet")
        assert code == 2 and message in err, (args, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o1" / "broken" / "areas.csv").exists()


@pytest.mark.skipif(not REAL_GLAS.is_dir(), reason="the real GlaS copy is not at ../shared/data/glas")
def test_predict_equals_evaluate_on_real_glas_images(tmp_path, monkeypatch):
    """Two real GlaS images as a folder dataset (masks: glands of the instance maps), with their mpp."""
    from pathseg.extract.runner import run_extraction

    from pathseg.store import store_path_for
    from tests.conftest import small_config

    root = tmp_path / "glas-folder"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for name in ("testA_1", "testA_2", "testA_3"):
        Image.open(REAL_GLAS / f"{name}.png").convert("RGB").save(root / "images" / f"{name}.png")
        glands = (np.asarray(Image.open(REAL_GLAS / f"{name}_anno.png")) > 0).astype(np.uint8)
        Image.fromarray(glands).save(root / "masks" / f"{name}.png")
    (root / "classes.yaml").write_text("classes: [background, gland]\n")
    (root / "splits.csv").write_text("testA_1,train\ntestA_2,val\ntestA_3,test\n")
    settings = {"dataset.name": "folder", "dataset.root": str(root), "tiling.tile_size": 256, "tiling.stride": 192,
                "extract.timesteps": [50], "extract.blocks": ["up1", "up3.2"], "train.epochs": 1}
    config = small_config(tmp_path, **settings, **{"dataset.folder.mpp": 0.62005})
    assert store_path_for(config) == store_path_for(small_config(tmp_path, **settings))  # mpp: metadata only
    run_extraction(config, show_progress=False)
    run_dir = fit_head(config, show_progress=False).run_dir
    predict_images(run_dir, [str(root / "images" / "testA_3.png")], tmp_path / "out", show_progress=False)
    predicted = np.asarray(Image.open(tmp_path / "out" / "testA_3" / "labels.png"))
    kept = evaluated_label_maps(config, run_dir, monkeypatch)
    (only,) = kept.values()
    np.testing.assert_array_equal(predicted, only)
    with (tmp_path / "out" / "testA_3" / "areas.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert float(rows[1]["area_mm2"]) == pytest.approx(int(rows[1]["pixels"]) * 0.62005**2 / 1e6, rel=1e-5)


def test_cli_prints_the_area_table(trained, tmp_path, monkeypatch, capsys):
    _, store, run_dir = trained
    Image.fromarray(store.image_rgb(0)).save(tmp_path / "x.png")
    code, out, err = run_cli(monkeypatch, capsys, "predict", str(run_dir), str(tmp_path / "x.png"), "--out",
                             str(tmp_path / "o"), "--quiet")
    assert code == 0, err
    header, _, *rows = out.strip().splitlines()
    assert header.split() == ["input", "class", "pixels", "mm2", "share"]
    assert [row.split()[1] for row in rows] == store.class_names
    assert "predicted 1 inputs" in err


def background_head(run_dir) -> None:
    """Refit the run's head in place, as it were: same architecture, settings and file size, other weights
    (background everywhere) and the record's digest of them, so only the weights tell the two heads apart."""
    import hashlib

    from safetensors.numpy import load_file, save_file

    path = run_dir / "head.safetensors"
    record = json.loads((run_dir / "run.json").read_text())
    classes = len(record["class_names"])
    weights = {key: value.copy() for key, value in load_file(path).items()}
    biases = [key for key, value in weights.items() if key.endswith("bias") and value.shape == (classes,)]
    assert biases, sorted(weights)
    for key in biases:
        weights[key][0] += 1000.0
    size = path.stat().st_size
    save_file(weights, path)
    assert path.stat().st_size == size
    record["head_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (run_dir / "run.json").write_text(json.dumps(record, indent=2))


def test_outputs_of_another_head_or_other_settings_are_refused_until_overwrite(trained, tmp_path, monkeypatch,
                                                                              capsys):
    import hashlib
    import shutil

    _, store, run_dir = trained
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    Image.fromarray(store.image_rgb(0)).save(tmp_path / "x.png")
    args = ["predict", str(run), str(tmp_path / "x.png"), "--out", str(tmp_path / "o"), "--quiet"]
    folder = tmp_path / "o" / "x"
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0, err
    first = np.asarray(Image.open(folder / "labels.png"))
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0 and "1 already done" in err, err  # same run, same settings: skipped

    background_head(run)  # the head retrained into the same run directory
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 2, f"a finished input of another head was skipped: {err!r}"
    assert "x.png" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1, err
    np.testing.assert_array_equal(np.asarray(Image.open(folder / "labels.png")), first)  # nothing touched

    code, _, err = run_cli(monkeypatch, capsys, *args, "--overwrite")
    assert code == 0 and "predicted 1 inputs" in err, err
    assert (np.asarray(Image.open(folder / "labels.png")) == 0).all()  # the new head's labels
    record = json.loads((folder / "predict.json").read_text())
    assert record["run"]["head_sha256"] == hashlib.sha256((run / "head.safetensors").read_bytes()).hexdigest()
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0 and "1 already done" in err, err

    for other in (["--simplify", "2"], ["--object-type", "detection"], ["--probabilities"]):
        code, _, err = run_cli(monkeypatch, capsys, *args, *other)
        assert code == 2 and "--overwrite" in err, (other, err)
