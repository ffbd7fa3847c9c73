"""Hand-computed checks for pathseg.metrics.pixel (pixel metrics and instance maps).

Every expected number is derived in a comment next to its assertion, on grids
small enough to verify by eye. The GlaS object metrics
(pathseg.metrics.objects) are tested in test_objects.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from pathseg.metrics.pixel import ConfusionMatrix, instances_from_semantic, pixel_metrics

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
