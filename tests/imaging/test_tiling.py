import numpy as np
import pytest

from pathseg.imaging.tiling import Stitcher, cut_tile, pad_to_grid, tile_grid


@pytest.mark.parametrize("height,width,tile,stride", [(522, 775, 256, 192), (100, 90, 64, 64), (30, 300, 64, 32),
                                                      (256, 256, 256, 256)])
def test_grid_covers_image_with_padding_on_all_sides(height, width, tile, stride):
    grid = tile_grid(height, width, tile, stride)
    assert grid.pad_top == grid.pad_left == (tile - stride) // 2
    assert grid.pad_bottom >= 0 and grid.pad_right >= 0
    assert grid.padded_height >= height + grid.pad_top and grid.padded_width >= width + grid.pad_left
    last_y, last_x = grid.origins()[-1]
    assert last_y + tile == grid.padded_height and last_x + tile == grid.padded_width
    assert len(grid.origins()) == grid.rows * grid.cols


@pytest.mark.parametrize("blend", ["mean", "gaussian"])
@pytest.mark.parametrize("tile,stride", [(64, 64), (64, 48), (64, 16)])
def test_tiles_of_a_known_map_stitch_back_to_the_map(tile, stride, blend):
    rng = np.random.default_rng(0)
    image = rng.normal(size=(97, 131, 3)).astype(np.float32)
    grid = tile_grid(97, 131, tile, stride)
    padded = pad_to_grid(image, grid, "reflect")
    stitcher = Stitcher(grid, channels=3, blend=blend)
    for origin in grid.origins():
        stitcher.add(origin, cut_tile(padded, origin, tile).transpose(2, 0, 1))
    np.testing.assert_allclose(stitcher.result().transpose(1, 2, 0), image, rtol=1e-6, atol=1e-6)


def test_reflect_padding_mirrors_the_border():
    image = np.arange(20, dtype=np.float32).reshape(4, 5)
    grid = tile_grid(4, 5, 32, 16)
    padded = pad_to_grid(image, grid, "reflect")
    p = grid.pad_top
    np.testing.assert_array_equal(padded[p - 1, p : p + 5], image[1])
    np.testing.assert_array_equal(padded[p : p + 4, p : p + 5], image)


def test_stride_larger_than_tile_is_refused():
    with pytest.raises(ValueError, match="skipped"):
        tile_grid(100, 100, 64, 80)


def test_gaussian_blend_trusts_the_tile_whose_centre_a_pixel_is_nearest():
    """Two tiles disagree on their overlap: gaussian follows the nearer centre, mean splits the difference."""
    grid = tile_grid(64, 112, 64, 48)
    assert grid.cols == 3 and grid.rows == 2
    results = {}
    for blend in ("mean", "gaussian"):
        stitcher = Stitcher(grid, channels=1, blend=blend)
        for origin in grid.origins():
            stitcher.add(origin, np.full((1, 64, 64), float(origin[1] // 48), dtype=np.float32))
        results[blend] = stitcher.result()[0]
    # image column 42 is padded column 50: 18.5 px from tile 0's centre, 29.5 px from tile 1's
    assert results["mean"][30, 42] == pytest.approx(0.5)
    assert results["gaussian"][30, 42] < 0.3
    assert stitcher.complete


def test_unknown_blend_is_refused():
    with pytest.raises(ValueError, match="gaussian"):
        Stitcher(tile_grid(10, 10, 32, 32), 1, blend="median")
