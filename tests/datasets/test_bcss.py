"""BCSS on files written here in the official layout, and tiling of regions of any size.

No copy of BCSS is reachable, so every ROI below is generated: masks carry every GT code 0..21 so the
grouping table is checked code by code, and one ROI is large enough (2400x1800 at 0.25 um/px) that
resampling and lazy per-tile labels are exercised on a realistic shape.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from pathseg.extract.tiles import PaddedView, TileLabels, TileSource, labels_for_tiles, plan_tiles, source_indices
from PIL import Image

from pathseg.config import BCSS_FIVE_CLASSES, load_config
from pathseg.datasets import build_dataset
from pathseg.datasets.base import ImageRecord
from pathseg.datasets.bcss import IGNORE_INDEX
from pathseg.errors import PathsegError
from pathseg.imaging.tiling import cut_tile, pad_to_grid, tile_grid

CODES = [
    "outside_roi",
    "tumor",
    "stroma",
    "lymphocytic_infiltrate",
    "necrosis_or_debris",
    "glandular_secretions",
    "blood",
    "exclude",
    "metaplasia_NOS",
    "fat",
    "plasma_cells",
    "other_immune_infiltrate",
    "mucoid_material",
    "normal_acinus_or_duct",
    "lymphatics",
    "undetermined",
    "nerve",
    "skin_adnexa",
    "blood_vessel",
    "angioinvasion",
    "dcis",
    "other",
]
# The 5-class grouping of REFERENCE.md, written out code by code (not derived from the config under test).
EXPECTED = {0: 255, 1: 0, 19: 0, 20: 0, 2: 1, 3: 2, 10: 2, 11: 2, 4: 3}
EXPECTED.update({code: 4 for code in range(22) if code not in EXPECTED})


def write_codes(root: Path, where: str = "meta") -> Path:
    path = root / where / "gtruth_codes.tsv" if where else root / "gtruth_codes.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("label\tGT_code\n" + "".join(f"{label}\t{code}\n" for code, label in enumerate(CODES)))
    return path


def every_code_mask(height: int, width: int) -> np.ndarray:
    """Vertical bands of codes 0..21, each wide enough to survive a 2x NEAREST downsampling."""
    bands = (np.arange(width) * 22 // width).astype(np.uint8)
    return np.broadcast_to(bands, (height, width)).copy()


def smooth_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A gradient (PNG compresses it, so even the large ROI writes quickly) with a seeded offset."""
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1), (xx + yy + 17 * seed) % 256])
    return np.moveaxis(base, 0, -1).astype(np.uint8)


def write_roi(root: Path, name: str, rgb: np.ndarray, mask: np.ndarray) -> None:
    (root / "rgbs_colorNormalized").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(root / "rgbs_colorNormalized" / f"{name}.png", compress_level=1)
    Image.fromarray(mask).save(root / "masks" / f"{name}.png", compress_level=1)


def roi_name(site: str, index: int, mpp: str = "0.2500") -> str:
    return f"TCGA-{site}-A{index:03d}-DX1_xmin{1000 + index}_ymin{2000 + index}_MPP-{mpp}"


def make_bcss(root: Path, sites: list[str], height: int = 64, width: int = 88) -> list[str]:
    write_codes(root)
    names = []
    for index, site in enumerate(sites):
        name = roi_name(site, index)
        write_roi(root, name, smooth_rgb(height, width, index), every_code_mask(height, width))
        names.append(name)
    return names


def bcss(root: Path, **options):
    overrides = {"dataset.name": "bcss", "dataset.root": str(root)}
    overrides.update({f"dataset.bcss.{key}": value for key, value in options.items()})
    return build_dataset(load_config(None, overrides).dataset)


# ---- grouping and ignore ------------------------------------------------------------------------


def test_every_code_is_grouped_as_the_reference_says(tmp_path):
    (name,) = make_bcss(tmp_path, ["A2"], height=8, width=22 * 4)
    dataset = bcss(tmp_path, mpp=0.25)
    assert dataset.class_names == ["tumor", "stroma", "inflammatory", "necrosis", "other"]
    assert dataset.ignore_index == IGNORE_INDEX == 255
    (record,) = dataset.records()
    assert record.id == name and (record.height, record.width) == (8, 88)
    labels = record.load_labels()
    assert labels.dtype == np.uint8
    mask = every_code_mask(8, 88)
    for code in range(22):
        assert set(np.unique(labels[mask == code])) == {EXPECTED[code]}, CODES[code]


def test_exclude_and_undetermined_can_be_dont_care(tmp_path):
    make_bcss(tmp_path, ["A2"], height=4, width=88)
    other = [label for label in BCSS_FIVE_CLASSES["other"] if label not in ("exclude", "undetermined")]
    dataset = bcss(
        tmp_path,
        mpp=0.25,
        classes={**BCSS_FIVE_CLASSES, "other": other},
        ignore=["outside_roi", "exclude", "undetermined"],
    )
    labels = dataset.records()[0].load_labels()
    mask = every_code_mask(4, 88)
    for code in (0, 7, 15):
        assert np.all(labels[mask == code] == 255)
    assert np.all(labels[mask == 5] == 4)


def test_codes_file_at_root_is_accepted(tmp_path):
    make_bcss(tmp_path, ["A2"])
    (tmp_path / "meta" / "gtruth_codes.tsv").rename(tmp_path / "gtruth_codes.tsv")
    assert len(bcss(tmp_path).records()) == 1


def test_missing_codes_file_names_both_places(tmp_path):
    make_bcss(tmp_path, ["A2"])
    (tmp_path / "meta" / "gtruth_codes.tsv").unlink()
    with pytest.raises(PathsegError, match=r"gtruth_codes\.tsv.*meta"):
        bcss(tmp_path)


def test_unknown_label_name_in_config_fails_clearly(tmp_path):
    make_bcss(tmp_path, ["A2"])
    classes = {**BCSS_FIVE_CLASSES, "tumor": ["tumour", "angioinvasion", "dcis"]}
    with pytest.raises(PathsegError, match=r"dataset\.bcss\.classes\.tumor names \['tumour'\]") as error:
        bcss(tmp_path, classes=classes)
    assert "\n" not in str(error.value)


def test_label_in_no_class_nor_ignore_fails(tmp_path):
    make_bcss(tmp_path, ["A2"])
    classes = {**BCSS_FIVE_CLASSES, "other": [x for x in BCSS_FIVE_CLASSES["other"] if x != "nerve"]}
    with pytest.raises(PathsegError, match=r"\['nerve'\].*no class"):
        bcss(tmp_path, classes=classes)


def test_label_in_two_classes_is_a_config_error(tmp_path):
    with pytest.raises(PathsegError, match="dataset.bcss.classes"):
        load_config(None, {"dataset.bcss.classes": {"a": ["tumor"], "b": ["tumor", "stroma"]}})


def test_mask_code_missing_from_tsv_fails_on_load(tmp_path):
    make_bcss(tmp_path, ["A2"])
    name = roi_name("A2", 0)
    mask = every_code_mask(64, 88)
    mask[:3, :3] = 30
    Image.fromarray(mask).save(tmp_path / "masks" / f"{name}.png")
    record = bcss(tmp_path).records()[0]
    with pytest.raises(PathsegError, match=rf"{name}\.png: mask values \[30\]"):
        record.load_labels()


# ---- resampling -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def large_bcss(tmp_path_factory) -> Path:
    """One 2400x1800 ROI at 0.25 um/px with every code, in 100 px wide bands, plus a small one."""
    root = tmp_path_factory.mktemp("bcss_large")
    write_codes(root)
    height, width = 1800, 2400
    mask = ((np.arange(width) // 100) % 22).astype(np.uint8)
    mask = np.broadcast_to(mask, (height, width)).copy()
    mask[:200] = 0  # a margin outside the ROI
    write_roi(root, roi_name("E2", 1), smooth_rgb(height, width), mask)
    write_roi(root, roi_name("A2", 2), smooth_rgb(40, 60, 2), every_code_mask(40, 60))
    return root


def test_large_roi_is_resampled_in_its_loaders(large_bcss):
    record = next(r for r in bcss(large_bcss).records() if r.id.startswith("TCGA-E2"))
    assert (record.height, record.width) == (900, 1200)
    assert record.split == "test" and record.group == "E2"
    rgb, labels = record.load_rgb(), record.load_labels()
    assert rgb.shape == (900, 1200, 3) and rgb.dtype == np.uint8
    assert labels.shape == (900, 1200) and labels.dtype == np.uint8
    assert np.all(labels[:100] == 255)
    assert set(np.unique(labels[100:])) == {0, 1, 2, 3, 4, 255}
    # bands were 100 px at 0.25 um/px, so 50 px now: band k covers columns 50k..50k+49
    for column in (0, 49, 50, 349, 1199):
        code = (column // 50) % 22
        assert np.all(labels[100:, column] == EXPECTED[code]), column
    # area resampling of a horizontal ramp: each output pixel is the mean of a 2x2 block
    source = smooth_rgb(1800, 2400)[..., 0].astype(float)
    expected = source.reshape(900, 2, 1200, 2).mean(axis=(1, 3))
    assert np.abs(rgb[..., 0] - expected).max() <= 1.0


@pytest.mark.parametrize(("mpp", "size"), [(1.0, (450, 600)), (0.25, (1800, 2400)), (0.4, (1125, 1500))])
def test_record_size_follows_the_target_mpp(large_bcss, mpp, size):
    record = next(r for r in bcss(large_bcss, mpp=mpp).records() if r.id.startswith("TCGA-E2"))
    assert (record.height, record.width) == size


def test_mpp_tag_in_the_name_sets_the_native_resolution(tmp_path):
    write_codes(tmp_path)
    name = roi_name("A2", 0, mpp="0.5000")
    write_roi(tmp_path, name, smooth_rgb(40, 60), every_code_mask(40, 60))
    record = bcss(tmp_path).records()[0]
    assert (record.height, record.width) == (40, 60)
    assert record.load_labels().shape == (40, 60)


# ---- institutions ---------------------------------------------------------------------------------


def test_splits_follow_institutions(tmp_path):
    sites = ["OL", "BH", "A2", "LL", "C8", "AR", "E2", "EW", "GM", "S3", "A8", "A1", "E9", "D8"]
    names = make_bcss(tmp_path, sites, height=16, width=16)
    records = bcss(tmp_path).records()
    assert [r.id for r in records] == sorted(names)
    by_site = {r.group: r.split for r in records}
    assert {s for s, split in by_site.items() if split == "test"} == {"OL", "LL", "E2", "EW", "GM", "S3"}
    assert {s for s, split in by_site.items() if split == "val"} == {"BH", "C8", "A8", "A1", "E9"}
    assert {s for s, split in by_site.items() if split == "train"} == {"A2", "AR", "D8"}

    custom = bcss(tmp_path, val_institutions=["a2", "ar"]).records()
    assert {r.group for r in custom if r.split == "val"} == {"A2", "AR"}
    chosen = build_dataset(
        load_config(None, {"dataset.name": "bcss", "dataset.root": str(tmp_path), "dataset.splits": ["test"]}).dataset
    ).records()
    assert {r.split for r in chosen} == {"test"} and len(chosen) == 6


def test_default_val_and_test_institutions_do_not_overlap():
    options = load_config(None, {}).dataset.bcss
    assert not set(options.val_institutions) & set(options.test_institutions)
    with pytest.raises(PathsegError, match=r"\['OL'\] are in both"):
        load_config(None, {"dataset.bcss.val_institutions": ["BH", "OL"]})


def test_non_tcga_name_fails(tmp_path):
    write_codes(tmp_path)
    write_roi(tmp_path, "slide_01", smooth_rgb(8, 8), every_code_mask(8, 8))
    with pytest.raises(PathsegError, match="TCGA-XX-"):
        bcss(tmp_path).records()


def test_unpaired_and_mismatched_files_fail(tmp_path):
    make_bcss(tmp_path, ["A2", "A2"])
    orphan = tmp_path / "masks" / f"{roi_name('B6', 9)}.png"
    Image.fromarray(every_code_mask(8, 8)).save(orphan)
    with pytest.raises(PathsegError, match=r"masks/TCGA-B6.*no image"):
        bcss(tmp_path).records()
    orphan.unlink()
    Image.fromarray(every_code_mask(10, 10)).save(tmp_path / "masks" / f"{roi_name('A2', 1)}.png")
    with pytest.raises(PathsegError, match=r"mask is 10x10 but its image is 88x64"):
        bcss(tmp_path).records()
    (tmp_path / "masks" / f"{roi_name('A2', 1)}.png").unlink()
    with pytest.raises(PathsegError, match=r"rgbs_colorNormalized/TCGA-A2-A001.*no mask"):
        bcss(tmp_path).records()


# ---- regions of any size --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["reflect", "symmetric", "edge", "constant"])
@pytest.mark.parametrize(("height", "width"), [(1, 7), (3, 2), (37, 50), (130, 97)])
def test_padded_view_cuts_what_pad_to_grid_would(mode, height, width):
    rng = np.random.default_rng(height * width)
    image = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
    grid = tile_grid(height, width, 64, 40)
    reference = pad_to_grid(image, grid, mode)
    view = PaddedView(image, grid, mode)
    for origin in grid.origins():
        np.testing.assert_array_equal(view.tile(origin, 64), cut_tile(reference, origin, 64))


def test_source_indices_match_numpy_for_long_pads():
    for length in (2, 3, 5):
        for mode in ("reflect", "symmetric", "edge"):
            padded = np.pad(np.arange(length), (13, 17), mode=mode)
            np.testing.assert_array_equal(source_indices(len(padded), 13, length, mode), padded)


def _stack_reference(record: ImageRecord, entry, tile_size: int, stride: int) -> np.ndarray:
    grid = tile_grid(entry.height, entry.width, tile_size, stride)
    padded = pad_to_grid(record.load_labels(), grid, "reflect")
    return np.stack([cut_tile(padded, origin, tile_size) for origin in grid.origins()])


def test_large_roi_tiles_and_lazy_labels(large_bcss):
    records = bcss(large_bcss).records()
    entries, _ = plan_tiles(records, 256, 192)
    index = next(i for i, r in enumerate(records) if r.id.startswith("TCGA-E2"))
    rgb, labels, instances, tile_labels = labels_for_tiles(records[index], entries[index], 256, 192, "reflect",
                                                           IGNORE_INDEX)
    assert instances is None and rgb.shape[:2] == labels.shape == (900, 1200)
    assert isinstance(tile_labels, TileLabels)
    assert tile_labels.shape == (entries[index].n_tiles, 256, 256) and tile_labels.dtype == np.uint8
    reference = _stack_reference(records[index], entries[index], 256, 192)
    np.testing.assert_array_equal(np.asarray(tile_labels), reference)
    np.testing.assert_array_equal(tile_labels[3:7], reference[3:7])
    np.testing.assert_array_equal(tile_labels[-1], reference[-1])
    np.testing.assert_array_equal(tile_labels[2, 10:20, :5], reference[2, 10:20, :5])
    slabs = list(tile_labels.batches(16))
    assert max(len(slab) for _, slab in slabs) == 16
    np.testing.assert_array_equal(np.concatenate([slab for _, slab in slabs]), reference)

    # the store writes per-tile labels by slice assignment into a zarr array; that must take the lazy form
    target = zarr.create_array(store={}, shape=(len(tile_labels) + 2, 256, 256), dtype="uint8", chunks=(1, 256, 256))
    target[1 : 1 + len(tile_labels)] = tile_labels
    np.testing.assert_array_equal(target[1 : 1 + len(tile_labels)], reference)

    source = TileSource(records, entries, 256, 192, "reflect", max_cached_bytes=1)
    first = entries[index].first_tile
    tiles = source.tiles(first, first + entries[index].n_tiles)
    padded = pad_to_grid(rgb, tile_grid(900, 1200, 256, 192), "reflect")
    for k, origin in enumerate(tile_grid(900, 1200, 256, 192).origins()):
        np.testing.assert_array_equal(tiles[k], cut_tile(padded, origin, 256))
    assert len(source._cache) == 1  # the byte budget keeps only the image being cut


# ---- the real pipeline ----------------------------------------------------------------------------


def test_extraction_stores_groups_and_ignore(tmp_path):
    from pathseg.extract.runner import run_extraction

    from pathseg.store import FeatureStore

    root = tmp_path / "bcss"
    write_codes(root)
    sites = ["OL", "BH", "A2"]
    for index, site in enumerate(sites):
        mask = every_code_mask(256, 320)
        mask[:, :40] = 0
        write_roi(root, roi_name(site, index), smooth_rgb(256, 320, index), mask)
    cfg = load_config(
        None,
        {
            "cache_dir": str(tmp_path / "cache"),
            "dataset.name": "bcss",
            "dataset.root": str(root),
            "extract.timesteps": [50],
            "extract.blocks": ["up1"],
            "tiling.tile_size": 128,
            "tiling.stride": 128,
        },
    )
    summary = run_extraction(cfg, show_progress=False)
    store = FeatureStore.open(summary.store)
    assert store.class_names == ["tumor", "stroma", "inflammatory", "necrosis", "other"]
    assert store.ignore_index == 255
    entries = store.images
    assert [e.split for e in entries] == ["train", "val", "test"]  # sorted names: A2, BH, OL
    expected = np.vectorize(EXPECTED.get)(every_code_mask(256, 320)[1::2, 1::2]).astype(np.uint8)
    expected[:, :20] = 255
    for index, entry in enumerate(entries):
        assert (entry.height, entry.width) == (128, 160)
        labels = store.image_labels(index)
        np.testing.assert_array_equal(labels, expected)
        tiles = store.tile_labels(slice(entry.first_tile, entry.first_tile + entry.n_tiles))
        grid = tile_grid(entry.height, entry.width, 128, 128)
        padded = pad_to_grid(expected, grid, "reflect")
        np.testing.assert_array_equal(tiles, np.stack([cut_tile(padded, o, 128) for o in grid.origins()]))


@pytest.mark.parametrize("mode", ["constant", "edge"])
def test_padding_without_tissue_is_ignored_not_class_zero(tmp_path, mode):
    """Class 0 of BCSS is tumor: blank or smeared padding must not be trained or validated as tumor."""
    from pathseg.extract.runner import run_extraction

    from pathseg.store import FeatureStore

    root = tmp_path / "bcss"
    write_codes(root)
    mask = np.full((200, 260), 1, dtype=np.uint8)  # tumor (code 1) everywhere: class 0 after grouping
    write_roi(root, roi_name("A2", 0), smooth_rgb(200, 260), mask)
    cfg = load_config(None, {"cache_dir": str(tmp_path / "cache"), "dataset.name": "bcss", "dataset.root": str(root),
                             "extract.timesteps": [50], "extract.blocks": ["up1"], "tiling.tile_size": 64,
                             "tiling.stride": 48, "tiling.pad_mode": mode})
    store = FeatureStore.open(run_extraction(cfg, show_progress=False).store)
    entry = store.images[0]
    grid = store.image_grid(0)
    inside = np.zeros((grid.padded_height, grid.padded_width), dtype=bool)
    inside[grid.pad_top : grid.pad_top + entry.height, grid.pad_left : grid.pad_left + entry.width] = True
    tiles = store.tile_labels(slice(0, entry.n_tiles))
    for tile, origin in zip(tiles, grid.origins(), strict=True):
        real = cut_tile(inside, origin, 64)
        assert (tile[real] == 0).all()
        assert (tile[~real] == IGNORE_INDEX).all()
    assert (~inside).any()


def test_padding_gets_an_ignore_index_where_the_dataset_has_none(tmp_path):
    from pathseg.extract.runner import run_extraction
    from pathseg.extract.tiles import PADDING_IGNORE

    from pathseg.store import FeatureStore
    from tests.conftest import small_config

    store = FeatureStore.open(run_extraction(small_config(tmp_path, **{"tiling.pad_mode": "constant",
                                                                       "extract.timesteps": [50],
                                                                       "extract.blocks": ["up1"]}),
                                             show_progress=False).store)
    assert store.ignore_index == PADDING_IGNORE
    labels = store.tile_labels(slice(0, store.images[0].n_tiles))
    assert labels[0, 0, 0] == PADDING_IGNORE and set(np.unique(labels)) <= {0, 1, PADDING_IGNORE}


def test_cli_extract_fit_evaluate_reports_five_classes_and_ignores_outside_roi(tmp_path, monkeypatch, capsys):
    """`pathseg extract/fit-head/evaluate --dataset bcss` on a generated BCSS folder, as the README runs it."""
    import json

    from tests.conftest import run_cli

    root = tmp_path / "bcss"
    write_codes(root)
    rng = np.random.default_rng(0)
    outside = 0
    for index, site in enumerate(["A2", "A2", "AR", "BH", "OL", "OL"]):  # train, train, train, val, test, test
        mask = every_code_mask(192, 256)
        mask[rng.integers(0, 150):, : rng.integers(20, 80)] = 0  # outside_roi
        if site == "OL":
            outside += int((mask[1::2, 1::2] == 0).sum())  # NEAREST 2x keeps odd pixels
        write_roi(root, roi_name(site, index), smooth_rgb(192, 256, index), mask)
    monkeypatch.chdir(tmp_path)
    common = ["--dataset", "bcss", "--data-root", str(root), "--quiet", "--set", "tiling.tile_size=64",
              "--set", "tiling.stride=48", "--set", "extract.timesteps=[50]", "--set", "extract.blocks=[up1,up2.2]"]
    assert run_cli(monkeypatch, capsys, "extract", *common)[0] == 0
    assert run_cli(monkeypatch, capsys, "fit-head", *common, "--epochs", "2")[0] == 0
    code, out, err = run_cli(monkeypatch, capsys, "evaluate", *common, "--set", "train.epochs=2")
    assert code == 0, err
    for name in ("tumor", "stroma", "inflammatory", "necrosis", "other"):
        assert name in out
    assert "no background class" in out
    (metrics_file,) = Path("runs").rglob("metrics.json")
    test = json.loads(metrics_file.read_text())["splits"]["test"]
    assert list(test["per_class"]) == ["tumor", "stroma", "inflammatory", "necrosis", "other"]
    scored = sum(entry["support"] for entry in test["per_class"].values())
    assert scored == 2 * 96 * 128 - outside  # every test pixel at 0.5 um/px except outside_roi
    assert test["miou_no_background"] == test["miou"]
