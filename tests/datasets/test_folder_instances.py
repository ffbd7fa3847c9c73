"""A folder dataset's optional instances/ maps: stored like GlaS's, checked in one line, absent means unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from pathseg.config import load_config
from pathseg.errors import PathsegError
from tests.datasets.test_folder import folder, make_index_folder, rgb_image

H, W = 24, 32


def instance_map(seed: int) -> np.ndarray:
    """Two objects with non-consecutive ids, one past uint16's 8-bit range."""
    ids = np.zeros((H, W), dtype=np.uint16)
    ids[2:10, 3:12] = 7 + seed
    ids[14:22, 15:30] = 40000
    return ids


def write_instances(root: Path, stem: str, ids: np.ndarray, ext: str = "png") -> Path:
    (root / "instances").mkdir(exist_ok=True)
    path = root / "instances" / f"{stem}.{ext}"
    if ext == "png":
        Image.fromarray(ids).save(path)
    else:
        tifffile.imwrite(path, ids)
    return path


def test_instances_are_stored_and_drive_a_contour_head_and_object_metrics(tmp_path):
    from pathseg.extract.runner import run_extraction
    from pathseg.train_head.evaluate import evaluate_run
    from pathseg.train_head.fit import fit_head

    from pathseg.store import FeatureStore
    from train_head.contours import check_target

    root = tmp_path / "mine"
    # Object metrics decode glands from the class named "gland" (or the only non-background class).
    make_index_folder(root, n=2, classes="classes: [background, gland, stroma]\n")
    (root / "splits.csv").write_text("img00,train\nimg01,val\n")
    written = [instance_map(0), instance_map(1).astype(np.uint32) + 3_000_000]
    written[1][written[1] == 3_000_000] = 0
    write_instances(root, "img00", written[0])
    write_instances(root, "img01", written[1], "tif")
    cfg = load_config(None, {
        "cache_dir": str(tmp_path / "cache"), "runs_dir": str(tmp_path / "runs"), "dataset.name": "folder",
        "dataset.root": str(root), "extract.timesteps": [50], "extract.blocks": ["up1"], "tiling.tile_size": 32,
        "tiling.stride": 32, "head.target": "contour", "train.epochs": 1, "evaluate.overlays": 0,
    })
    store = FeatureStore.open(run_extraction(cfg, show_progress=False).store)
    assert store.has_instances
    for index, ids in enumerate(written):
        np.testing.assert_array_equal(store.image_instances(index), ids.astype(np.int32))
    check_target(cfg.head, store)
    run = fit_head(cfg, show_progress=False).run_dir
    metrics = evaluate_run(cfg, run, splits=["val"], show_progress=False, echo=False).metrics
    assert "objects" in metrics["splits"]["val"] and "objects_decoded" in metrics["splits"]["val"]


def test_no_instances_folder_changes_nothing(tmp_path):
    make_index_folder(tmp_path, n=2)
    before = folder(tmp_path)
    assert not before.has_instances and all(r.load_instances is None for r in before.records())
    write_instances(tmp_path, "img00", instance_map(0))
    write_instances(tmp_path, "img01", instance_map(1))
    after = folder(tmp_path)
    assert after.has_instances and after.identity()["files_digest"] != before.identity()["files_digest"]
    assert {k: v for k, v in after.identity().items() if k != "files_digest"} == {
        k: v for k, v in before.identity().items() if k != "files_digest"}


def test_uint32_ids_past_int32_are_renumbered_keeping_objects(tmp_path):
    make_index_folder(tmp_path, n=1)
    ids = np.zeros((H, W), dtype=np.uint32)
    ids[:5], ids[10:] = 4_000_000_000, 5
    write_instances(tmp_path, "img00", ids, "tif")
    stored = folder(tmp_path).records()[0].load_instances()
    assert stored.dtype == np.int32 and sorted(np.unique(stored).tolist()) == [0, 1, 2]
    assert stored[0, 0] == 2 and stored[10, 0] == 1 and stored[7, 0] == 0


def _bad(root: Path, case: str) -> str:
    ids = instance_map(0)
    if case == "missing":
        write_instances(root, "img00", ids)
        return "no instance map for 2 of 3 images (img01, img02)"
    for k in range(1, 3):
        write_instances(root, f"img{k:02d}", ids)
    if case == "size":
        write_instances(root, "img00", ids[:, :20])
        return "img00.png: instance map is 20x24 but image img00.png is 32x24"
    if case == "colour":
        write_instances(root, "img00", rgb_image(H, W))
        return "img00.png: instance map has 3 channels (colour)"
    if case == "float":
        write_instances(root, "img00", ids.astype(np.float32), "tif")
        return "img00.tif: instance map holds float32 values"
    write_instances(root, "img00", -ids.astype(np.int32), "tif")
    return "img00.tif: instance map holds negative ids [-40000, -7]"


@pytest.mark.parametrize("case", ["missing", "size", "colour", "float", "negative"])
def test_bad_instance_maps_fail_in_one_line_naming_the_file(tmp_path, case):
    make_index_folder(tmp_path, n=3)
    expected = _bad(tmp_path, case)
    with pytest.raises(PathsegError) as error:
        for record in folder(tmp_path).records():
            record.load_instances()
    message = str(error.value)
    assert expected in message and "\n" not in message
