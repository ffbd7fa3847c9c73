"""The user's own data: images/ + masks/ + classes.yaml (+ splits.csv), written here in every supported form."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pathseg.config import load_config
from pathseg.datasets import build_dataset
from pathseg.datasets.folder import parse_colour, read_classes, seeded_splits
from pathseg.errors import PathsegError

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 160, 0), (0, 0, 255), (255, 255, 255)


def rgb_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def index_mask(height: int, width: int, values: list[int]) -> np.ndarray:
    """Horizontal bands, one per value, so each value is present."""
    bands = np.arange(height) * len(values) // height
    return np.asarray(values, dtype=np.uint8)[bands][:, None].repeat(width, axis=1)


def write_pair(root: Path, stem: str, image: np.ndarray, mask: np.ndarray, image_ext="png", mask_ext="png") -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / "images" / f"{stem}.{image_ext}")
    Image.fromarray(mask).save(root / "masks" / f"{stem}.{mask_ext}")


def folder(root: Path, **options):
    overrides = {"dataset.name": "folder", "dataset.root": str(root)}
    overrides.update({f"dataset.folder.{key}": value for key, value in options.items()})
    return build_dataset(load_config(None, overrides).dataset)


def make_index_folder(root: Path, n: int = 5, classes: str = "classes: [background, tumor, stroma]\n") -> None:
    (root).mkdir(parents=True, exist_ok=True)
    (root / "classes.yaml").write_text(classes)
    for k in range(n):
        write_pair(root, f"img{k:02d}", rgb_image(24, 32, k), index_mask(24, 32, [0, 1, 2]))


# ---- classes file ---------------------------------------------------------------------------------


def test_index_masks_with_splits_file(tmp_path):
    make_index_folder(tmp_path, n=4)
    (tmp_path / "splits.csv").write_text("stem,split\nimg00,train\nimg01,val\nimg02,test\nimg03,train\n")
    dataset = folder(tmp_path)
    assert dataset.class_names == ["background", "tumor", "stroma"]
    assert dataset.ignore_index is None and dataset.class_colors is None
    records = dataset.records()
    assert [r.split for r in records] == ["train", "val", "test", "train"]
    assert [r.id for r in records] == ["img00", "img01", "img02", "img03"]
    labels = records[1].load_labels()
    assert labels.dtype == np.uint8 and labels.shape == (24, 32)
    np.testing.assert_array_equal(labels, index_mask(24, 32, [0, 1, 2]))
    np.testing.assert_array_equal(records[1].load_rgb(), rgb_image(24, 32, 1))
    assert [r.id for r in folder(tmp_path).select(records, ["val"])] == ["img01"]


def test_values_and_ignore_index_are_remapped(tmp_path):
    classes = """
classes:
  - {name: tumor, value: 1, color: "#ff0000"}
  - {name: stroma, value: 2, color: [0, 160, 0]}
  - {name: fat, value: 7}
ignore_index: 0
"""
    make_index_folder(tmp_path, n=1, classes=classes)
    write_pair(tmp_path, "img00", rgb_image(24, 32), index_mask(24, 32, [0, 1, 2, 7]))
    dataset = folder(tmp_path)
    assert dataset.class_names == ["tumor", "stroma", "fat"]
    assert dataset.ignore_index == 255
    assert dataset.class_colors is None  # one class has no colour: no palette
    np.testing.assert_array_equal(dataset.records()[0].load_labels(), index_mask(24, 32, [255, 0, 1, 2]))


def test_colour_masks_map_through_the_colours(tmp_path):
    (tmp_path / "classes.yaml").write_text(
        """
mask_format: colour
classes:
  - {name: tumor, color: "#FF0000"}
  - {name: stroma, color: [0, 160, 0]}
  - {name: background, color: [0, 0, 255]}
ignore_color: [255, 255, 255]
"""
    )
    mask = np.zeros((20, 30, 3), dtype=np.uint8)
    mask[:5], mask[5:10], mask[10:15], mask[15:] = RED, GREEN, BLUE, WHITE
    write_pair(tmp_path, "a", rgb_image(20, 30), mask)
    # a palette PNG with the same colours decodes to the same classes
    palette = Image.fromarray(np.repeat(np.arange(4, dtype=np.uint8), 5)[:, None].repeat(30, axis=1), mode="P")
    palette.putpalette([*RED, *GREEN, *BLUE, *WHITE] + [0] * (256 - 4) * 3)
    Image.fromarray(rgb_image(20, 30, 1)).save(tmp_path / "images" / "b.tif")
    palette.save(tmp_path / "masks" / "b.png")
    dataset = folder(tmp_path, val_fraction=0.0, test_fraction=0.0)
    assert dataset.class_colors == [RED, GREEN, BLUE] and dataset.ignore_index == 255
    expected = np.repeat(np.array([0, 1, 2, 255], dtype=np.uint8), 5)[:, None].repeat(30, axis=1)
    for record in dataset.records():
        np.testing.assert_array_equal(record.load_labels(), expected)


def test_unknown_colour_names_file_and_colour(tmp_path):
    (tmp_path / "classes.yaml").write_text("mask_format: color\nclasses:\n  - {name: tumor, color: '#ff0000'}\n")
    mask = np.zeros((8, 8, 3), dtype=np.uint8)
    mask[:4] = RED
    mask[4:] = (1, 2, 3)
    write_pair(tmp_path, "a", rgb_image(8, 8), mask)
    record = folder(tmp_path).records()[0]
    with pytest.raises(PathsegError, match=r"masks/a\.png: mask colours #010203 are not in .*classes\.yaml"):
        record.load_labels()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("classes: [a, b, a]\n", r"class names \['a'\] appear more than once"),
        ("classes: [a, {name: b, value: 1}]\nignore_index: 1\n", r"ignore_index 1 is also the value of class 'b'"),
        ("classes: [a]\ncolours: [1, 2]\n", r"colours: unknown key"),
        ("mask_format: color\nclasses: [a, {name: b, color: '#00ff00'}]\n", r"classes \['a'\] have no color"),
        ("classes:\n  - {name: a, color: '#12345'}\n", r"not #rrggbb"),
        ("classes: []\n", r"classes"),
        ("classes: [a\n", r"not valid YAML"),
        ("mask_format: color\nclasses: [{name: a, color: [1, 2, 3]}]\nignore_index: 0\n", r"ignore_color"),
    ],
)
def test_bad_classes_files_fail_with_one_line(tmp_path, text, message):
    path = tmp_path / "classes.yaml"
    path.write_text(text)
    with pytest.raises(PathsegError, match=message) as error:
        read_classes(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_classes_file_forms(tmp_path):
    path = tmp_path / "classes.yaml"
    path.write_text("- background\n- {name: gland, color: '#00ff00'}\n")
    table = read_classes(path)
    assert table.names == ["background", "gland"] and table.values == [0, 1] and table.mask_format == "index"
    path.write_text("classes: [a, b, c]\nignore_index: 1\n")
    assert read_classes(path).values == [0, 2, 3]
    assert parse_colour("#0A0b0C") == (10, 11, 12) and parse_colour([1, 2, 3]) == (1, 2, 3)
    custom = tmp_path / "data"
    make_index_folder(custom, n=2)
    (custom / "classes.yaml").unlink()
    (tmp_path / "labels.yaml").write_text("classes: [x, y, z]\n")
    assert folder(custom, classes_file=str(tmp_path / "labels.yaml")).class_names == ["x", "y", "z"]
    with pytest.raises(PathsegError, match=r"classes\.yaml does not exist"):
        folder(custom)


# ---- the four listing/loading errors --------------------------------------------------------------


def test_mask_without_image(tmp_path):
    make_index_folder(tmp_path, n=2)
    Image.fromarray(index_mask(24, 32, [0])).save(tmp_path / "masks" / "lonely.png")
    with pytest.raises(PathsegError, match=r"masks/lonely\.png: no image named lonely\.\*"):
        folder(tmp_path)


def test_image_without_mask(tmp_path):
    make_index_folder(tmp_path, n=2)
    Image.fromarray(rgb_image(24, 32)).save(tmp_path / "images" / "lonely.jpg")
    with pytest.raises(PathsegError, match=r"images/lonely\.jpg: no mask named lonely"):
        folder(tmp_path)


def test_size_mismatch_from_headers(tmp_path, monkeypatch):
    make_index_folder(tmp_path, n=2)
    Image.fromarray(index_mask(20, 32, [0, 1])).save(tmp_path / "masks" / "img01.png")
    import pathseg.datasets.folder as module

    def no_decoding(*_):
        raise AssertionError("listing decoded pixels")

    monkeypatch.setattr(module, "load_labels", no_decoding)
    monkeypatch.setattr(module, "read_rgb", no_decoding)
    with pytest.raises(PathsegError, match=r"masks/img01\.png: mask is 32x20 but image img01\.png is 32x24"):
        folder(tmp_path).records()


def test_unknown_label_values_name_file_and_values(tmp_path):
    make_index_folder(tmp_path, n=2)
    Image.fromarray(index_mask(24, 32, [0, 1, 5, 9])).save(tmp_path / "masks" / "img01.png")
    records = folder(tmp_path).records()
    records[0].load_labels()
    with pytest.raises(PathsegError, match=r"masks/img01\.png: mask values \[5, 9\] are not in .*classes\.yaml"):
        records[1].load_labels()


def test_colour_mask_declared_as_index_says_what_to_do(tmp_path):
    make_index_folder(tmp_path, n=1)
    mask = np.zeros((24, 32, 3), dtype=np.uint8)
    mask[:, :, 0] = 255
    Image.fromarray(mask).save(tmp_path / "masks" / "img00.png")
    with pytest.raises(PathsegError, match="mask_format: color"):
        folder(tmp_path).records()[0].load_labels()


def test_other_formats_and_lossy_masks(tmp_path):
    (tmp_path / "classes.yaml").write_text("classes: [a, b]\n")
    write_pair(tmp_path, "t", rgb_image(16, 16), index_mask(16, 16, [0, 1]), image_ext="tiff", mask_ext="tif")
    write_pair(tmp_path, "b", rgb_image(16, 16), index_mask(16, 16, [1, 0]), image_ext="bmp", mask_ext="bmp")
    (tmp_path / "images" / "notes.txt").write_text("ignored")
    dataset = folder(tmp_path, val_fraction=0.0, test_fraction=0.0)
    assert [r.id for r in dataset.records()] == ["b", "t"]
    np.testing.assert_array_equal(dataset.records()[1].load_labels(), index_mask(16, 16, [0, 1]))
    Image.fromarray(index_mask(16, 16, [0, 1])).save(tmp_path / "masks" / "j.jpg")
    with pytest.raises(PathsegError, match=r"j\.jpg: JPEG masks are lossy"):
        folder(tmp_path)


# ---- splits ---------------------------------------------------------------------------------------


def test_seeded_split_by_fraction(tmp_path):
    make_index_folder(tmp_path, n=10)
    splits = [r.split for r in folder(tmp_path, val_fraction=0.2, test_fraction=0.3, split_seed=1).records()]
    assert splits.count("val") == 2 and splits.count("test") == 3 and splits.count("train") == 5
    again = [r.split for r in folder(tmp_path, val_fraction=0.2, test_fraction=0.3, split_seed=1).records()]
    assert again == splits
    other_seeds = {
        tuple(r.split for r in folder(tmp_path, val_fraction=0.2, test_fraction=0.3, split_seed=s).records())
        for s in range(2, 6)
    }
    assert len(other_seeds | {tuple(splits)}) > 1
    assert seeded_splits(["only"], 0.4, 0.4, 0) == {"only": "train"}
    with pytest.raises(PathsegError, match="below 1"):
        folder(tmp_path, val_fraction=0.6, test_fraction=0.5)


def test_splits_file_problems(tmp_path):
    make_index_folder(tmp_path, n=3)
    (tmp_path / "splits.csv").write_text("img00,train\nimg01,val\n")
    with pytest.raises(PathsegError, match=r"splits\.csv: no row for images \['img02'\]"):
        folder(tmp_path)
    (tmp_path / "splits.csv").write_text("img00,train\nimg01,val\nimg02,test\nimg09,train\n")
    with pytest.raises(PathsegError, match=r"splits\.csv:4: no image with stem 'img09'"):
        folder(tmp_path)
    (tmp_path / "splits.csv").write_text("img00,train\nimg01,val\nimg02,testA\n")
    dataset = folder(tmp_path)
    assert "testA" in dataset.splits and dataset.records()[2].split == "testA"
    with pytest.raises(PathsegError, match=r"dataset\.folder\.splits_file .*mine\.csv does not exist"):
        folder(tmp_path, splits_file="mine.csv")


# ---- the real pipeline ----------------------------------------------------------------------------


def test_extraction_of_a_folder_dataset_keeps_the_ignore_index(tmp_path):
    from pathseg.extract.runner import run_extraction

    from pathseg.store import FeatureStore

    root = tmp_path / "mine"
    make_index_folder(root, n=2, classes="classes: [tumor, stroma]\nignore_index: 0\n")  # 0 unlabelled, 1..2
    for k in range(2):
        write_pair(root, f"img{k:02d}", rgb_image(96, 70, k), index_mask(96, 70, [0, 1, 2]))
    (root / "splits.csv").write_text("img00,train\nimg01,val\n")
    cfg = load_config(
        None,
        {
            "cache_dir": str(tmp_path / "cache"),
            "dataset.name": "folder",
            "dataset.root": str(root),
            "extract.timesteps": [50],
            "extract.blocks": ["up1"],
            "tiling.tile_size": 64,
            "tiling.stride": 64,
        },
    )
    store = FeatureStore.open(run_extraction(cfg, show_progress=False).store)
    assert store.class_names == ["tumor", "stroma"] and store.ignore_index == 255
    np.testing.assert_array_equal(store.image_labels(1), index_mask(96, 70, [255, 0, 1]))
