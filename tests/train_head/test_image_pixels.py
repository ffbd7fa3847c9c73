"""conv-image's pixels: cut as extraction pads in every mode, counted and held by the in-RAM plan, and served
the same from RAM as streamed; the kinds that existed before it keep their run keys."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pathseg.extract.tiles import PaddedView
from pathseg.train_head.heads import keyed_settings
from pathseg.train_head.loader import StoreLoader
from pathseg.train_head.runs import resolve_features
from pathseg.train_head.tile_images import TileImages
from pathseg.train_head.tile_sources import footprint, plan_memory

from pathseg.config import HeadConfig
from pathseg.imaging.tiling import tile_grid
from pathseg.store import FeatureStore, digest


class _Store:
    """What TileImages reads of a store, for images of any shape and any pad mode without extracting."""

    def __init__(self, shapes: list[tuple[int, int]], tile_size: int, stride: int, pad_mode: str) -> None:
        rng = np.random.default_rng(0)
        self.tile_size = tile_size
        self.attrs = {"identity": {"tiling": {"pad_mode": pad_mode}}}
        self.rgb = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
        self.grids = [tile_grid(h, w, tile_size, stride) for h, w in shapes]
        self.origins = np.concatenate([np.asarray(g.origins()).reshape(-1, 2) for g in self.grids])
        self.image_of = np.concatenate([np.full(len(g), i) for i, g in enumerate(self.grids)])

    def tile_origins(self) -> np.ndarray:
        return self.origins

    def tile_images(self) -> np.ndarray:
        return self.image_of

    def image_rgb(self, index: int) -> np.ndarray:
        return self.rgb[index]

    def image_grid(self, index: int):
        return self.grids[index]


@pytest.mark.parametrize("mode", ["reflect", "symmetric", "edge", "constant"])
def test_tile_pixels_are_extractions_padded_tiles_in_every_pad_mode(mode):
    store = _Store([(37, 53), (1, 40), (20, 20)], tile_size=32, stride=24, pad_mode=mode)
    images = TileImages(store, cached_images=64, max_cached_bytes=1)  # the byte bound keeps one image at a time
    for tile, (origin, index) in enumerate(zip(store.origins, store.image_of, strict=True)):
        view = PaddedView(store.rgb[index], store.grids[index], mode)  # what extraction feeds the backbone
        np.testing.assert_array_equal(images.pixels(tile), view.tile(tuple(origin), 32))
        assert len(images._cache) == 1


def test_in_ram_plan_counts_and_holds_the_pixels_and_serves_what_streaming_does(extracted_small):
    config, store_path = extracted_small
    store = FeatureStore.open(store_path)
    pairs = resolve_features(config, store)
    tiles = store.tiles_of_splits(["train"])
    assert len(tiles) > 4
    images = TileImages(store)
    plain = footprint(store, pairs, len(tiles), with_labels=True)
    need = footprint(store, pairs, len(tiles), with_labels=True, with_images=True)
    assert need - plain == len(tiles) * 3 * store.tile_size**2
    assert plan_memory(store, pairs, tiles, tiles[:0], need - 1, 1, images).train is None  # pixels counted
    memory = plan_memory(store, pairs, tiles, tiles[:0], need, 1, images).train
    assert memory is not None and memory.nbytes == need
    np.testing.assert_array_equal(memory.images, images.pixels_of(memory.tiles))
    for augment in (False, True):
        batches = [list(StoreLoader(store, pairs, tiles, 4, shuffle=True, augment=augment, seed=5, prefetch=0,
                                    memory=held, images=images))
                   for held in (memory, None)]
        for ram, streamed in zip(*batches, strict=True):
            np.testing.assert_array_equal(ram.tiles, streamed.tiles)
            assert torch.equal(ram.labels, streamed.labels)
            for a, b in zip(ram.features, streamed.features, strict=True):
                assert torch.equal(a, b)


def test_the_kinds_before_conv_image_keep_their_run_keys():
    # digests of keyed_settings at the defaults, computed with heads.py as it was before conv-image (97f3827)
    before = {"conv": "b30429db5b53b06fa7fe47b38e7d850ea545d6d9241dfc299a86438e05b37534",
              "linear": "6cd65cc6fc68c5d2826286de459c578e68dc48bda288649e55fb8625ff5df80f",
              "pixel-mlp": "ee27e600e8a19da1573ebe83d4a572453e829571e97b2c4be77879589b22d2fb"}
    assert {kind: digest(keyed_settings(HeadConfig(kind=kind))) for kind in before} == before
