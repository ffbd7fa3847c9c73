"""Pixel metrics for histology segmentation.

Pixel-level metrics (IoU / Dice per class) live here, accumulated through a
confusion matrix so that a whole split can be scored without keeping every
mask in memory and so that per-worker results can be merged; so does
:func:`instances_from_semantic`, which turns a semantic prediction into the
instance map the object metrics score.

The GlaS object-level metrics (object F1, Dice, Hausdorff and the split-level
:class:`GlandMetrics`) live in :mod:`pathseg.metrics.objects`.

Only numpy and scipy.ndimage are used so the module has no heavy optional
dependencies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

__all__ = ["ConfusionMatrix", "background_index_of", "instances_from_semantic", "pixel_metrics"]

# 3x3 structure: predicted pixels touching only at a corner are treated as one
# gland. Splitting them would turn a single ragged prediction into several
# false positives, which says more about connectivity than about the model.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


# ---------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------


def _as_label_array(values: np.ndarray, name: str) -> np.ndarray:
    """Return labels as int64.

    Float inputs are rejected rather than rounded: a float mask almost always
    means probabilities were passed where an argmax was intended, and silently
    truncating them would produce plausible-looking but wrong numbers. Casting
    to int64 also makes comparisons with e.g. ``ignore_index=-1`` safe for
    unsigned inputs.
    """
    array = np.asarray(values)
    if array.dtype != bool and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must hold integer labels, got dtype {array.dtype}")
    return array.astype(np.int64, copy=False)


def _check_same_shape(truth: np.ndarray, prediction: np.ndarray) -> None:
    if truth.shape != prediction.shape:
        raise ValueError(f"truth and prediction shapes differ: {truth.shape} vs {prediction.shape}")


def _check_label_range(labels: np.ndarray, num_classes: int, name: str) -> None:
    """Fail loudly on out-of-range labels: bincount would otherwise fold them
    into neighbouring cells of the matrix without any warning."""
    if labels.size == 0:
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise ValueError(f"{name} labels must lie in [0, {num_classes}), found range [{low}, {high}]")


# ---------------------------------------------------------------------------
# Pixel-level metrics
# ---------------------------------------------------------------------------


@dataclass
class ConfusionMatrix:
    """Accumulates a (num_classes, num_classes) int64 matrix over many images:
    rows = truth, cols = prediction.

    Accumulating counts (rather than averaging per-image scores) gives the
    dataset-level IoU that BCSS and most segmentation papers report, and it
    weights large and small images by their pixel counts.
    """

    num_classes: int
    ignore_index: int | None = None
    matrix: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {self.num_classes}")
        self.matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def update(self, truth: np.ndarray, prediction: np.ndarray) -> None:
        """Add one image (or batch) of labels; any shape, as long as both agree.

        Predictions at ignored pixels are not validated: those pixels are
        unlabelled, so whatever the model said there carries no information.
        """
        truth_flat = _as_label_array(truth, "truth")
        pred_flat = _as_label_array(prediction, "prediction")
        _check_same_shape(truth_flat, pred_flat)
        truth_flat = truth_flat.ravel()
        pred_flat = pred_flat.ravel()
        if self.ignore_index is not None:
            keep = truth_flat != self.ignore_index
            truth_flat = truth_flat[keep]
            pred_flat = pred_flat[keep]
        _check_label_range(truth_flat, self.num_classes, "truth")
        _check_label_range(pred_flat, self.num_classes, "prediction")
        n = self.num_classes
        counts = np.bincount(truth_flat * n + pred_flat, minlength=n * n)
        self.matrix += counts.reshape(n, n)

    def merge(self, other: ConfusionMatrix) -> None:
        """Fold in a matrix accumulated elsewhere (e.g. another worker)."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge {other.num_classes}-class matrix into {self.num_classes}-class matrix")
        if other.ignore_index != self.ignore_index:
            raise ValueError("cannot merge matrices built with different ignore_index")
        self.matrix += other.matrix


def _mean_defined(values: list[float | None]) -> float | None:
    """Average only classes that have a defined score.

    A class absent from both truth and prediction has IoU 0/0; counting it as
    0 would punish a model for a class the data never asked about, and
    counting it as 1 would reward it for nothing.
    """
    defined = [v for v in values if v is not None]
    if not defined:
        return None
    return float(sum(defined) / len(defined))


def background_index_of(class_names: list[str]) -> int | None:
    """The class called background, if any: BCSS's class 0 is tumor, and must not be dropped as background."""
    names = [name.strip().lower() for name in class_names]
    return names.index("background") if "background" in names else None


def pixel_metrics(cm: ConfusionMatrix, class_names: list[str], background_index: int | None = 0) -> dict[str, Any]:
    """Summarise a confusion matrix as a JSON-serialisable dict.

    Keys: ``pixel_accuracy``; ``per_class`` mapping each name to ``iou``,
    ``dice`` (None when the class is absent from both truth and prediction) and
    ``support`` (number of truth pixels); ``miou`` / ``mean_dice`` over defined
    classes including background; ``miou_no_background`` /
    ``mean_dice_no_background`` with the background class left out (equal to
    the including values when ``background_index`` is None, and None when no
    foreground class is defined); and ``background_index`` itself so a reader
    of a saved report knows which convention produced it.
    """
    n = cm.num_classes
    if len(class_names) != n:
        raise ValueError(f"expected {n} class names, got {len(class_names)}")
    if len(set(class_names)) != n:
        raise ValueError("class names must be unique (they key the per-class dict)")
    if background_index is not None and not 0 <= background_index < n:
        raise ValueError(f"background_index {background_index} outside [0, {n})")
    matrix = cm.matrix
    total = int(matrix.sum())
    if total == 0:
        raise ValueError("confusion matrix is empty; no pixels were accumulated")

    true_positive = np.diag(matrix)
    support = matrix.sum(axis=1)
    predicted = matrix.sum(axis=0)
    union = support + predicted - true_positive  # TP + FP + FN

    per_class: dict[str, dict[str, float | int | None]] = {}
    ious: list[float | None] = []
    dices: list[float | None] = []
    for k, name in enumerate(class_names):
        tp, denom = int(true_positive[k]), int(union[k])
        iou = tp / denom if denom else None
        dice = 2 * tp / (denom + tp) if denom else None  # 2TP / (2TP + FP + FN)
        per_class[name] = {"iou": iou, "dice": dice, "support": int(support[k])}
        ious.append(iou)
        dices.append(dice)

    miou = _mean_defined(ious)
    mean_dice = _mean_defined(dices)
    if background_index is None:
        miou_fg, mean_dice_fg = miou, mean_dice
    else:
        miou_fg = _mean_defined([v for k, v in enumerate(ious) if k != background_index])
        mean_dice_fg = _mean_defined([v for k, v in enumerate(dices) if k != background_index])
    return {
        "pixel_accuracy": float(true_positive.sum() / total),
        "per_class": per_class,
        "miou": miou,
        "mean_dice": mean_dice,
        "miou_no_background": miou_fg,
        "mean_dice_no_background": mean_dice_fg,
        "background_index": background_index,
    }


# ---------------------------------------------------------------------------
# Instance maps
# ---------------------------------------------------------------------------


def instances_from_semantic(mask: np.ndarray, min_area: int = 0) -> np.ndarray:
    """Turn a foreground mask (anything > 0) into an int32 instance map.

    Networks predict semantic masks, but GlaS scores objects, so predictions
    must be split into 8-connected components first. ``min_area`` drops specks
    that would otherwise each count as a false-positive gland; survivors are
    renumbered 1..n so downstream code can rely on consecutive labels.
    """
    array = np.asarray(mask)
    if array.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {array.shape}")
    labels, count = ndimage.label(array > 0, structure=_EIGHT_CONNECTED)
    if count == 0:
        return np.zeros(array.shape, dtype=np.int32)
    areas = np.bincount(labels.ravel(), minlength=count + 1)
    keep = areas >= min_area
    keep[0] = False
    lookup = np.zeros(count + 1, dtype=np.int32)
    lookup[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return lookup[labels]
