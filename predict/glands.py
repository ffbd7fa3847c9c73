"""Gland instances of predict's outputs: decoded as evaluate decodes them, for images whole and slides in strips.

The decoding is `pathseg.metrics.instances` with the values the run's val split chose
(`train_head/instance_choice.py`), so an object predict writes is an object evaluate would have scored. A
contour head's contour is only a means to separate glands: the label map and the area table fold it back into
the class it covers, as evaluate does.

A slide is decoded strip by strip, so memory follows its width, never its area. Each strip is decoded with
`halo` rows of context above and below, and only its own rows are kept. Objects are joined across a seam where
either of the two decodings that see both sides of it (this strip's, with its upper halo, and the previous
strip's, with its lower halo) puts the two pixels facing each other across the seam in one object. Pixels face
each other straight across the seam or diagonally (objects are 8-connected). The joins are collected in a
union-find, and a second pass writes consecutive ids in raster order of first appearance.
The minimum object area is applied after the joins (a gland cut by a strip is small in each strip), and holes
larger than the halo may stay open where a strip edge crosses them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from pathseg.config import InstancesConfig
from pathseg.metrics.instances import decode_instances, gland_index

STRIP_ROWS = 1024  # rows of a slide decoded at a time (its own rows; the halo comes on top)
HALO_ROWS = 128  # context above and below each strip: larger than the seed erosion and contour band by far


def has_glands(class_names: list[str]) -> bool:
    """Whether a run's classes name a gland (GlaS-like); multi-tissue runs (BCSS) get no instance outputs."""
    names = list(class_names)
    if names and names[-1].strip().lower() == "contour":
        names = names[:-1]
    try:
        gland_index(names)
    except ValueError:
        return False
    return True


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=0, keepdims=True))
    return shifted / shifted.sum(axis=0, keepdims=True)


def decode_image(logits: np.ndarray, class_names: list[str], settings: InstancesConfig) -> np.ndarray:
    """(H, W) uint32 instances of one image's blended logits over the head's classes."""
    return decode_instances(softmax(logits), list(class_names), settings).astype(np.uint32)


class _UnionFind:
    """Provisional ids 1..n of a slide's strips, joined across seams; grows as strips come in."""

    def __init__(self) -> None:
        self.parent = np.zeros(1, dtype=np.int64)

    def grow(self, size: int) -> None:
        old = self.parent.size
        if size > old:
            self.parent = np.concatenate([self.parent, np.arange(old, size, dtype=np.int64)])

    def find(self, node: int) -> int:
        root = node
        while self.parent[root] != root:
            root = int(self.parent[root])
        while self.parent[node] != root:
            self.parent[node], node = root, int(self.parent[node])
        return root

    def join(self, first: np.ndarray, second: np.ndarray) -> None:
        for a, b in set(zip(first.tolist(), second.tolist(), strict=True)):
            ra, rb = self.find(a), self.find(b)
            if ra != rb:
                self.parent[max(ra, rb)] = min(ra, rb)

    def roots(self) -> np.ndarray:
        return np.asarray([self.find(node) for node in range(self.parent.size)], dtype=np.int64)


def decode_in_strips(probabilities: Any, decode: Callable[[np.ndarray], np.ndarray], out: Any, min_area: int,
                     strip_rows: int = STRIP_ROWS, halo: int = HALO_ROWS) -> int:
    """Instances of a (C, H, W) probability array (Zarr or numpy) into the (H, W) uint32 `out`; returns the count.

    `decode` maps a (C, h, W) block to its instances with no minimum area (that is applied here, to whole
    objects). Two passes over `out`: provisional ids with the joins, then the final ids.
    """
    height = probabilities.shape[1]
    joins = _UnionFind()
    next_id = 1
    areas = np.zeros(1, dtype=np.int64)
    previous: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # last row ids, its view of both seam rows
    for top in range(0, height, strip_rows):
        bottom = min(top + strip_rows, height)
        low, high = max(0, top - halo), min(height, bottom + halo)
        local = np.asarray(decode(np.asarray(probabilities[:, low:high], dtype=np.float32)), dtype=np.int64)
        count = int(local.max(initial=0))
        joins.grow(next_id + count)
        areas = np.concatenate([areas, np.zeros(next_id + count - areas.size, dtype=np.int64)])
        own = local[top - low : bottom - low]
        ids = np.where(own > 0, own + (next_id - 1), 0)
        if previous is not None:
            last_ids, seen_above, seen_below = previous
            for shift in (-1, 0, 1):  # 8-connected: a gland may cross the seam diagonally
                above, below = _facing(last_ids, shift), _facing(ids[0], -shift)
                here_above, here_below = _facing(local[top - 1 - low], shift), _facing(local[top - low], -shift)
                there_above, there_below = _facing(seen_above, shift), _facing(seen_below, -shift)
                together = (above > 0) & (below > 0) & (((here_above > 0) & (here_above == here_below))
                                                        | ((there_above > 0) & (there_above == there_below)))
                joins.join(above[together], below[together])
        areas += np.bincount(ids.ravel(), minlength=areas.size)[: areas.size]
        out[top:bottom] = ids.astype(np.uint32)
        below = local[bottom - low] if bottom < high else np.zeros(local.shape[1], dtype=np.int64)
        previous = (ids[-1], local[bottom - 1 - low], below)
        next_id += count
    roots = joins.roots()
    object_area = np.bincount(roots, weights=areas, minlength=roots.size)
    kept = object_area[roots] >= max(min_area, 1)
    kept[0] = False
    order: dict[int, int] = {}
    for top in range(0, height, strip_rows):  # consecutive ids in raster order of each object's first pixel
        block = np.asarray(out[top : top + strip_rows]).astype(np.int64)
        for node in _first_seen(block):
            root = int(roots[node])
            if kept[node] and root not in order:
                order[root] = len(order) + 1
    lookup_root = np.zeros(roots.size, dtype=np.int64)
    for root, new in order.items():
        lookup_root[root] = new
    final = np.where(kept, lookup_root[roots], 0).astype(np.uint32)
    for top in range(0, height, strip_rows):
        out[top : top + strip_rows] = final[np.asarray(out[top : top + strip_rows]).astype(np.int64)]
    return len(order)


def _facing(row: np.ndarray, shift: int) -> np.ndarray:
    """Pairs across a seam, column x of the row above facing column x + shift below: the upper row cut to the
    columns that have a partner (`shift`), the lower row to their partners (`-shift` gives the same pairs)."""
    if shift > 0:
        return row[:-shift]
    if shift < 0:
        return row[-shift:]
    return row


def _first_seen(block: np.ndarray) -> list[int]:
    """The nonzero ids of a block in raster order of their first pixel."""
    flat = block.ravel()
    ids, first = np.unique(flat[flat > 0], return_index=True)
    return ids[np.argsort(first)].tolist()


def resize_nearest(instances: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """An instance map at another size, nearest pixel centres (ids are not averaged; any integer width)."""
    rows = np.minimum(((np.arange(shape[0]) + 0.5) * instances.shape[0] / shape[0]).astype(int), instances.shape[0] - 1)
    cols = np.minimum(((np.arange(shape[1]) + 0.5) * instances.shape[1] / shape[1]).astype(int), instances.shape[1] - 1)
    return instances[np.ix_(rows, cols)]
