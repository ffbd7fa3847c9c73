"""GlaS challenge object-level metrics: object F1, object Dice, object Hausdorff.

Gland segmentation is judged per gland, not per pixel, because merging two
neighbouring glands is a clinically meaningful error that pixel metrics barely
register (Sirinukunwattana et al., Medical Image Analysis 35, 2017).

The rules follow the contest's official MATLAB evaluation code (GlaS
evaluation_v6.zip: ``F1score.m``, ``ObjectDice.m``, ``ObjectHausdorff.m``, by
K. Sirinukunwattana), read alongside the contest's evaluation page and public
Python translations (e.g. DIAGNijmegen/neural-odes-segmentation ``metrics.py``);
where they disagree, the docstrings say which is followed and why. Published
figures (e.g. CUMedVision2, test A: F1 0.912, object Dice 0.897, object
Hausdorff 45.42) weight each object by its area among all objects of the test
part: :class:`GlandMetrics` reports those pooled figures, the single-image
functions the official per-image values.

Nothing here imports :mod:`pathseg.metrics.pixel`, so either module may be imported first.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
from scipy import ndimage

from pathseg.metrics.pairing import ObjectPairing, pair_objects

# ---------------------------------------------------------------------------
# Instance maps and overlaps
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# Object F1
# ---------------------------------------------------------------------------


def _f1_from_counts(tp: int, fp: int, fn: int) -> dict[str, float | int]:
    """F1 = 2TP / (2TP + FP + FN), which equals 2PR/(P+R) but needs no 0/0 case
    when TP = 0. Nothing to find and nothing found is a perfect answer (1.0),
    as in ``F1score.m``."""
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


def _detection_counts(pairing: ObjectPairing) -> tuple[int, int, int]:
    """Count TP/FP/FN with the rule of the official ``F1score.m``.

    A segmented object S is a true positive when it covers strictly more than
    half of G*, the ground-truth object it overlaps most: |S ∩ G*| / |G*| > 0.5
    (``F1score.m`` tests ``areaOverlap/areaGTObj > 0.5``; the contest page's
    prose says "at least 50%", but the published figures come from the code).
    Every other S is a false positive. Intersections being disjoint, each G is
    claimed at most once, and a G split into two exact halves gets no hit.

    FN = n_G - TP, as the contest page defines it and the Python translations
    compute it. (``F1score.m`` counts as FN only the G that are nobody's
    max-overlap partner, so a G covered 30% by its only S would be neither
    found nor missed; we keep TP + FN = n_G, so recall = fraction found.)
    """
    n_truth, n_pred = pairing.n_truth, pairing.n_pred
    if n_truth == 0 or n_pred == 0:
        return 0, n_pred, n_truth
    inter = pairing.intersection
    best_truth = inter.argmax(axis=0)
    best_overlap = inter[best_truth, np.arange(n_pred)]
    # Integer comparison keeps the exact 50% boundary free of rounding.
    tp = int(np.count_nonzero(2 * best_overlap > pairing.truth_area[best_truth]))
    return tp, n_pred - tp, n_truth - tp


def object_f1(truth_instances: np.ndarray, pred_instances: np.ndarray) -> dict[str, Any]:
    """GlaS object-level detection F1 for one image (see :func:`_detection_counts` for the rule).

    Returns ``f1``, ``precision``, ``recall``, ``tp``, ``fp``, ``fn``. Both
    images empty gives f1 = precision = recall = 1.0; exactly one empty gives
    0.0 for all three (as ``F1score.m``).
    """
    tp, fp, fn = _detection_counts(pair_objects(truth_instances, pred_instances))
    return _f1_from_counts(tp, fp, fn)


# ---------------------------------------------------------------------------
# Per-object scores and their two-sided, area-weighted combination
# ---------------------------------------------------------------------------


def _two_sided(sides: Sequence[tuple[float, float]], if_no_objects: float) -> float:
    """Mean of the segmented side's and the ground-truth side's area-weighted
    averages, each side given as (total area, sum of area x score).

    A side with no objects has no average and is left out: the other side's
    objects then all carry the "unpairable" score (Dice 0, Hausdorff = image
    diagonal), which gives the per-image conventions when one set is empty.
    No objects on either side gives ``if_no_objects``.
    """
    averages = [weighted / area for area, weighted in sides if area > 0]
    return float(sum(averages) / len(averages)) if averages else if_no_objects


def _weighted(areas: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """(total area, sum of area x score) of one side's objects."""
    return float(areas.sum()), float(areas @ scores)


def _dice_per_object(pairing: ObjectPairing) -> tuple[np.ndarray, np.ndarray]:
    """Dice of every segmented (resp. ground-truth) object with its
    max-overlap partner. An object overlapping nothing has Dice 0, as in
    ``ObjectDice.m`` (which pairs it with an empty mask)."""

    def best(inter: np.ndarray, own_area: np.ndarray, other_area: np.ndarray) -> np.ndarray:
        if inter.shape[1] == 0:
            return np.zeros(inter.shape[0])
        partner = inter.argmax(axis=1)
        overlap = inter[np.arange(inter.shape[0]), partner]
        return 2 * overlap / (own_area + other_area[partner])

    inter = pairing.intersection
    return best(inter.T, pairing.pred_area, pairing.truth_area), best(inter, pairing.truth_area, pairing.pred_area)


def object_dice(truth_instances: np.ndarray, pred_instances: np.ndarray) -> float:
    """GlaS object-level Dice for one image, as ``ObjectDice.m``.

    Averages a segmented-area-weighted and a truth-area-weighted term, each
    object scored against its max-overlap partner, so that both
    over-segmentation (many small predictions) and under-segmentation (merged
    glands) are penalised. Both empty -> 1.0; exactly one empty -> 0.0.
    """
    pairing = pair_objects(truth_instances, pred_instances)
    pred_dice, truth_dice = _dice_per_object(pairing)
    return _two_sided([_weighted(pairing.pred_area, pred_dice), _weighted(pairing.truth_area, truth_dice)], 1.0)


# ---------------------------------------------------------------------------
# Object Hausdorff
# ---------------------------------------------------------------------------


def _union_box(first: tuple[slice, ...], second: tuple[slice, ...]) -> tuple[slice, ...]:
    return tuple(slice(min(a.start, b.start), max(a.stop, b.stop)) for a, b in zip(first, second, strict=True))


def _hausdorff_in_box(a: np.ndarray, b: np.ndarray) -> float:
    """Symmetric Euclidean Hausdorff distance (pixels) between two boolean
    masks, as the official ``Hausdorff`` helper computes with ``knnsearch``.
    Callers crop to the union bounding box, which is exact: every pixel of
    both sets is inside it, so the EDT sees the true nearest pixel."""
    to_b = ndimage.distance_transform_edt(~b)
    to_a = ndimage.distance_transform_edt(~a)
    return float(max(to_b[a].max(), to_a[b].max()))


def _closest_in_hausdorff(own: np.ndarray, label: int, other: np.ndarray, n_other: int,
                          box: tuple[slice, ...], exact: Callable[[int], float]) -> float:
    """Minimum Hausdorff distance from object ``label`` of ``own`` (overlapping
    nothing) to any object of ``other``, as ``ObjectHausdorff.m`` pairs it.

    One EDT from the object gives, for every candidate B, the directed
    distance max_{b in B} d(b, object), a lower bound on H(object, B); trying
    candidates by increasing bound and stopping once the bound reaches the
    best exact distance usually needs one or two exact distances, not one per
    candidate. ``box`` must hold the object and every object of ``other``
    (keeps the EDT exact). A tie between candidates does not change the value.
    """
    distance_to_own = ndimage.distance_transform_edt(own[box] != label)
    other_labels = other[box]
    inside = other_labels > 0
    bounds = np.zeros(n_other)
    np.maximum.at(bounds, other_labels[inside] - 1, distance_to_own[inside])  # no sort, unlike ndimage.maximum
    best = math.inf
    for k in np.argsort(bounds, kind="stable"):
        if bounds[k] >= best:
            break
        best = min(best, exact(int(k) + 1))
    return best


def _side_distances(own: np.ndarray, other: np.ndarray, overlaps: np.ndarray,
                    pair_distance: Callable[[int, int], float]) -> np.ndarray:
    """Hausdorff distance of every ``own`` object to its partner in ``other``
    (``overlaps`` is own x other; ``pair_distance(own_label, other_label)``)."""
    own_boxes = ndimage.find_objects(own)
    other_box = ndimage.find_objects((other > 0).astype(np.int8))[0]
    distances = np.empty(overlaps.shape[0])
    for label, row in enumerate(overlaps, start=1):
        if row.max() > 0:
            distances[label - 1] = pair_distance(label, int(row.argmax()) + 1)
        else:
            box = _union_box(own_boxes[label - 1], other_box)
            distances[label - 1] = _closest_in_hausdorff(own, label, other, overlaps.shape[1], box,
                                                         partial(pair_distance, label))
    return distances


def _hausdorff_per_object(pairing: ObjectPairing) -> tuple[np.ndarray, np.ndarray]:
    """Hausdorff distance of every segmented object to its partner ground
    truth, and of every ground-truth object to its partner segmentation.

    The partner is the max-overlap object of the other set; an object that
    overlaps nothing is paired with the object of the other set (same image)
    at the minimum Hausdorff distance, as ``ObjectHausdorff.m`` does (not the
    one whose nearest pixel is closest, which can be far in Hausdorff terms).
    An object whose image has no object on the other side gets the image
    diagonal hypot(H - 1, W - 1), the largest distance any pairing there could
    give, so missing every gland (or hallucinating glands in an empty image)
    is never better than the worst real segmentation. The official code has no
    usable value there (its ``Hausdorff`` returns Inf against an empty set and
    ``ObjectHausdorff.m`` fails indexing an empty label list), and Inf would
    make every pooled figure infinite.
    """
    n_truth, n_pred = pairing.n_truth, pairing.n_pred
    if n_truth == 0 or n_pred == 0:
        diagonal = math.hypot(*(size - 1 for size in pairing.truth.shape))
        return np.full(n_pred, diagonal), np.full(n_truth, diagonal)

    truth, pred = pairing.truth, pairing.pred
    truth_boxes, pred_boxes = ndimage.find_objects(truth), ndimage.find_objects(pred)
    cache: dict[tuple[int, int], float] = {}

    def distance(g: int, s: int) -> float:
        if (g, s) not in cache:
            box = _union_box(truth_boxes[g - 1], pred_boxes[s - 1])
            cache[(g, s)] = _hausdorff_in_box(truth[box] == g, pred[box] == s)
        return cache[(g, s)]

    inter = pairing.intersection
    pred_side = _side_distances(pred, truth, inter.T, lambda s, g: distance(g, s))
    return pred_side, _side_distances(truth, pred, inter, distance)


def object_hausdorff(truth_instances: np.ndarray, pred_instances: np.ndarray) -> float:
    """GlaS object-level Hausdorff distance for one image, in pixels, as ``ObjectHausdorff.m``.

    Same two-sided, area-weighted construction as :func:`object_dice`, with
    the symmetric Hausdorff distance between pixel sets and the pairing rules
    of :func:`_hausdorff_per_object`. Both images empty -> 0.0 (as the
    official code); exactly one empty -> the image diagonal hypot(H - 1, W - 1).
    """
    pairing = pair_objects(truth_instances, pred_instances)
    pred_h, truth_h = _hausdorff_per_object(pairing)
    return _two_sided([_weighted(pairing.pred_area, pred_h), _weighted(pairing.truth_area, truth_h)], 0.0)


# ---------------------------------------------------------------------------
# Split-level accumulation
# ---------------------------------------------------------------------------


# Rows of GlandMetrics.sums: segmented side, ground-truth side. Columns: total
# object area, sum of area x Dice, sum of area x Hausdorff.
_AREA, _DICE, _HAUSDORFF = 0, 1, 2


def _pooled(sums: np.ndarray, column: int, if_no_objects: float) -> float:
    return _two_sided([(row[_AREA], row[column]) for row in sums], if_no_objects)


@dataclass
class GlandMetrics:
    """Accumulates GlaS object metrics over the images of one test split.

    The contest ranks each test part separately, so use one instance per part
    (test A, test B). Pairing is done within each image, but the weighting
    pools: the contest page defines object Dice and Hausdorff over the set of
    all segmented and all ground-truth objects of the part, each object
    weighted by its area over the total segmented (resp. ground-truth) area of
    the part, and F1 over TP/FP/FN counted over the whole part. Published
    figures are computed that way, so ``summary()`` reports these pooled
    values under the main keys and the means of the per-image values under
    ``*_mean_of_images``. On a single image the pooled and per-image values
    coincide.

    Only running sums are kept, so memory stays constant over any number of images.
    """

    tp: int = 0
    fp: int = 0
    fn: int = 0
    images: int = 0
    sums: np.ndarray = field(default_factory=lambda: np.zeros((2, 3)))
    image_f1_sum: float = 0.0
    image_dice_sum: float = 0.0
    image_hausdorff_sum: float = 0.0

    def update(self, truth_instances: np.ndarray, pred_instances: np.ndarray) -> None:
        """Score one image; overlaps are computed once and shared by all metrics."""
        pairing = pair_objects(truth_instances, pred_instances)
        tp, fp, fn = _detection_counts(pairing)
        pred_dice, truth_dice = _dice_per_object(pairing)
        pred_h, truth_h = _hausdorff_per_object(pairing)
        sides = ((pairing.pred_area, pred_dice, pred_h), (pairing.truth_area, truth_dice, truth_h))
        image = np.array([[area.sum(), area @ dice, area @ hausdorff] for area, dice, hausdorff in sides], dtype=float)
        self.sums += image
        self.tp += tp
        self.fp += fp
        self.fn += fn
        self.images += 1
        self.image_f1_sum += float(_f1_from_counts(tp, fp, fn)["f1"])
        self.image_dice_sum += _pooled(image, _DICE, 1.0)
        self.image_hausdorff_sum += _pooled(image, _HAUSDORFF, 0.0)

    def summary(self) -> dict[str, Any]:
        """Split-level results: pooled F1 (with precision, recall and counts),
        pooled object Dice and Hausdorff, the per-image means, and the image count."""
        if not self.images:
            raise ValueError("no images were accumulated")
        pooled = _f1_from_counts(self.tp, self.fp, self.fn)
        return {
            "object_f1": float(pooled["f1"]),
            "object_precision": float(pooled["precision"]),
            "object_recall": float(pooled["recall"]),
            "object_dice": _pooled(self.sums, _DICE, 1.0),
            "object_hausdorff": _pooled(self.sums, _HAUSDORFF, 0.0),
            "object_f1_mean_of_images": self.image_f1_sum / self.images,
            "object_dice_mean_of_images": self.image_dice_sum / self.images,
            "object_hausdorff_mean_of_images": self.image_hausdorff_sum / self.images,
            "tp": self.tp,
            "fp": self.fp,
            "fn": self.fn,
            "images": self.images,
        }
