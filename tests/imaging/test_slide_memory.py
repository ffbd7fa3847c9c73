"""A single-level slide (a flat tiled TIFF) has no coarse level to read its thumbnail from: the thumbnail
must still be built a block at a time, so memory follows a block, not the slide's area."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

tifffile = pytest.importorskip("tifffile")
slides = pytest.importorskip("pathseg.imaging.slides")

HEIGHT, WIDTH = 6000, 8000  # 144 MB of RGB at level 0


@pytest.fixture(scope="module")
def flat_slide(tmp_path_factory):
    """One level, tiled, 0.25 µm/px: white glass with a pink rectangle of tissue, written a tile row at a time."""
    path = tmp_path_factory.mktemp("flat") / "flat.tif"
    tile = 512

    def tiles():
        glass = np.full((tile, tile, 3), 245, dtype=np.uint8)
        tissue = np.empty_like(glass)
        tissue[:] = (200, 110, 170)
        for row in range(0, HEIGHT, tile):
            for column in range(0, WIDTH, tile):
                inside = 1500 <= row < 4500 and 2000 <= column < 6000
                yield tissue if inside else glass

    per_cm = 1e4 / 0.25
    tifffile.imwrite(path, tiles(), shape=(HEIGHT, WIDTH, 3), dtype=np.uint8, tile=(tile, tile),
                     photometric="rgb", compression="zlib", resolution=(per_cm, per_cm), resolutionunit="CENTIMETER")
    return path


def test_single_level_thumbnail_and_tissue_mask_use_a_fraction_of_the_slide(flat_slide):
    with slides.Slide(flat_slide) as slide:
        assert len(slide.level_downsamples) == 1 and slide.mpp == pytest.approx(0.25)
        tracemalloc.start()
        try:
            thumbnail = slide.thumbnail(mpp=8.0)
            mask = slides.tissue_mask(thumbnail)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    level0 = HEIGHT * WIDTH * 3
    assert peak < level0 / 4, f"peak {peak / 2**20:.0f} MiB for a {level0 / 2**20:.0f} MiB level 0"
    assert thumbnail.shape == (188, 250, 3)
    inside, outside = mask[50:140, 65:185], np.concatenate([mask[:40].ravel(), mask[150:].ravel()])
    assert inside.all() and not outside.any()
    np.testing.assert_allclose(thumbnail[60:130, 70:180].reshape(-1, 3).mean(0), (200, 110, 170), atol=0.5)
    assert (thumbnail[-1] == 250).all()  # the last row is half past the slide's edge: half glass, half white


def test_a_large_read_gives_what_one_read_gave(tmp_path):
    """Blocks must not show: a read cut into blocks equals the same read in one piece, pixel for pixel."""
    from tests.imaging.test_slides import he_like_slide, write_pyramid

    rgb, _ = he_like_slide()
    path = tmp_path / "case.tif"
    write_pyramid(path, rgb, mpp=0.2527, levels=1)
    with slides.Slide(path) as slide:
        whole = slide.read(-3, 5, 301, 227, 1.7)
        mean_whole = slide.read(0, 0, 65, 49, 8.0)
        slides_block = slides.BLOCK_PX
        try:
            slides.BLOCK_PX = 96
            blocked = slide.read(-3, 5, 301, 227, 1.7)
            mean_blocked = slide.read(0, 0, 65, 49, 8.0)
        finally:
            slides.BLOCK_PX = slides_block
    assert np.abs(blocked.astype(int) - whole).max() <= 1
    assert np.abs(mean_blocked.astype(int) - mean_whole).max() <= 1
