"""Evaluation metrics for histology segmentation.

Two families live here:

* Pixel-level metrics (IoU / Dice per class) accumulated through a confusion
  matrix, so that a whole split can be scored without keeping every mask in
  memory and so that per-worker results can be merged.
* GlaS challenge object-level metrics (object F1, object Dice, object
  Hausdorff; Sirinukunwattana et al., 2017), computed on instance label maps.
  Gland segmentation is judged per gland, not per pixel, because merging two
  neighbouring glands is a clinically meaningful error that pixel metrics
  barely register.

Only numpy and scipy.ndimage are used so the module has no heavy optional
dependencies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

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


# ---------------------------------------------------------------------------
# GlaS object-level metrics
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _ObjectPairing:
    """Overlap bookkeeping shared by the three object metrics.

    Labels are remapped to 0..n (in increasing order of the original label
    values) so that arbitrary, non-consecutive instance ids can index arrays;
    ties between equally overlapping partners therefore go to the object with
    the smaller original label.
    """

    truth: np.ndarray  # (H, W) int64, 0 = background, 1..n_truth
    pred: np.ndarray  # (H, W) int64, 0 = background, 1..n_pred
    n_truth: int
    n_pred: int
    intersection: np.ndarray  # (n_truth, n_pred) pixel counts of G_j ∩ S_i
    truth_area: np.ndarray  # (n_truth,)
    pred_area: np.ndarray  # (n_pred,)


def _consecutive_labels(instances: np.ndarray, name: str) -> tuple[np.ndarray, int]:
    array = _as_label_array(instances, name)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D instance map, got shape {array.shape}")
    if array.size and int(array.min()) < 0:
        raise ValueError(f"{name} contains negative labels")
    values, inverse = np.unique(array, return_inverse=True)
    inverse = inverse.reshape(array.shape).astype(np.int64)
    if values.size and values[0] != 0:
        inverse += 1  # no background pixel: every value is an object
    return inverse, int(np.count_nonzero(values))


def _pair_objects(truth_instances: np.ndarray, pred_instances: np.ndarray) -> _ObjectPairing:
    truth, n_truth = _consecutive_labels(truth_instances, "truth_instances")
    pred, n_pred = _consecutive_labels(pred_instances, "pred_instances")
    _check_same_shape(truth, pred)
    table = np.bincount((truth * (n_pred + 1) + pred).ravel(), minlength=(n_truth + 1) * (n_pred + 1)).reshape(
        n_truth + 1, n_pred + 1
    )
    return _ObjectPairing(
        truth=truth,
        pred=pred,
        n_truth=n_truth,
        n_pred=n_pred,
        intersection=table[1:, 1:],
        truth_area=table[1:, :].sum(axis=1),
        pred_area=table[:, 1:].sum(axis=0),
    )


def _f1_from_counts(tp: int, fp: int, fn: int) -> dict[str, float | int]:
    """F1 = 2TP / (2TP + FP + FN), which equals 2PR/(P+R) but needs no 0/0 case
    when TP = 0. Nothing to find and nothing found is a perfect answer (1.0)."""
    if tp + fp + fn == 0:
        return {"f1": 1.0, "precision": 1.0, "recall": 1.0, "tp": 0, "fp": 0, "fn": 0}
    return {
        "f1": 2 * tp / (2 * tp + fp + fn),
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / (tp + fn) if tp + fn else 0.0,
        "tp": tp,
        "fp": fp,
        "fn": fn,
    }


def _detection_counts(pairing: _ObjectPairing) -> tuple[int, int, int]:
    """Count TP/FP/FN with the GlaS rule.

    A segmented object S is a candidate hit when it covers at least half of
    G*, the ground-truth object it overlaps most (|S ∩ G*| >= |G*| / 2). Each
    G may be claimed once, so TP is the number of distinct G* among the
    candidates and every other segmented object is a false positive. (Since
    intersections are disjoint, two candidates can share a G only by covering
    exactly 50% each; which of them is "the" hit does not change the counts.)
    """
    n_truth, n_pred = pairing.n_truth, pairing.n_pred
    if n_truth == 0 or n_pred == 0:
        return 0, n_pred, n_truth
    inter = pairing.intersection
    best_truth = inter.argmax(axis=0)
    best_overlap = inter[best_truth, np.arange(n_pred)]
    # Integer comparison keeps the exact 50% boundary free of rounding.
    is_candidate = (best_overlap > 0) & (2 * best_overlap >= pairing.truth_area[best_truth])
    tp = int(np.unique(best_truth[is_candidate]).size)
    return tp, n_pred - tp, n_truth - tp


def object_f1(truth_instances: np.ndarray, pred_instances: np.ndarray) -> dict[str, Any]:
    """GlaS object-level detection F1 for one image.

    Returns ``f1``, ``precision``, ``recall``, ``tp``, ``fp``, ``fn``. Both
    images empty gives f1 = precision = recall = 1.0; exactly one empty gives
    0.0 for all three.
    """
    tp, fp, fn = _detection_counts(_pair_objects(truth_instances, pred_instances))
    return _f1_from_counts(tp, fp, fn)


def _one_sided_dice(inter: np.ndarray, own_area: np.ndarray, other_area: np.ndarray) -> float:
    """Area-weighted Dice of each row object against its max-overlap column object.

    An object overlapping nothing has best intersection 0 and so Dice 0,
    whichever partner argmax happens to name.
    """
    best = inter.argmax(axis=1)
    best_inter = inter[np.arange(inter.shape[0]), best]
    dice = 2 * best_inter / (own_area + other_area[best])
    weights = own_area / own_area.sum()
    return float(np.sum(weights * dice))


def _object_dice(pairing: _ObjectPairing) -> float:
    if pairing.n_truth == 0 and pairing.n_pred == 0:
        return 1.0
    if pairing.n_truth == 0 or pairing.n_pred == 0:
        return 0.0
    inter = pairing.intersection
    pred_side = _one_sided_dice(inter.T, pairing.pred_area, pairing.truth_area)
    truth_side = _one_sided_dice(inter, pairing.truth_area, pairing.pred_area)
    return 0.5 * (pred_side + truth_side)


def object_dice(truth_instances: np.ndarray, pred_instances: np.ndarray) -> float:
    """GlaS object-level Dice for one image.

    Averages a prediction-weighted and a truth-weighted term so that both
    over-segmentation (many small predictions) and under-segmentation (merged
    glands) are penalised. Both empty -> 1.0; exactly one empty -> 0.0.
    """
    return _object_dice(_pair_objects(truth_instances, pred_instances))


def _nearest_partners(own: np.ndarray, other: np.ndarray, objects: np.ndarray) -> np.ndarray:
    """For each label in ``objects`` (from ``own``), the ``other`` label whose
    closest pixel is nearest to the object.

    One EDT with return_indices tells, for every pixel, which ``other`` pixel
    is nearest; the object's pixel with the smallest such distance then names
    the nearest object. This is exact and costs one transform per image
    instead of one per candidate pair.
    """
    distance, (rows, cols) = ndimage.distance_transform_edt(other == 0, return_indices=True)
    nearest_label = other[rows, cols]
    positions = ndimage.minimum_position(distance, labels=own, index=objects)
    return np.array([nearest_label[pos] for pos in positions], dtype=np.int64)


def _partners(inter: np.ndarray, own: np.ndarray, other: np.ndarray) -> np.ndarray:
    """1-based partner label for every own object: max overlap, else nearest."""
    best = inter.argmax(axis=1) + 1
    unmatched = np.flatnonzero(inter.max(axis=1) == 0) + 1
    if unmatched.size:
        best[unmatched - 1] = _nearest_partners(own, other, unmatched)
    return best


def _union_box(first: tuple[slice, slice], second: tuple[slice, slice]) -> tuple[slice, ...]:
    return tuple(slice(min(a.start, b.start), max(a.stop, b.stop)) for a, b in zip(first, second, strict=True))


def _hausdorff_in_box(a: np.ndarray, b: np.ndarray) -> float:
    """Symmetric Hausdorff distance between two boolean masks (Euclidean,
    in pixels).

    Cropping to the union bounding box is exact: every pixel of both sets is
    inside it, so the EDT inside the crop sees the true nearest pixel.
    """
    to_b = ndimage.distance_transform_edt(~b)
    to_a = ndimage.distance_transform_edt(~a)
    return float(max(to_b[a].max(), to_a[b].max()))


def _object_hausdorff(pairing: _ObjectPairing) -> float:
    n_truth, n_pred = pairing.n_truth, pairing.n_pred
    if n_truth == 0 and n_pred == 0:
        return 0.0
    if n_truth == 0 or n_pred == 0:
        rows, cols = pairing.truth.shape
        return math.hypot(rows - 1, cols - 1)

    truth, pred = pairing.truth, pairing.pred
    truth_boxes = ndimage.find_objects(truth)
    pred_boxes = ndimage.find_objects(pred)
    cache: dict[tuple[int, int], float] = {}

    def distance(g: int, s: int) -> float:
        if (g, s) not in cache:
            box = _union_box(truth_boxes[g - 1], pred_boxes[s - 1])
            cache[(g, s)] = _hausdorff_in_box(truth[box] == g, pred[box] == s)
        return cache[(g, s)]

    inter = pairing.intersection
    truth_for_pred = _partners(inter.T, pred, truth)
    pred_for_truth = _partners(inter, truth, pred)
    pred_distances = [distance(int(g), s) for s, g in enumerate(truth_for_pred, start=1)]
    truth_distances = [distance(g, int(s)) for g, s in enumerate(pred_for_truth, start=1)]
    pred_side = np.average(pred_distances, weights=pairing.pred_area)
    truth_side = np.average(truth_distances, weights=pairing.truth_area)
    return float(0.5 * (pred_side + truth_side))


def object_hausdorff(truth_instances: np.ndarray, pred_instances: np.ndarray) -> float:
    """GlaS object-level Hausdorff distance for one image, in pixels.

    Same two-sided, area-weighted construction as :func:`object_dice`, with
    the symmetric Hausdorff distance between pixel sets. Each object is paired
    with the other-set object it overlaps most; an object overlapping nothing
    is paired with the object whose closest pixel is nearest to it (minimum
    pixel-to-pixel distance, not minimum Hausdorff distance), following the
    GlaS reference evaluation. Ties in overlap go to the smaller label; ties in
    nearest distance go to whichever object the distance transform reports.

    Conventions: both images empty -> 0.0. Exactly one empty -> the image
    diagonal between pixel centres, hypot(H - 1, W - 1), i.e. the largest
    distance any pairing could produce, so missing every gland (or
    hallucinating glands in an empty image) is never better than the worst
    real segmentation.
    """
    return _object_hausdorff(_pair_objects(truth_instances, pred_instances))


@dataclass
class GlandMetrics:
    """Accumulates GlaS object metrics over the images of one test split.

    The challenge ranks each test part separately, so use one instance per
    part (test A, test B). Object F1 is computed from TP/FP/FN pooled over the
    split (``object_f1``; the per-image average is also reported as
    ``object_f1_mean_of_images``); object Dice and object Hausdorff are means
    of the per-image values.
    """

    tp: int = 0
    fp: int = 0
    fn: int = 0
    per_image: list[dict[str, float]] = field(default_factory=list)

    def update(self, truth_instances: np.ndarray, pred_instances: np.ndarray) -> None:
        """Score one image; overlaps are computed once and shared by all metrics."""
        pairing = _pair_objects(truth_instances, pred_instances)
        tp, fp, fn = _detection_counts(pairing)
        self.tp += tp
        self.fp += fp
        self.fn += fn
        self.per_image.append(
            {
                "object_f1": float(_f1_from_counts(tp, fp, fn)["f1"]),
                "object_dice": _object_dice(pairing),
                "object_hausdorff": _object_hausdorff(pairing),
            }
        )

    def summary(self) -> dict[str, Any]:
        """Split-level results: pooled-count F1 (plus its precision/recall and
        counts), mean-of-images F1, Dice and Hausdorff, and the image count."""
        if not self.per_image:
            raise ValueError("no images were accumulated")
        pooled = _f1_from_counts(self.tp, self.fp, self.fn)

        def mean(key: str) -> float:
            return float(np.mean([image[key] for image in self.per_image]))

        return {
            "object_f1": float(pooled["f1"]),
            "object_precision": float(pooled["precision"]),
            "object_recall": float(pooled["recall"]),
            "object_f1_mean_of_images": mean("object_f1"),
            "object_dice": mean("object_dice"),
            "object_hausdorff": mean("object_hausdorff"),
            "tp": self.tp,
            "fp": self.fp,
            "fn": self.fn,
            "images": len(self.per_image),
        }
