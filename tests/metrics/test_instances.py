"""The instance decoders of pathseg.metrics.instances on tiny synthetic probability maps, built from known glands."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from pathseg.config import InstancesConfig
from pathseg.metrics.instances import decode_contour_instances, decode_instances, decode_semantic_instances
from pathseg.metrics.objects import object_dice, object_f1

BACKGROUND, GLAND, CONTOUR = 0, 1, 2
KEEP_ALL = InstancesConfig(min_area=0)


def disc(shape: tuple[int, int], centre: tuple[float, float], radius: float) -> np.ndarray:
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def probabilities_of(instances: np.ndarray, band: int = 2, sure: float = 0.9) -> np.ndarray:
    """(3, H, W) probabilities of a confident contour head for these glands: background outside, contour in a
    ``band``-px rim inside each gland (so touching glands get a ridge between them), gland within."""
    classes = np.full(instances.shape, BACKGROUND)
    for label in range(1, int(instances.max()) + 1):
        own = instances == label
        classes[own] = GLAND
        classes[own & ~ndimage.binary_erosion(own, iterations=band, border_value=1)] = CONTOUR
    rest = (1 - sure) / 2
    return np.where(np.arange(3)[:, None, None] == classes, sure, rest).astype(np.float32)


def touching_discs() -> np.ndarray:
    """Two discs of radius 10 whose centres are 18 px apart: they share a 4-px-wide stretch of boundary."""
    truth = np.zeros((32, 52), dtype=np.int32)
    truth[disc(truth.shape, (16, 16), 10)] = 1
    truth[disc(truth.shape, (16, 34), 10)] = 2
    return truth


def test_touching_glands_split_by_contour_and_merge_semantically():
    probabilities = probabilities_of(touching_discs())
    assert decode_contour_instances(probabilities, GLAND, CONTOUR, KEEP_ALL).max() == 2
    assert decode_semantic_instances(probabilities, GLAND, KEEP_ALL, contour_index=CONTOUR).max() == 1


def test_contour_split_follows_the_ridge():
    truth = touching_discs()
    decoded = decode_contour_instances(probabilities_of(truth), GLAND, CONTOUR, KEEP_ALL)
    assert np.array_equal(decoded > 0, truth > 0)
    assert object_dice(truth, decoded) > 0.95


def test_speckle_under_min_area_is_removed():
    truth = np.zeros((30, 30), dtype=np.int32)
    truth[disc(truth.shape, (15, 15), 8)] = 1
    probabilities = probabilities_of(truth)
    probabilities[:, 2:4, 2:4] = np.array([0.05, 0.9, 0.05])[:, None, None]  # a 4-px gland speck
    for settings, expected in ((KEEP_ALL, 2), (InstancesConfig(min_area=10), 1)):
        assert decode_semantic_instances(probabilities, GLAND, settings, contour_index=CONTOUR).max() == expected
        assert decode_contour_instances(probabilities, GLAND, CONTOUR, settings).max() == expected


def test_a_gland_with_a_hole_comes_back_filled():
    shape = (36, 36)
    ring = disc(shape, (18, 18), 14) & ~disc(shape, (18, 18), 4)  # 10 px wide: the eroded marker stays one ring
    probabilities = probabilities_of(ring.astype(np.int32), band=1)
    for decoded in (decode_contour_instances(probabilities, GLAND, CONTOUR, KEEP_ALL),
                    decode_semantic_instances(probabilities, GLAND, KEEP_ALL, contour_index=CONTOUR)):
        assert decoded.max() == 1
        assert np.array_equal(decoded == 1, disc(shape, (18, 18), 14))
    unfilled = decode_semantic_instances(probabilities, GLAND, InstancesConfig(min_area=0, fill_holes=False),
                                         contour_index=CONTOUR)
    assert np.array_equal(unfilled == 1, ring)


def test_an_object_inside_a_hole_keeps_its_own_id():
    shape = (30, 30)
    truth = np.zeros(shape, dtype=np.int32)
    truth[disc(shape, (15, 15), 12) & ~disc(shape, (15, 15), 7)] = 1
    truth[disc(shape, (15, 15), 3)] = 2
    decoded = decode_semantic_instances(truth > 0, 1, KEEP_ALL)
    assert decoded.max() == 2
    assert np.array_equal(np.isin(decoded, [1, 2]), disc(shape, (15, 15), 12))
    assert np.array_equal(decoded == decoded[15, 15], disc(shape, (15, 15), 3))


def test_gland_region_without_a_marker_is_kept_as_its_own_object():
    truth = np.zeros((30, 50), dtype=np.int32)
    truth[disc(truth.shape, (15, 12), 8)] = 1
    probabilities = probabilities_of(truth)
    # a second blob that is gland by the mask (p_gland + p_contour = 0.8) but nowhere confidently interior
    blob = disc(truth.shape, (15, 36), 6)
    probabilities[:, blob] = np.array([0.2, 0.4, 0.4])[:, None]
    decoded = decode_contour_instances(probabilities, GLAND, CONTOUR, KEEP_ALL)
    assert decoded.max() == 2  # the gland (197 px) and the unmarked blob (113 px)
    assert np.array_equal(decoded == decoded[15, 36], blob)
    assert decode_contour_instances(probabilities, GLAND, CONTOUR, InstancesConfig(min_area=150)).max() == 1


def test_empty_input_gives_an_all_zero_map():
    probabilities = np.zeros((3, 12, 17), dtype=np.float32)
    probabilities[BACKGROUND] = 1
    for decoded in (decode_contour_instances(probabilities, GLAND, CONTOUR),
                    decode_semantic_instances(probabilities, GLAND),
                    decode_semantic_instances(np.zeros((12, 17), dtype=np.uint8), GLAND)):
        assert decoded.shape == (12, 17) and decoded.dtype == np.int32 and not decoded.any()


def test_ids_are_int32_and_consecutive_after_removal():
    truth = np.zeros((20, 60), dtype=np.int32)
    truth[disc(truth.shape, (10, 8), 6)] = 1
    truth[9:11, 29:31] = 2  # 4 px: removed
    truth[disc(truth.shape, (10, 50), 6)] = 3
    probabilities = probabilities_of(truth, band=1)
    settings = InstancesConfig(min_area=10)
    for decoded in (decode_contour_instances(probabilities, GLAND, CONTOUR, settings),
                    decode_semantic_instances(probabilities, GLAND, settings, contour_index=CONTOUR)):
        assert decoded.dtype == np.int32
        assert np.array_equal(np.unique(decoded), [0, 1, 2])


def test_object_f1_of_both_decoders_on_touching_glands():
    truth = touching_discs()
    probabilities = probabilities_of(truth)
    assert object_f1(truth, decode_contour_instances(probabilities, GLAND, CONTOUR, KEEP_ALL))["f1"] == 1.0
    # the merged object covers all of one gland (a hit) and the other gland is missed: 2TP/(2TP+FP+FN) = 2/3
    merged = decode_semantic_instances(probabilities, GLAND, KEEP_ALL, contour_index=CONTOUR)
    assert object_f1(truth, merged)["f1"] == pytest.approx(2 / 3)


def test_decode_instances_picks_the_decoder_from_the_class_names():
    probabilities = probabilities_of(touching_discs())
    names = ["background", "gland", "contour"]
    assert decode_instances(probabilities, names, KEEP_ALL).max() == 2
    semantic = InstancesConfig(min_area=0, decoding="semantic")
    assert decode_instances(probabilities, names, semantic).max() == 1
    two_class = np.stack([probabilities[0], probabilities[1] + probabilities[2]])
    assert decode_instances(two_class, ["background", "gland"], KEEP_ALL).max() == 1
    with pytest.raises(ValueError, match="instances.decoding is contour"):
        decode_instances(two_class, ["background", "gland"], InstancesConfig(decoding="contour"))


def test_logits_are_refused_with_a_hint():
    logits = np.log(probabilities_of(touching_discs()))
    with pytest.raises(ValueError, match="softmax"):
        decode_contour_instances(logits, GLAND, CONTOUR)
