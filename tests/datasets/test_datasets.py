import numpy as np
import pytest

from pathseg.config import DatasetConfig
from pathseg.datasets import build_dataset
from pathseg.datasets.glas import GlaS, carve_validation, read_grades
from pathseg.datasets.synthetic import generate
from pathseg.errors import PathsegError
from tests.conftest import REAL_GLAS, write_glas_fixture


@pytest.mark.parametrize("ext", ["bmp", "png"])
def test_glas_official_layout_loads(tmp_path, ext):
    root = write_glas_fixture(tmp_path / "glas", ext=ext)
    records = GlaS(root, val_fraction=0.25, split_seed=0).records()
    assert len(records) == 9
    assert {r.split for r in records} == {"train", "val", "testA", "testB"}
    first = records[0]
    assert first.id == "train_1" and (first.height, first.width) == (90, 120)
    assert first.load_rgb().shape == (90, 120, 3)
    instances = first.load_instances()
    assert set(np.unique(instances)) == {0, 1, 2}
    assert set(np.unique(first.load_labels())) == {0, 1}


def test_grade_csv_headers_with_leading_spaces(tmp_path):
    root = write_glas_fixture(tmp_path / "glas")
    patients = read_grades(root / "Grade.csv")
    assert patients["train_1"] == "1" and patients["train_5"] == "1" and patients["train_2"] == "2"


def test_validation_is_carved_by_patient(tmp_path):
    root = write_glas_fixture(tmp_path / "glas", per_split={"train": 12}, patients=4)
    records = GlaS(root, val_fraction=0.5, split_seed=3).records()
    patients = {split: {r.group for r in records if r.split == split} for split in ("train", "val")}
    assert patients["val"] and patients["train"]
    assert not patients["val"] & patients["train"]
    again = GlaS(root, val_fraction=0.5, split_seed=3).records()
    assert [r.split for r in again] == [r.split for r in records]


def test_carve_validation_keeps_one_training_patient():
    held = carve_validation({"a": "1", "b": "2"}, fraction=0.9, seed=0)
    assert len(held) == 1


def test_glas_missing_annotation_is_one_clear_error(tmp_path):
    root = write_glas_fixture(tmp_path / "glas")
    (root / "train_2_anno.bmp").unlink()
    with pytest.raises(PathsegError, match="train_2.bmp: no annotation"):
        GlaS(root).records()


def test_glas_empty_folder_and_missing_root(tmp_path):
    with pytest.raises(PathsegError, match="no GlaS images"):
        GlaS(tmp_path).records()
    with pytest.raises(PathsegError, match="does not exist"):
        GlaS(tmp_path / "nope")
    with pytest.raises(PathsegError, match="--data-root"):
        build_dataset(DatasetConfig(name="glas"))


def test_glas_split_selection(tmp_path):
    root = write_glas_fixture(tmp_path / "glas")
    dataset = build_dataset(DatasetConfig(name="glas", root=root, splits=["testA"]))
    assert [r.id for r in dataset.records()] == ["testA_1", "testA_2"]
    with pytest.raises(PathsegError, match="no split"):
        build_dataset(DatasetConfig(name="glas", root=root, splits=["testC"])).records()


@pytest.mark.parametrize("name", ["glas", "bcss", "folder"])
def test_datasets_on_disk_ask_for_their_folder(name):
    with pytest.raises(PathsegError, match=f"dataset '{name}' needs its folder: pass --data-root PATH"):
        build_dataset(DatasetConfig(name=name))


def test_unknown_dataset_lists_valid_ones():
    with pytest.raises(PathsegError, match="choose one of: .*glas.*synthetic"):
        build_dataset(DatasetConfig(name="nope"))


def test_synthetic_is_deterministic_and_masks_match_glands():
    rgb_a, inst_a = generate(0, "train", 1, 120, 140)
    rgb_b, inst_b = generate(0, "train", 1, 120, 140)
    np.testing.assert_array_equal(rgb_a, rgb_b)
    np.testing.assert_array_equal(inst_a, inst_b)
    other, _ = generate(1, "train", 1, 120, 140)
    assert not np.array_equal(rgb_a, other)
    glands = inst_a > 0
    assert 0.02 < glands.mean() < 0.8
    # gland pixels (pale lumen, purple rim) differ in colour from the pink stroma on average
    assert np.abs(rgb_a[glands].mean(0) - rgb_a[~glands].mean(0)).sum() > 10


def test_synthetic_records_have_splits_and_sizes():
    dataset = build_dataset(DatasetConfig())
    records = dataset.records()
    assert [r.split for r in records].count("train") == 8
    assert records[0].load_labels().shape == (records[0].height, records[0].width)


@pytest.mark.skipif(not REAL_GLAS.is_dir(), reason="real GlaS copy not present")
def test_real_glas_lists_all_images_with_patient_split():
    records = GlaS(REAL_GLAS).records()
    assert len(records) == 145
    splits = {r.split for r in records}
    assert splits == {"train", "val", "testA"}
    train_patients = {r.group for r in records if r.split == "train"}
    val_patients = {r.group for r in records if r.split == "val"}
    assert val_patients and not train_patients & val_patients
