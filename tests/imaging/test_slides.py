"""Slides as users have them, written by the tests: pyramidal TIFFs with mpp tags, tissue on white glass."""

from __future__ import annotations

import numpy as np
import pytest

from pathseg.errors import PathsegError

tifffile = pytest.importorskip("tifffile")
slides = pytest.importorskip("pathseg.imaging.slides")


def he_like_slide(height: int = 1536, width: int = 2048, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """White glass with two pink-purple tissue pieces (one with a lumen); returns (rgb, tissue truth)."""
    rng = np.random.default_rng(seed)
    rgb = np.full((height, width, 3), 244, dtype=np.uint8) + rng.integers(0, 6, (height, width, 1), dtype=np.uint8)
    yy, xx = np.mgrid[:height, :width]
    tissue = ((yy - 500) ** 2 / 350**2 + (xx - 600) ** 2 / 450**2) < 1
    tissue |= (np.abs(yy - 1100) < 250) & (np.abs(xx - 1500) < 380)
    colour = np.array([200, 110, 170], dtype=np.int16) + rng.integers(-25, 25, (height, width, 3), dtype=np.int16)
    rgb[tissue] = colour[tissue].clip(0, 255).astype(np.uint8)
    lumen = ((yy - 500) ** 2 + (xx - 600) ** 2) < 60**2
    rgb[lumen] = 238
    return rgb, tissue


def write_pyramid(path, rgb: np.ndarray, mpp: float | None, levels: int = 3, tile: int = 256) -> None:
    with tifffile.TiffWriter(path) as tif:
        level = rgb
        for index in range(levels):
            extra = {}
            if mpp is not None:
                per_cm = 1e4 / (mpp * 2**index)
                extra = {"resolution": (per_cm, per_cm), "resolutionunit": "CENTIMETER"}
            tif.write(level, tile=(tile, tile), photometric="rgb", compression="zlib",
                      subfiletype=0 if index == 0 else 1, **extra)
            level = np.ascontiguousarray(level[::2, ::2])


@pytest.fixture(scope="module")
def slide_file(tmp_path_factory):
    rgb, tissue = he_like_slide()
    path = tmp_path_factory.mktemp("slides") / "case.tif"
    write_pyramid(path, rgb, mpp=0.25)
    return path, rgb, tissue


def test_reads_mpp_and_regions_at_any_resolution(slide_file):
    path, rgb, _ = slide_file
    with slides.Slide(path) as slide:
        assert slide.mpp == pytest.approx(0.25) and slide.dimensions == (2048, 1536)
        assert slide.size_at(0.5) == (1024, 768)
        native = slide.read(300, 200, 64, 48, 0.25)
        np.testing.assert_array_equal(native, rgb[200:248, 300:364])
        half = slide.read(150, 100, 32, 24, 0.5).astype(np.float32)  # from level 1, as written (every 2nd px)
        np.testing.assert_array_equal(half, rgb[200:248:2, 300:364:2])
        coarse = slide.read(0, 0, 100, 75, 5.0)  # 20x coarser than level 0: level 2 area-resampled
        reference = rgb[::4, ::4][: 75 * 5, : 100 * 5].reshape(75, 5, 100, 5, 3).mean(axis=(1, 3))
        assert np.abs(coarse.astype(np.float32) - reference).mean() < 3
        outside = slide.read(1000, 700, 64, 64, 0.5)  # past the right and bottom edge: white glass
        assert (outside[40:, 40:] == 255).all()


def test_tissue_mask_finds_tissue_and_keeps_the_blank_slide_blank(slide_file):
    path, _, tissue = slide_file
    with slides.Slide(path) as slide:
        thumbnail = slide.thumbnail(mpp=8.0)
    mask = slides.tissue_mask(thumbnail)
    truth = tissue[::32, ::32][: mask.shape[0], : mask.shape[1]]
    iou = (mask & truth).sum() / (mask | truth).sum()
    assert iou > 0.9
    blank = np.full((64, 64, 3), 243, dtype=np.uint8) + np.random.default_rng(0).integers(0, 5, (64, 64, 1),
                                                                                           dtype=np.uint8)
    assert not slides.tissue_mask(blank).any()
    assert slides.tissue_mask(thumbnail, threshold=0.99).sum() < mask.sum()


def test_slide_without_mpp_asks_for_it(tmp_path):
    rgb, _ = he_like_slide(512, 512)
    path = tmp_path / "no-mpp.tif"
    write_pyramid(path, rgb, mpp=None, levels=2)
    with pytest.raises(PathsegError, match=r"no-mpp.tif: the slide records no microns per pixel; pass --mpp"):
        slides.Slide(path)
    with slides.Slide(path, mpp=0.5) as slide:
        assert slide.mpp == 0.5


def test_unreadable_files_fail_in_one_line(tmp_path, slide_file):
    text = tmp_path / "notes.svs"
    text.write_text("not a slide")
    with pytest.raises(PathsegError, match="notes.svs: not a slide OpenSlide can read") as caught:
        slides.Slide(text)
    assert "\n" not in str(caught.value)
    truncated = tmp_path / "truncated.tif"
    truncated.write_bytes(slide_file[0].read_bytes()[:20000])
    with pytest.raises(PathsegError, match="truncated.tif"):
        with slides.Slide(truncated) as slide:
            slide.read(0, 0, 2048, 1536, 0.25)
    with pytest.raises(PathsegError, match="does not exist"):
        slides.Slide(tmp_path / "missing.svs")


def test_the_files_own_mpp_wins_over_a_disagreeing_one_and_says_so(slide_file, capsys):
    path, _, _ = slide_file
    with slides.Slide(path, mpp=0.5) as slide:  # a 40x file in a command whose --mpp is for 20x slides
        assert slide.mpp == pytest.approx(0.25)
    said = capsys.readouterr().err
    assert "case.tif" in said and "0.5" in said and "0.25" in said and len(said.strip().splitlines()) == 1
    with slides.Slide(path, mpp=0.2510) as slide:  # within 1%: the same resolution, nothing to say
        assert slide.mpp == pytest.approx(0.25)
    assert capsys.readouterr().err == ""
    with slides.Slide(path, mpp=0.5, force_mpp=True) as slide:  # the user insists
        assert slide.mpp == 0.5
    with pytest.raises(PathsegError, match="force"):
        slides.Slide(path, force_mpp=True)  # forcing nothing is a mistake, said in one line


def test_pretrain_slides_read_at_the_files_mpp_unless_forced(tmp_path):
    from pathseg.pretrain.data import SlideTiles

    from pathseg.config import load_config

    folder = tmp_path / "slides"
    folder.mkdir()
    rgb, _ = he_like_slide()
    write_pyramid(folder / "case.tif", rgb, mpp=0.25)
    settings = {"cache_dir": str(tmp_path / "cache"), "pretrain.slides": str(folder), "pretrain.mpp": 1.0,
                "tiling.tile_size": 64, "tiling.stride": 64}
    recorded = SlideTiles(load_config(None, settings))
    given = SlideTiles(load_config(None, {**settings, "pretrain.level0_mpp": 0.5}))
    np.testing.assert_array_equal(given.origins, recorded.origins)
    forced = SlideTiles(load_config(None, {**settings, "pretrain.level0_mpp": 0.5, "pretrain.force_level0_mpp": True}))
    assert len(forced.origins) > len(recorded.origins)  # read as twice as coarse: twice the slide at 1 µm/px
    assert forced.identity()["force_level0_mpp"] is True
    with pytest.raises(PathsegError, match="force_level0_mpp is set but level0_mpp is not"):
        load_config(None, {**settings, "pretrain.force_level0_mpp": True})
