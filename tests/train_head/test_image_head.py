"""`head.kind: conv-image`: tile pixels from the store as extraction cut them, turned with the labels, end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pathseg.extract.tiles import PaddedView
from pathseg.train_head.heads import build_head, keyed_settings
from pathseg.train_head.loader import StoreLoader, dihedral
from pathseg.train_head.runs import resolve_features
from pathseg.train_head.tile_images import TileImages, normalise_pixels
from PIL import Image

from pathseg.config import HeadConfig
from pathseg.store import FeatureStore


def test_tile_pixels_are_the_ones_extraction_fed_the_backbone(extracted_small):
    config, store_path = extracted_small
    store = FeatureStore.open(store_path)
    images = TileImages(store, cached_images=1)
    origins, image_of = store.tile_origins(), store.tile_images()
    for tile in range(0, store.n_tiles, max(1, store.n_tiles // 7)):
        index = int(image_of[tile])
        view = PaddedView(store.image_rgb(index), store.image_grid(index), config.tiling.pad_mode)
        expected = view.tile(tuple(origins[tile]), store.tile_size)
        np.testing.assert_array_equal(images.pixels(tile), expected)
        np.testing.assert_allclose(images.tile(tile), np.moveaxis(expected, -1, 0) / 127.5 - 1.0, atol=1e-6)


def test_the_image_reaches_the_logits_and_other_kinds_keep_their_keys():
    head = build_head("conv-image", [8, 4], 3, {"width": 16, "depth": 1}).eval()
    features = [torch.randn(2, 8, 8, 8), torch.randn(2, 4, 16, 16)]
    image = torch.from_numpy(normalise_pixels(np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3))))
    logits = head([*features, image], 64)
    assert logits.shape == (2, 3, 64, 64) and head.needs_image and not head.logits_upsample_last
    assert not torch.allclose(logits, head([*features, torch.zeros_like(image)], 64))
    assert not build_head("conv", [8, 4], 3, {}).needs_image
    conv_key = keyed_settings(HeadConfig(kind="conv"))
    assert keyed_settings(HeadConfig(kind="conv-image")) == {**conv_key, "kind": "conv-image"}


def test_pixels_turn_with_features_and_labels(extracted_small):
    config, store_path = extracted_small
    store = FeatureStore.open(store_path)
    pairs = resolve_features(config, store)
    images = TileImages(store)
    tiles = np.arange(min(8, store.n_tiles))
    loader = StoreLoader(store, pairs, tiles, 8, augment=True, seed=3, prefetch=0, images=images)
    batch = next(iter(loader))
    assert len(batch.features) == len(pairs) + 1
    labels = store.tile_labels(np.sort(batch.tiles))
    order = {int(t): i for i, t in enumerate(np.sort(batch.tiles))}
    turned = 0
    for i, tile in enumerate(batch.tiles.tolist()):
        ops = [(k, flip) for k in range(4) for flip in (False, True)
               if np.array_equal(dihedral(labels[order[tile]], k, flip), batch.labels[i].numpy())]
        assert any(np.allclose(dihedral(images.tile(tile), k, flip), batch.features[-1][i].numpy()) for k, flip in ops)
        turned += (0, False) not in ops
    assert turned  # augmentation did turn some tiles


@pytest.fixture(scope="module")
def image_run(extracted_small, tmp_path_factory):
    from pathseg.train_head.fit import fit_head

    config, store_path = extracted_small
    config = config.model_copy(update={"runs_dir": tmp_path_factory.mktemp("runs")}, deep=True)
    config.evaluate.overlays = 0
    config.train.epochs = 1
    config.head.kind = "conv-image"
    return config, FeatureStore.open(store_path), fit_head(config, show_progress=False).run_dir


def test_a_conv_image_run_predicts_what_evaluate_scores(image_run, tmp_path, monkeypatch):
    from pathseg.predict.command import predict_images

    from tests.predict.test_images import evaluated_label_maps

    config, store, run_dir = image_run
    kept = evaluated_label_maps(config, run_dir, monkeypatch)
    index = next(i for i, entry in enumerate(store.images) if entry.split == "test")
    entry = store.images[index]
    image = tmp_path / "in" / f"{entry.id}.png"
    image.parent.mkdir()
    Image.fromarray(store.image_rgb(index)).save(image)
    predict_images(run_dir, [str(image)], tmp_path / "out", show_progress=False)
    predicted = np.asarray(Image.open(tmp_path / "out" / entry.id / "labels.png"))
    assert (predicted == kept[index]).mean() > 0.999  # float rounding of the pixels' path aside, the same map
