"""Hand-computed checks for the GlaS object metrics in pathseg.metrics.objects.

Every expected number is derived in a comment next to its assertion, on grids
small enough to verify by eye. The rules are those of the official GlaS
evaluation code (F1score.m, ObjectDice.m, ObjectHausdorff.m): a hit covers
strictly more than half of its ground truth, an object overlapping nothing is
paired at the minimum Hausdorff distance, and split-level Dice and Hausdorff
weight every object by its area among all objects of the split.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from pathseg.metrics.objects import GlandMetrics, object_dice, object_f1, object_hausdorff
from pathseg.metrics.pixel import instances_from_semantic

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
    # labels too large for a lookup table take the sorting path: same answers
    huge = np.where(truth == 1, 2**40, np.where(truth == 2, 2**50, 0))
    assert object_f1(truth, huge)["tp"] == 2
    assert object_dice(huge, pred) == 1.0
    assert object_hausdorff(huge, truth) == 0.0


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
    # S1: |S1 ∩ G1| / |G1| = 1/1 > 0.5 -> TP
    # S2: |S2 ∩ G2| / |G2| = 1/4 <= 0.5 -> FP; G2 then unclaimed -> FN
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
    # |S ∩ G| / |G| = 4/4 > 0.5 -> TP (whereas 4/100 of S would be a miss)
    assert object_f1(truth, pred)["tp"] == 1


def test_merged_glands() -> None:
    truth, pred = merged_case()
    result = object_f1(truth, pred)
    # S overlaps G1 (10 px) most: 10/10 > 0.5 -> TP; G2 unclaimed -> FN
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
    # S1: 12/16 > 0.5 -> TP; S2: 4/16 <= 0.5 -> FP; G claimed -> FN = 0
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


def test_exact_half_split_counts_no_true_positive() -> None:
    truth = np.ones((4, 4), dtype=np.int32)
    pred = np.ones((4, 4), dtype=np.int32)
    pred[:, 2:] = 2
    # S1 and S2 each cover 8/16 = 0.5 of G, not strictly more than half:
    # neither is a hit (F1score.m tests overlap/area(G) > 0.5), so TP = 0,
    # FP = 2, and G is missed: FN = 1; F1 = 0 / (0 + 2 + 1) = 0
    result = object_f1(truth, pred)
    assert (result["tp"], result["fp"], result["fn"]) == (0, 2, 1)
    assert result["f1"] == 0.0


def test_fifty_one_forty_nine_split_counts_one_true_positive() -> None:
    truth = np.ones((10, 10), dtype=np.int32)  # G: 100 px
    pred = np.full((10, 10), 2, dtype=np.int32)
    pred[:, 0:5] = 1
    pred[0, 5] = 1  # S1: 50 + 1 = 51 px, S2: the other 49 px
    # S1: 51/100 > 0.5 -> TP; S2: 49/100 -> FP; G claimed -> FN = 0
    # F1 = 2*1 / (2*1 + 1 + 0) = 2/3
    result = object_f1(truth, pred)
    assert (result["tp"], result["fp"], result["fn"]) == (1, 1, 0)
    assert result["f1"] == pytest.approx(2 / 3)


def test_hausdorff_unmatched_single_pixel_pairs_at_minimum_hausdorff() -> None:
    truth = np.zeros((3, 12), dtype=np.int32)
    pred = np.zeros((3, 12), dtype=np.int32)
    truth[1, 0:4] = 1  # G1: bar, closest pixel (1,3) is 2 from S, far end (1,0) is 5 away
    truth[1, 8] = 2  # G2: single pixel 3 from S
    pred[1, 5] = 1  # S: single pixel, overlaps nothing
    # H(G1, S) = max(5, 2) = 5; H(G2, S) = 3. S is paired with the object at
    # the minimum Hausdorff distance, G2 (not G1, whose nearest pixel is closer).
    #   S side (w = 1): 3
    #   G side, total area 5: G1 (w=4/5) has only S to pair with, H = 5;
    #     G2 (w=1/5) -> S, H = 3; = 4 + 0.6 = 4.6
    #   total = (3 + 4.6) / 2 = 3.8
    assert object_hausdorff(truth, pred) == pytest.approx(3.8)


def test_hausdorff_lone_object_near_long_bar_pairs_with_same_shaped_object() -> None:
    truth = np.zeros((6, 12), dtype=np.int32)
    pred = np.zeros((6, 12), dtype=np.int32)
    pred[1, 8:11] = 1  # S: 3-px bar, overlaps nothing
    truth[1, 0:7] = 1  # G1: long thin bar whose end (1,6) is 2 from S's end (1,8)
    truth[4, 8:11] = 2  # G2: S's shape shifted 3 rows down: nearest pixel 3 away
    # H(G1, S): G1's far end (1,0) is 8 from S's nearest pixel (1,8); S's far
    #   end (1,10) is 4 from (1,6) -> max(8, 4) = 8
    # H(G2, S): every pixel is exactly 3 below/above its twin -> 3
    # Official pairing (min Hausdorff): S -> G2, 3. The nearest-pixel rule
    # would pick G1 (2 < 3) and give 8.
    #   S side (w = 1): 3
    #   G side, total area 10: G1 (7 px, overlaps nothing, only S to pair
    #     with) H = 8; G2 (3 px) -> S, H = 3: 7/10*8 + 3/10*3 = 6.5
    #   total = (3 + 6.5) / 2 = 4.75  (nearest-pixel rule: (8 + 6.5) / 2 = 7.25)
    assert object_hausdorff(truth, pred) == pytest.approx(4.75)


def test_object_metrics_reject_mismatched_shapes() -> None:
    with pytest.raises(ValueError):
        object_f1(np.zeros((3, 3), int), np.zeros((3, 4), int))
    with pytest.raises(ValueError):
        object_dice(np.array([[-1, 0]]), np.zeros((1, 2), int))


def brute_force_object_hausdorff(truth: np.ndarray, pred: np.ndarray) -> float:
    """Direct transcription of ObjectHausdorff.m with all pairwise distances.

    Each object is paired with the other-set object it overlaps most (smallest
    label on a tie, as MATLAB's mode); an object overlapping nothing is paired
    with the object at the minimum Hausdorff distance (any tie gives the same
    value). Image-empty conventions as documented: an object with no object
    on the other side gets the image diagonal, both sides empty give 0.
    """
    diagonal = math.hypot(truth.shape[0] - 1, truth.shape[1] - 1)

    def coords(image: np.ndarray, label: int) -> np.ndarray:
        return np.argwhere(image == label)

    def hausdorff(a: np.ndarray, b: np.ndarray) -> float:
        d = cdist(a, b)
        return float(max(d.min(axis=1).max(), d.min(axis=0).max()))

    def side(own: np.ndarray, other: np.ndarray) -> float | None:
        own_labels = [v for v in np.unique(own) if v]
        other_labels = [v for v in np.unique(other) if v]
        if not own_labels:
            return None
        total = sum((own == v).sum() for v in own_labels)
        acc = 0.0
        for v in own_labels:
            pts = coords(own, v)
            if not other_labels:
                distance = diagonal
            else:
                overlaps = [((own == v) & (other == u)).sum() for u in other_labels]
                if max(overlaps) > 0:
                    distance = hausdorff(pts, coords(other, other_labels[int(np.argmax(overlaps))]))
                else:
                    distance = min(hausdorff(pts, coords(other, u)) for u in other_labels)
            acc += len(pts) / total * distance
        return acc

    sides = [value for value in (side(pred, truth), side(truth, pred)) if value is not None]
    return sum(sides) / len(sides) if sides else 0.0


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
    # the pruned minimum-Hausdorff search against the definition on many layouts.
    rng = np.random.default_rng(0)
    with_unmatched = 0
    for _ in range(40):
        truth = instances_from_semantic(random_ellipses(rng))
        pred = instances_from_semantic(random_ellipses(rng))
        overlap = (truth > 0) & (pred > 0)
        with_unmatched += any(
            not overlap[image == label].any() for image in (truth, pred) for label in np.unique(image) if label
        )
        assert object_hausdorff(truth, pred) == pytest.approx(brute_force_object_hausdorff(truth, pred))
    assert with_unmatched >= 10  # the unmatched-object pairing was exercised


# ---------------------------------------------------------------------------
# GlandMetrics
# ---------------------------------------------------------------------------


def test_gland_metrics_pools_over_objects_of_the_split() -> None:
    metrics = GlandMetrics()
    truth = two_glands()
    metrics.update(truth, truth)  # perfect: TP=2, F1=1, Dice=1, H=0
    merged_truth, merged_pred = merged_case()
    metrics.update(merged_truth, merged_pred)  # TP=1, FN=1, F1=2/3
    summary = metrics.summary()
    assert summary["images"] == 2
    assert (summary["tp"], summary["fp"], summary["fn"]) == (3, 0, 1)
    # pooled: F1 = 2*3 / (2*3 + 0 + 1) = 6/7; per-image mean: (1 + 2/3) / 2 = 5/6
    assert summary["object_f1"] == pytest.approx(6 / 7)
    assert summary["object_f1_mean_of_images"] == pytest.approx(5 / 6)
    # Dice, segmented side: image 1 two 9-px objects with Dice 1 (area 18,
    #   sum 18); image 2 one 20-px S with Dice 2/3 (sum 40/3)
    #   -> (18 + 40/3) / 38 = 94/114 = 47/57
    # ground-truth side: image 1 area 18, sum 18; image 2 G1 10 px * 2/3 +
    #   G2 8 px * 4/7 = 20/3 + 32/7 = 236/21 -> (18 + 236/21) / 36 = 307/378
    assert summary["object_dice"] == pytest.approx((47 / 57 + 307 / 378) / 2)
    assert summary["object_dice_mean_of_images"] == pytest.approx((1 + 122 / 189) / 2)
    # Hausdorff, segmented side: image 1 all 0; image 2 S (20 px) H = 5
    #   -> 100 / 38 = 50/19
    # ground-truth side: image 2 G1 10 px * 5 + G2 8 px * 6 = 98 -> 98 / 36 = 49/18
    assert summary["object_hausdorff"] == pytest.approx((50 / 19 + 49 / 18) / 2)
    # per-image mean: (0 + 47/9) / 2 = 47/18
    assert summary["object_hausdorff_mean_of_images"] == pytest.approx(47 / 18)
    assert json.loads(json.dumps(summary)) == summary


def test_gland_metrics_weights_objects_by_area_not_images() -> None:
    big_truth = np.zeros((20, 20), dtype=np.int32)
    big_truth[5:15, 5:15] = 1  # 100 px, segmented perfectly: Dice 1, H 0
    tiny_truth = np.zeros((10, 10), dtype=np.int32)
    tiny_truth[4:6, 4:6] = 1  # 4 px
    tiny_pred = np.zeros((10, 10), dtype=np.int32)
    tiny_pred[4, 4] = 1  # 1 px inside it
    # tiny image: Dice(G, S) = 2*1 / (4 + 1) = 0.4 on both sides;
    #   H(G, S) = |(5,5) - (4,4)| = sqrt2 on both sides
    metrics = GlandMetrics()
    metrics.update(big_truth, big_truth)
    metrics.update(tiny_truth, tiny_pred)
    summary = metrics.summary()
    # segmented side: (100 * 1 + 1 * 0.4) / 101; truth side: (100 * 1 + 4 * 0.4) / 104
    pooled_dice = (100.4 / 101 + 101.6 / 104) / 2
    assert summary["object_dice"] == pytest.approx(pooled_dice)
    assert summary["object_dice_mean_of_images"] == pytest.approx((1 + 0.4) / 2)
    # segmented side: (100 * 0 + 1 * sqrt2) / 101; truth side: 4 * sqrt2 / 104
    pooled_hausdorff = (math.sqrt(2) / 101 + 4 * math.sqrt(2) / 104) / 2
    assert summary["object_hausdorff"] == pytest.approx(pooled_hausdorff)
    assert summary["object_hausdorff_mean_of_images"] == pytest.approx(math.sqrt(2) / 2)
    # the big object dominates the pooled figures, not the per-image means
    assert summary["object_dice"] > 0.98 > summary["object_dice_mean_of_images"]
    assert summary["object_hausdorff"] < 0.05 < summary["object_hausdorff_mean_of_images"]
    # F1: big image TP = 1; tiny S covers 1/4 -> FP, G missed -> FN: 2 / (2 + 1 + 1)
    assert (summary["tp"], summary["fp"], summary["fn"]) == (1, 1, 1)
    assert summary["object_f1"] == pytest.approx(0.5)


def test_gland_metrics_image_without_prediction_uses_the_empty_conventions() -> None:
    big_truth = np.zeros((20, 20), dtype=np.int32)
    big_truth[5:15, 5:15] = 1  # 100 px, perfect
    missed = np.zeros((10, 10), dtype=np.int32)
    missed[4:6, 4:6] = 1  # 4 px, nothing segmented in its image
    metrics = GlandMetrics()
    metrics.update(big_truth, big_truth)
    metrics.update(missed, np.zeros_like(missed))
    summary = metrics.summary()
    # the missed gland has Dice 0 and H = its image diagonal hypot(9, 9) = 9 sqrt2
    # Dice: segmented side 1 (only the big S); truth side 100 / 104
    assert summary["object_dice"] == pytest.approx((1 + 100 / 104) / 2)
    # Hausdorff: segmented side 0; truth side 4 * 9 sqrt2 / 104 = 9 sqrt2 / 26
    assert summary["object_hausdorff"] == pytest.approx(9 * math.sqrt(2) / 52)
    assert summary["object_hausdorff_mean_of_images"] == pytest.approx(9 * math.sqrt(2) / 2)


def test_gland_metrics_split_without_any_prediction() -> None:
    first = np.zeros((10, 10), dtype=np.int32)
    first[4:6, 4:6] = 1  # 4 px, image diagonal 9 sqrt2
    second = np.zeros((4, 5), dtype=np.int32)
    second[0, 0] = 1  # 1 px, image diagonal hypot(3, 4) = 5
    metrics = GlandMetrics()
    metrics.update(first, np.zeros_like(first))
    metrics.update(second, np.zeros_like(second))
    summary = metrics.summary()
    # no segmented side at all: the truth side alone counts
    assert summary["object_dice"] == 0.0
    assert summary["object_hausdorff"] == pytest.approx((4 * 9 * math.sqrt(2) + 1 * 5) / 5)
    assert (summary["tp"], summary["fp"], summary["fn"], summary["object_f1"]) == (0, 0, 2, 0.0)


def test_gland_metrics_split_of_empty_images() -> None:
    metrics = GlandMetrics()
    metrics.update(np.zeros((5, 5), int), np.zeros((5, 5), int))
    summary = metrics.summary()
    # nothing to find, nothing found: the both-empty conventions
    assert (summary["object_f1"], summary["object_dice"], summary["object_hausdorff"]) == (1.0, 1.0, 0.0)


def test_gland_metrics_on_one_image_equals_the_single_image_functions() -> None:
    rng = np.random.default_rng(1)
    for _ in range(10):
        truth = instances_from_semantic(random_ellipses(rng))
        pred = instances_from_semantic(random_ellipses(rng))
        metrics = GlandMetrics()
        metrics.update(truth, pred)
        summary = metrics.summary()
        assert summary["object_f1"] == pytest.approx(object_f1(truth, pred)["f1"])
        assert summary["object_dice"] == pytest.approx(object_dice(truth, pred))
        assert summary["object_hausdorff"] == pytest.approx(object_hausdorff(truth, pred))
        assert summary["object_dice"] == pytest.approx(summary["object_dice_mean_of_images"])


def test_gland_metrics_keeps_no_per_image_state() -> None:
    # Memory must not grow with the number of images: only scalars and one
    # fixed-size array of sums are kept.
    metrics = GlandMetrics()
    truth = two_glands()
    for _ in range(50):
        metrics.update(truth, truth)
    assert metrics.images == 50
    for value in vars(metrics).values():
        assert np.size(value) <= 6


def test_gland_metrics_summary_without_images_raises() -> None:
    with pytest.raises(ValueError):
        GlandMetrics().summary()
