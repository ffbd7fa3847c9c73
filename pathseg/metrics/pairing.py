"""Objects of the truth and of a prediction, relabelled and paired by overlap, as the official GlaS code pairs
them: what the object F1, Dice and Hausdorff of `objects.py` are all computed from.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _instance_map(instances: np.ndarray, name: str) -> np.ndarray:
    """Validate a 2-D instance map of non-negative integer labels; return it as int64.

    Float maps are rejected rather than rounded: they almost always mean
    probabilities were passed where labelled components were intended.
    """
    array = np.asarray(instances)
    if array.dtype != bool and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must hold integer labels, got dtype {array.dtype}")
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D instance map, got shape {array.shape}")
    array = array.astype(np.int64, copy=False)
    if array.size and int(array.min()) < 0:
        raise ValueError(f"{name} contains negative labels")
    return array


def _consecutive_labels(instances: np.ndarray, name: str) -> tuple[np.ndarray, int]:
    """Relabel to 0 (background) and 1..n in increasing order of the original labels.

    For the usual small labels the present values come from a bincount, which
    is linear in the pixel count, instead of np.unique's sort of every pixel.
    """
    array = _instance_map(instances, name)
    if array.size and int(array.max()) < 1 << 24:
        objects = np.flatnonzero(np.bincount(array.ravel()))
    else:
        objects = np.unique(array)
    objects = objects[objects > 0]
    if objects.size and objects[-1] < 1 << 24:
        lookup = np.zeros(int(objects[-1]) + 1, dtype=np.int64)
        lookup[objects] = np.arange(1, objects.size + 1)
        return lookup[array], int(objects.size)
    return np.searchsorted(objects, array, side="right").astype(np.int64), int(objects.size)


@dataclass(frozen=True)
class ObjectPairing:
    """Overlap bookkeeping shared by the three object metrics.

    Labels are remapped to 0..n in increasing order so that any instance ids
    can index arrays; ties in overlap thus go to the smaller original label,
    as MATLAB's ``mode`` does in the official code.
    """

    truth: np.ndarray  # (H, W) int64, 0 = background, 1..n_truth
    pred: np.ndarray  # (H, W) int64, 0 = background, 1..n_pred
    n_truth: int
    n_pred: int
    intersection: np.ndarray  # (n_truth, n_pred) pixel counts of G_j ∩ S_i
    truth_area: np.ndarray  # (n_truth,)
    pred_area: np.ndarray  # (n_pred,)


def pair_objects(truth_instances: np.ndarray, pred_instances: np.ndarray) -> ObjectPairing:
    truth, n_truth = _consecutive_labels(truth_instances, "truth_instances")
    pred, n_pred = _consecutive_labels(pred_instances, "pred_instances")
    if truth.shape != pred.shape:
        raise ValueError(f"truth and prediction shapes differ: {truth.shape} vs {pred.shape}")
    table = np.bincount((truth * (n_pred + 1) + pred).ravel(), minlength=(n_truth + 1) * (n_pred + 1)).reshape(
        n_truth + 1, n_pred + 1
    )
    return ObjectPairing(
        truth=truth,
        pred=pred,
        n_truth=n_truth,
        n_pred=n_pred,
        intersection=table[1:, 1:],
        truth_area=table[1:, :].sum(axis=1),
        pred_area=table[:, 1:].sum(axis=0),
    )
