"""Hand-computed checks for pathseg.metrics.

Every expected number is derived in a comment next to its assertion, on grids
small enough to verify by eye.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from pathseg.metrics import (
    ConfusionMatrix,
    GlandMetrics,
    instances_from_semantic,
    object_dice,
    object_f1,
    object_hausdorff,
    pixel_metrics,
)

# ---------------------------------------------------------------------------
# Fixtures built by hand
# ---------------------------------------------------------------------------


def two_glands() -> np.ndarray:
    """10x10 image with two 3x3 glands (labels 1 and 2, 9 px each)."""
    image = np.zeros((10, 10), dtype=np.int32)
    image[1:4, 1:4] = 1
    image[6:9, 5:8] = 2
    return image


def merged_case() -> tuple[np.ndarray, np.ndarray]:
    """2x10 strip: G1 = cols 0-4 (10 px), G2 = cols 6-9 (8 px), gap at col 5;
    one prediction S covering the whole strip (20 px)."""
    truth = np.zeros((2, 10), dtype=np.int32)
    truth[:, 0:5] = 1
    truth[:, 6:10] = 2
    pred = np.ones((2, 10), dtype=np.int32)
    return truth, pred


def split_case() -> tuple[np.ndarray, np.ndarray]:
    """4x4 gland G (16 px) predicted as S1 = cols 0-2 (12 px), S2 = col 3 (4 px)."""
    truth = np.ones((4, 4), dtype=np.int32)
    pred = np.ones((4, 4), dtype=np.int32)
    pred[:, 3] = 2
    return truth, pred


# ---------------------------------------------------------------------------
# ConfusionMatrix
# ---------------------------------------------------------------------------


def test_confusion_matrix_counts_rows_truth_cols_prediction() -> None:
    cm = ConfusionMatrix(num_classes=3)
    cm.update(np.array([[0, 1], [1, 2]]), np.array([[0, 1], [2, 2]]))
    # pixels (truth -> pred): 0->0, 1->1, 1->2, 2->2
    expected = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 1]])
    np.testing.assert_array_equal(cm.matrix, expected)
    assert cm.matrix.dtype == np.int64


def test_confusion_matrix_skips_ignore_index() -> None:
    cm = ConfusionMatrix(num_classes=3, ignore_index=255)
    truth = np.array([[0, 255], [1, 255]], dtype=np.uint8)
    # The prediction under an ignored pixel may be anything, even out of range.
    pred = np.array([[0, 7], [2, 1]], dtype=np.uint8)
    cm.update(truth, pred)
    # kept pixels: 0->0 and 1->2 only; the two 255 pixels contribute nothing
    expected = np.array([[1, 0, 0], [0, 0, 1], [0, 0, 0]])
    np.testing.assert_array_equal(cm.matrix, expected)
    assert cm.matrix.sum() == 2


def test_confusion_matrix_rejects_bad_input() -> None:
    cm = ConfusionMatrix(num_classes=3, ignore_index=255)
    with pytest.raises(ValueError, match="shape"):
        cm.update(np.zeros((2, 2), int), np.zeros((2, 3), int))
    with pytest.raises(ValueError, match="truth"):
        cm.update(np.array([3]), np.array([0]))  # 3 is outside [0, 3)
    with pytest.raises(ValueError, match="prediction"):
        cm.update(np.array([0]), np.array([-1]))
    with pytest.raises(ValueError, match="integer"):
        cm.update(np.array([0.0]), np.array([0]))
    assert cm.matrix.sum() == 0  # failed updates leave the matrix untouched


def test_confusion_matrix_merge() -> None:
    first, second = ConfusionMatrix(2), ConfusionMatrix(2)
    first.update(np.array([0, 1]), np.array([0, 0]))  # 0->0, 1->0
    second.update(np.array([1, 1]), np.array([1, 0]))  # 1->1, 1->0
    first.merge(second)
    # [[1, 0], [1, 0]] + [[0, 0], [1, 1]]
    np.testing.assert_array_equal(first.matrix, [[1, 0], [2, 1]])
    with pytest.raises(ValueError):
        first.merge(ConfusionMatrix(3))


# ---------------------------------------------------------------------------
# pixel_metrics
# ---------------------------------------------------------------------------

NAMES = ["background", "tumor", "stroma", "necrosis"]


def four_class_matrix() -> ConfusionMatrix:
    """Class 3 ("necrosis") never occurs in truth nor prediction."""
    cm = ConfusionMatrix(num_classes=4)
    truth = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
    pred = np.array([0, 0, 0, 1, 1, 1, 1, 0, 2, 2])
    cm.update(truth, pred)
    return cm


def test_pixel_metrics_hand_computed() -> None:
    result = pixel_metrics(four_class_matrix(), NAMES)
    # 8 of 10 pixels correct (index 3 and 7 wrong)
    assert result["pixel_accuracy"] == pytest.approx(0.8)
    per_class = result["per_class"]
    # background: TP=3 (idx 0-2), FN=1 (idx 3), FP=1 (idx 7)
    #   IoU = 3/5, Dice = 6/8
    assert per_class["background"] == {
        "iou": pytest.approx(0.6),
        "dice": pytest.approx(0.75),
        "support": 4,
    }
    # tumor: TP=3 (idx 4-6), FP=1 (idx 3), FN=1 (idx 7) -> same as background
    assert per_class["tumor"]["iou"] == pytest.approx(0.6)
    assert per_class["tumor"]["dice"] == pytest.approx(0.75)
    # stroma: TP=2, FP=FN=0 -> 1, 1
    assert per_class["stroma"] == {"iou": 1.0, "dice": 1.0, "support": 2}


def test_absent_class_is_none_and_excluded_from_means() -> None:
    result = pixel_metrics(four_class_matrix(), NAMES)
    # necrosis: TP+FP+FN = 0 -> undefined
    assert result["per_class"]["necrosis"] == {"iou": None, "dice": None, "support": 0}
    # means over the three defined classes only:
    # mIoU = (0.6 + 0.6 + 1) / 3 = 2.2/3; mean Dice = (0.75 + 0.75 + 1) / 3 = 2.5/3
    assert result["miou"] == pytest.approx(2.2 / 3)
    assert result["mean_dice"] == pytest.approx(2.5 / 3)


def test_means_with_and_without_background() -> None:
    result = pixel_metrics(four_class_matrix(), NAMES, background_index=0)
    # without background: (0.6 + 1) / 2 = 0.8; Dice (0.75 + 1) / 2 = 0.875
    assert result["miou_no_background"] == pytest.approx(0.8)
    assert result["mean_dice_no_background"] == pytest.approx(0.875)
    assert result["background_index"] == 0

    no_bg = pixel_metrics(four_class_matrix(), NAMES, background_index=None)
    # no background class declared: the "no background" values equal the full ones
    assert no_bg["background_index"] is None
    assert no_bg["miou_no_background"] == no_bg["miou"] == pytest.approx(2.2 / 3)
    assert no_bg["mean_dice_no_background"] == no_bg["mean_dice"]

    # background is the first class here; using class 2 as "background" instead
    # leaves classes 0 and 1: (0.6 + 0.6) / 2 = 0.6
    other = pixel_metrics(four_class_matrix(), NAMES, background_index=2)
    assert other["miou_no_background"] == pytest.approx(0.6)


def test_class_only_in_prediction_counts_as_zero() -> None:
    cm = ConfusionMatrix(num_classes=3)
    cm.update(np.array([0, 0, 1, 1]), np.array([0, 2, 1, 1]))
    result = pixel_metrics(cm, ["bg", "a", "b"])
    # class 2: TP=0, FP=1, FN=0 -> IoU 0/1 = 0 (defined, so it is averaged)
    assert result["per_class"]["b"] == {"iou": 0.0, "dice": 0.0, "support": 0}
    # bg: TP=1, FN=1 -> IoU 1/2; a: IoU 1 -> mIoU = (0.5 + 1 + 0) / 3 = 0.5
    assert result["miou"] == pytest.approx(0.5)


def test_only_background_defined_gives_none_without_background() -> None:
    cm = ConfusionMatrix(num_classes=2)
    cm.update(np.zeros((3, 3), int), np.zeros((3, 3), int))
    result = pixel_metrics(cm, ["bg", "gland"])
    # bg: IoU 9/9 = 1; gland never appears -> None; no foreground class defined
    assert result["miou"] == 1.0
    assert result["miou_no_background"] is None
    assert result["mean_dice_no_background"] is None


def test_pixel_metrics_is_json_serialisable_and_validates() -> None:
    result = pixel_metrics(four_class_matrix(), NAMES)
    assert json.loads(json.dumps(result)) == result
    with pytest.raises(ValueError):
        pixel_metrics(four_class_matrix(), NAMES[:3])  # wrong number of names
    with pytest.raises(ValueError):
        pixel_metrics(ConfusionMatrix(4), NAMES)  # nothing accumulated


# ---------------------------------------------------------------------------
# instances_from_semantic
# ---------------------------------------------------------------------------


def test_instances_are_eight_connected() -> None:
    mask = np.zeros((6, 6), dtype=np.uint8)
    mask[0, 0] = mask[1, 1] = mask[2, 2] = 1  # diagonal chain: one object
    mask[5, 5] = 2  # semantic class 2 still counts as foreground; separate object
    instances = instances_from_semantic(mask)
    assert instances.dtype == np.int32
    # the diagonal pixels share label 1 (first in raster order); (5,5) is label 2
    assert instances[0, 0] == instances[1, 1] == instances[2, 2] == 1
    assert instances[5, 5] == 2
    assert instances.max() == 2


def test_instances_min_area_drops_and_renumbers() -> None:
    mask = np.zeros((10, 10), dtype=bool)
    mask[0, 0] = True  # area 1 (label 1 before filtering)
    mask[0, 5:8] = True  # area 3 (label 2)
    mask[5, 0:5] = True  # area 5 (label 3)
    instances = instances_from_semantic(mask, min_area=3)
    # area 1 < 3 removed; survivors renumbered 1, 2 in raster order
    assert instances[0, 0] == 0
    assert set(np.unique(instances)) == {0, 1, 2}
    assert (instances == 1).sum() == 3 and instances[0, 5] == 1
    assert (instances == 2).sum() == 5 and instances[5, 0] == 2


# ---------------------------------------------------------------------------
# Object F1
# ---------------------------------------------------------------------------


def test_object_metrics_perfect_prediction_with_other_labels() -> None:
    truth = two_glands()
    pred = np.where(truth == 1, 17, np.where(truth == 2, 4, 0))  # relabelled
    assert object_f1(truth, pred) == {
        "f1": 1.0,
        "precision": 1.0,
        "recall": 1.0,
        "tp": 2,
        "fp": 0,
        "fn": 0,
    }
    assert object_dice(truth, pred) == 1.0
    assert object_hausdorff(truth, pred) == 0.0


def test_object_metrics_empty_prediction() -> None:
    truth = two_glands()
    pred = np.zeros_like(truth)
    # nothing found: TP=0, FP=0, FN=2
    assert object_f1(truth, pred) == {
        "f1": 0.0,
        "precision": 0.0,
        "recall": 0.0,
        "tp": 0,
        "fp": 0,
        "fn": 2,
    }
    assert object_dice(truth, pred) == 0.0
    # convention: diagonal between pixel centres of the 10x10 image = hypot(9, 9)
    assert object_hausdorff(truth, pred) == pytest.approx(9 * math.sqrt(2))


def test_object_metrics_empty_truth() -> None:
    truth = np.zeros((4, 5), dtype=np.int32)
    pred = np.zeros((4, 5), dtype=np.int32)
    pred[0, 0] = 1
    pred[3, 4] = 2
    # two hallucinated glands: TP=0, FP=2, FN=0
    result = object_f1(truth, pred)
    assert (result["tp"], result["fp"], result["fn"]) == (0, 2, 0)
    assert result["f1"] == result["precision"] == result["recall"] == 0.0
    assert object_dice(truth, pred) == 0.0
    # 4x5 image: hypot(3, 4) = 5
    assert object_hausdorff(truth, pred) == pytest.approx(5.0)


def test_object_metrics_both_empty() -> None:
    empty = np.zeros((5, 5), dtype=np.int32)
    assert object_f1(empty, empty)["f1"] == 1.0
    assert object_dice(empty, empty) == 1.0
    assert object_hausdorff(empty, empty) == 0.0


def test_object_metrics_disjoint_objects() -> None:
    truth = np.zeros((4, 5), dtype=np.int32)
    pred = np.zeros((4, 5), dtype=np.int32)
    truth[0, 0] = 1
    pred[3, 4] = 1
    # S overlaps nothing -> FP; G unclaimed -> FN; F1 = 0/(0+1+1) = 0
    result = object_f1(truth, pred)
    assert (result["tp"], result["fp"], result["fn"], result["f1"]) == (0, 1, 1, 0.0)
    # no overlap on either side -> Dice 0 on both sides
    assert object_dice(truth, pred) == 0.0
    # each is the other's nearest object: H = |(0,0)-(3,4)| = 5 on both sides
    assert object_hausdorff(truth, pred) == pytest.approx(5.0)


def test_one_pixel_objects() -> None:
    truth = np.zeros((6, 6), dtype=np.int32)
    pred = np.zeros((6, 6), dtype=np.int32)
    truth[0, 0] = 1  # one-pixel gland, found exactly
    pred[0, 0] = 1
    truth[3:5, 3:5] = 2  # 4-pixel gland, hit by a single predicted pixel
    pred[3, 3] = 2
    result = object_f1(truth, pred)
    # S1: |S1 ∩ G1| / |G1| = 1/1 >= 0.5 -> TP
    # S2: |S2 ∩ G2| / |G2| = 1/4 < 0.5 -> FP; G2 then unclaimed -> FN
    assert (result["tp"], result["fp"], result["fn"]) == (1, 1, 1)
    assert result["f1"] == pytest.approx(0.5)  # 2*1 / (2*1 + 1 + 1)
    # Dice: S side, total area 2: 1/2 * Dice(1px,1px)=1 + 1/2 * 2*1/(1+4)=0.4 -> 0.7
    #       G side, total area 5: 1/5 * 1 + 4/5 * 0.4 = 0.52
    #       object Dice = (0.7 + 0.52) / 2 = 0.61
    assert object_dice(truth, pred) == pytest.approx(0.61)
    # Hausdorff: H(G1,S1) = 0; H(G2,S2) = |(4,4)-(3,3)| = sqrt(2)
    #   S side: 1/2*0 + 1/2*sqrt2; G side: 1/5*0 + 4/5*sqrt2
    #   total = (0.5 + 0.8) * sqrt2 / 2 = 0.65 * sqrt2
    assert object_hausdorff(truth, pred) == pytest.approx(0.65 * math.sqrt(2))


def test_large_prediction_covering_gland_is_true_positive() -> None:
    # Guards against the "50% of the segmented object" reading of the rule.
    truth = np.zeros((10, 10), dtype=np.int32)
    truth[4:6, 4:6] = 1  # 4 px
    pred = np.ones((10, 10), dtype=np.int32)  # 100 px
    # |S ∩ G| / |G| = 4/4 >= 0.5 -> TP (whereas 4/100 of S would be a miss)
    assert object_f1(truth, pred)["tp"] == 1


def test_merged_glands() -> None:
    truth, pred = merged_case()
    result = object_f1(truth, pred)
    # S overlaps G1 (10 px) most: 10/10 >= 0.5 -> TP; G2 unclaimed -> FN
    # P = 1/1, R = 1/2, F1 = 2*1/(2+0+1) = 2/3
    assert (result["tp"], result["fp"], result["fn"]) == (1, 0, 1)
    assert result["precision"] == 1.0
    assert result["recall"] == 0.5
    assert result["f1"] == pytest.approx(2 / 3)
    # Dice: S side (only S, w=1): Dice(G1, S) = 2*10/(10+20) = 2/3
    #   G side, total 18: 10/18 * 2/3 + 8/18 * Dice(G2,S)=2*8/(8+20)=4/7
    #     = 70/189 + 48/189 = 118/189
    #   object Dice = (126/189 + 118/189) / 2 = 122/189
    assert object_dice(truth, pred) == pytest.approx(122 / 189)
    # Hausdorff: H(G1, S) = col 9 -> col 4 = 5; H(G2, S) = col 0 -> col 6 = 6
    #   S side: 5; G side: 10/18 * 5 + 8/18 * 6 = 98/18 = 49/9
    #   total = (5 + 49/9) / 2 = 47/9
    assert object_hausdorff(truth, pred) == pytest.approx(47 / 9)


def test_split_gland() -> None:
    truth, pred = split_case()
    result = object_f1(truth, pred)
    # S1: 12/16 >= 0.5 -> TP; S2: 4/16 < 0.5 -> FP; G claimed -> FN = 0
    # P = 1/2, R = 1, F1 = 2/(2+1+0) = 2/3
    assert (result["tp"], result["fp"], result["fn"]) == (1, 1, 0)
    assert result["f1"] == pytest.approx(2 / 3)
    # Dice: S side, total 16: 12/16 * 2*12/(12+16)=6/7 + 4/16 * 2*4/(4+16)=2/5
    #     = 9/14 + 1/10 = 26/35
    #   G side: partner S1 (12 px overlap), Dice 6/7 = 30/35, w = 1
    #   object Dice = (26/35 + 30/35) / 2 = 28/35 = 0.8
    assert object_dice(truth, pred) == pytest.approx(0.8)
    # Hausdorff: H(G,S1) = 1 (col 3 of G is 1 from col 2); H(G,S2) = 3 (col 0 -> 3)
    #   S side: 12/16 * 1 + 4/16 * 3 = 1.5; G side: H(G,S1) = 1
    #   total = (1.5 + 1) / 2 = 1.25
    assert object_hausdorff(truth, pred) == pytest.approx(1.25)


def test_exact_half_split_counts_one_true_positive() -> None:
    truth = np.ones((4, 4), dtype=np.int32)
    pred = np.ones((4, 4), dtype=np.int32)
    pred[:, 2:] = 2
    # S1 and S2 each cover 8/16 = 0.5 of G -> both qualify, but G can be
    # matched once: TP = 1, FP = 1, FN = 0
    result = object_f1(truth, pred)
    assert (result["tp"], result["fp"], result["fn"]) == (1, 1, 0)


def test_hausdorff_unmatched_object_pairs_with_nearest_pixel_object() -> None:
    truth = np.zeros((3, 12), dtype=np.int32)
    pred = np.zeros((3, 12), dtype=np.int32)
    truth[1, 0:4] = 1  # G1: bar, closest pixel (1,3) is 2 from S, far end 5 away
    truth[1, 8] = 2  # G2: single pixel 3 from S
    pred[1, 5] = 1  # S: single pixel, overlaps nothing
    # S is paired with G1 (closest pixel distance 2 < 3), even though
    # H(G2, S) = 3 would be smaller than H(G1, S) = max(2, |(1,0)-(1,5)|) = 5.
    #   S side (w = 1): 5
    #   G side, total area 5: G1 (w=4/5) -> S, H = 5; G2 (w=1/5) -> S, H = 3
    #     = 4 + 0.6 = 4.6
    #   total = (5 + 4.6) / 2 = 4.8
    assert object_hausdorff(truth, pred) == pytest.approx(4.8)


def test_object_metrics_reject_mismatched_shapes() -> None:
    with pytest.raises(ValueError):
        object_f1(np.zeros((3, 3), int), np.zeros((3, 4), int))
    with pytest.raises(ValueError):
        object_dice(np.array([[-1, 0]]), np.zeros((1, 2), int))


def brute_force_object_hausdorff(truth: np.ndarray, pred: np.ndarray) -> float | None:
    """Direct transcription of the definition with all pairwise distances.

    Returns None when an unmatched object has two equally near candidates at
    different Hausdorff distances, because the definition leaves that tie open.
    """

    def coords(image: np.ndarray, label: int) -> np.ndarray:
        return np.argwhere(image == label)

    def hausdorff(a: np.ndarray, b: np.ndarray) -> float:
        d = cdist(a, b)
        return float(max(d.min(axis=1).max(), d.min(axis=0).max()))

    def side(own: np.ndarray, other: np.ndarray) -> float | None:
        own_labels = [v for v in np.unique(own) if v]
        other_labels = [v for v in np.unique(other) if v]
        total = sum((own == v).sum() for v in own_labels)
        acc = 0.0
        for v in own_labels:
            pts = coords(own, v)
            overlaps = [((own == v) & (other == u)).sum() for u in other_labels]
            if max(overlaps) > 0:
                candidates = [other_labels[int(np.argmax(overlaps))]]
            else:
                closest = [cdist(pts, coords(other, u)).min() for u in other_labels]
                candidates = [u for u, c in zip(other_labels, closest, strict=True) if c == min(closest)]
            distances = {hausdorff(pts, coords(other, u)) for u in candidates}
            if len(distances) > 1:
                return None  # equally near objects at different distances
            acc += len(pts) / total * distances.pop()
        return acc

    pred_side, truth_side = side(pred, truth), side(truth, pred)
    if pred_side is None or truth_side is None:
        return None
    return 0.5 * (pred_side + truth_side)


def random_ellipses(rng: np.random.Generator) -> np.ndarray:
    """2-6 ellipses with real-valued centres, so that two objects being exactly
    equally near (an ambiguous pairing) stays rare."""
    rows, cols = np.mgrid[:40, :40]
    mask = np.zeros((40, 40), dtype=bool)
    for _ in range(rng.integers(2, 7)):
        r, c = rng.uniform(0, 40, 2)
        a, b = rng.uniform(1.5, 7, 2)
        mask |= ((rows - r) / a) ** 2 + ((cols - c) / b) ** 2 < 1
    return mask


def test_hausdorff_matches_brute_force_on_random_ellipses() -> None:
    # Not hand-computed: cross-checks the EDT/bounding-box implementation and
    # the nearest-object pairing against the definition on many layouts.
    rng = np.random.default_rng(0)
    compared = 0
    for _ in range(30):
        truth = instances_from_semantic(random_ellipses(rng))
        pred = instances_from_semantic(random_ellipses(rng))
        expected = brute_force_object_hausdorff(truth, pred)
        if expected is None:
            continue  # nearest-object tie: either choice is valid
        compared += 1
        assert object_hausdorff(truth, pred) == pytest.approx(expected)
    assert compared >= 20


# ---------------------------------------------------------------------------
# GlandMetrics
# ---------------------------------------------------------------------------


def test_gland_metrics_pools_f1_and_averages_the_rest() -> None:
    metrics = GlandMetrics()
    truth = two_glands()
    metrics.update(truth, truth)  # perfect: TP=2, F1=1, Dice=1, H=0
    merged_truth, merged_pred = merged_case()
    metrics.update(merged_truth, merged_pred)  # TP=1, FN=1, F1=2/3
    summary = metrics.summary()
    assert summary["images"] == 2
    assert (summary["tp"], summary["fp"], summary["fn"]) == (3, 0, 1)
    # pooled: F1 = 2*3 / (2*3 + 0 + 1) = 6/7
    assert summary["object_f1"] == pytest.approx(6 / 7)
    # per-image mean: (1 + 2/3) / 2 = 5/6
    assert summary["object_f1_mean_of_images"] == pytest.approx(5 / 6)
    # Dice mean: (1 + 122/189) / 2; Hausdorff mean: (0 + 47/9) / 2 = 47/18
    assert summary["object_dice"] == pytest.approx((1 + 122 / 189) / 2)
    assert summary["object_hausdorff"] == pytest.approx(47 / 18)
    assert json.loads(json.dumps(summary)) == summary


def test_gland_metrics_summary_without_images_raises() -> None:
    with pytest.raises(ValueError):
        GlandMetrics().summary()
