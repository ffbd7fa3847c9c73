"""Gland instances from a head's output: the one place instance maps are decoded, for evaluate and predict alike.

GlaS scores glands as objects, so how a prediction becomes objects changes every object figure. Two decoders:

- :func:`decode_semantic_instances`, the baseline: 8-connected components of the gland class
  (:func:`pathseg.metrics.pixel.instances_from_semantic`). Touching glands merge into one object.
- :func:`decode_contour_instances`, for heads that also predict a gland *contour* class (DCAN, CUMedVision2):
  seeds from the gland interior, grown back over the gland mask by a watershed that stops at the predicted
  contours, so touching glands come out as separate objects.

Both finish the same way (:func:`finish_instances`): holes filled per object, objects under ``min_area``
removed, ids renumbered 1..n. :func:`decode_instances` picks the decoder from the ``instances`` settings and
the class names. Probabilities are (C, H, W): the softmax of the stitched logits over their class axis.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.segmentation import watershed

from pathseg.config.scoring import InstancesConfig
from pathseg.metrics.pixel import instances_from_semantic

__all__ = [
    "CONTOUR_CLASS", "decode_contour_instances", "decode_instances", "decode_semantic_instances",
    "finish_instances", "gland_index",
]

CONTOUR_CLASS = "contour"  # the name of the head's extra class (head.target: contour), always the last one
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)  # as pixel.py's components: corner-touching pixels are one object
_SUM_TOLERANCE = 1e-2  # float16 probabilities sum to 1 only within ~1e-3; logits miss by far more


def _check_probabilities(probabilities: np.ndarray, indices: dict[str, int]) -> np.ndarray:
    """(C, H, W) probabilities, checked: logits passed by mistake would decode into plausible but wrong objects."""
    array = np.asarray(probabilities)
    if array.ndim != 3 or not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"probabilities must be a float (C, H, W) array, got {array.dtype} {array.shape}; "
                         "pass softmax(logits, axis=0)")
    for name, index in indices.items():
        if not 0 <= index < array.shape[0]:
            raise ValueError(f"{name} {index} is outside the {array.shape[0]} classes of the probabilities")
    if array.size:
        low, high = float(array.min()), float(array.max())
        sums = array.sum(axis=0)
        if low < -_SUM_TOLERANCE or high > 1 + _SUM_TOLERANCE or np.abs(sums - 1).max() > _SUM_TOLERANCE:
            raise ValueError("probabilities must be softmax outputs (each in [0, 1], summing to 1 over the class "
                             "axis, the first); pass softmax(logits, axis=0), not logits")
    return array


def _relabel(instances: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Keep the ids where ``keep`` is true (index = old id) and renumber them 1..n, as the object metrics expect."""
    keep = keep.copy()
    keep[0] = False
    lookup = np.zeros(keep.size, dtype=np.int32)
    lookup[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return lookup[instances]


def _fill_holes(instances: np.ndarray) -> None:
    """Fill each object's holes in place, within its bounding box (one small crop per object, no full-image op).

    GlaS truth glands are solid, lumen included; a predicted lumen left as background costs object Dice and
    Hausdorff for nothing. Only background pixels are filled, so an object inside another's hole is kept, and
    inner objects go first (smaller boxes) so that their own holes are theirs and not the outer object's.
    """
    boxes = ndimage.find_objects(instances)
    order = sorted((box for box in enumerate(boxes, start=1) if box[1] is not None),
                   key=lambda item: (item[1][0].stop - item[1][0].start) * (item[1][1].stop - item[1][1].start))
    for label, box in order:
        crop = instances[box]
        own = crop == label
        holes = ndimage.binary_fill_holes(own) & ~own & (crop == 0)
        crop[holes] = label


def finish_instances(instances: np.ndarray, settings: InstancesConfig | None = None) -> np.ndarray:
    """What both decoders end with: holes filled (``fill_holes``), objects under ``min_area`` px removed (area
    after filling: the area that is scored), ids renumbered 1..n. Returns a new int32 map."""
    settings = settings or InstancesConfig()
    result = np.array(instances, dtype=np.int32, copy=True)
    if result.ndim != 2:
        raise ValueError(f"instance map must be 2-D, got shape {result.shape}")
    if result.size == 0 or not result.any():
        return np.zeros(result.shape, dtype=np.int32)
    if settings.fill_holes:
        _fill_holes(result)
    areas = np.bincount(result.ravel())
    return _relabel(result, areas >= max(settings.min_area, 1))


def decode_semantic_instances(prediction: np.ndarray, gland_index: int, settings: InstancesConfig | None = None,
                              contour_index: int | None = None) -> np.ndarray:
    """The baseline: 8-connected components of the gland class, then :func:`finish_instances`.

    ``prediction`` is an (H, W) label map or (C, H, W) probabilities (argmax taken). The components come from
    :func:`pathseg.metrics.pixel.instances_from_semantic`, so they match what evaluate scored before. With a
    contour head, give ``contour_index``: contour pixels are the glands' rims and count as gland, so this stays
    the baseline of that same head (touching glands merge) rather than a split along the contours.
    """
    array = np.asarray(prediction)
    if array.ndim == 3:
        indices = {"gland_index": gland_index} | ({} if contour_index is None else {"contour_index": contour_index})
        labels = _check_probabilities(array, indices).argmax(axis=0)
    elif array.ndim == 2 and (array.dtype == bool or np.issubdtype(array.dtype, np.integer)):
        labels = array
    else:
        raise ValueError(f"prediction must be an integer (H, W) label map or float (C, H, W) probabilities, got "
                         f"{array.dtype} {array.shape}")
    gland = labels == gland_index
    if contour_index is not None:
        gland |= labels == contour_index
    return finish_instances(instances_from_semantic(gland), settings)


def decode_contour_instances(probabilities: np.ndarray, gland_index: int, contour_index: int,
                             settings: InstancesConfig | None = None) -> np.ndarray:
    """Instances from (C, H, W) probabilities of a head with a contour class (DCAN / CUMedVision2 style).

    1. Gland mask: p_gland + p_contour beats every other class, i.e. the argmax after merging the two (the
       contour band is the rim of a gland, so its pixels belong to the object). With background, gland and
       contour only, this is p_gland + p_contour > 0.5.
    2. Markers: p_gland - p_contour > ``marker_threshold``, eroded by a disk of radius ``marker_erosion`` px
       (so a one- or two-pixel bridge of interior through a weak spot of the contour does not fuse two
       glands' seeds, and specks of interior seed nothing), then 8-connected components, one per gland.
    3. Watershed on p_contour from the markers, within the gland mask (8-connected). Flooding the contour
       probability puts the line between touching glands where the head sees the boundary; a distance
       transform would cut at the narrowest neck instead, ignoring the head, and costs a full-image EDT.
    4. Gland-mask components that no marker reaches (no pixel confidently interior: small or faint glands) are
       kept, each as its own object: dropping them would make this decoder lose glands the semantic decoder
       finds. Specks among them are what ``min_area`` is for.
    5. :func:`finish_instances`: holes filled, objects under ``min_area`` px removed, ids renumbered 1..n.
    """
    settings = settings or InstancesConfig()
    if gland_index == contour_index:
        raise ValueError(f"gland_index and contour_index are both {gland_index}; the contour class is the head's "
                         "last class, the gland class one of the store's")
    array = _check_probabilities(probabilities, {"gland_index": gland_index, "contour_index": contour_index})
    shape = array.shape[1:]
    if array.size == 0:
        return np.zeros(shape, dtype=np.int32)
    gland = array[gland_index]
    contour = array[contour_index]
    foreground = gland + contour
    others = [k for k in range(array.shape[0]) if k not in (gland_index, contour_index)]
    mask = foreground > array[others].max(axis=0) if others else np.ones(shape, dtype=bool)
    if not mask.any():
        return np.zeros(shape, dtype=np.int32)
    seeds = ((gland - contour) > settings.marker_threshold) & mask
    if settings.marker_erosion:
        # border_value 1: a gland cut by the image edge keeps its seed up to the edge, as GlaS's many cut glands need
        seeds = ndimage.binary_erosion(seeds, structure=_disk(settings.marker_erosion), border_value=1)
    return finish_instances(_grow_markers(contour, mask, seeds), settings)


def _grow_markers(contour: np.ndarray, mask: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """Steps 3 and 4 of :func:`decode_contour_instances`, the same result as one full-image watershed, faster.

    The watershed only has work where a component of the gland mask holds two or more markers: a component
    with one marker is that marker's gland whole, one with none is its own object (step 4). Those with several
    are flooded in their bounding box, and only outside the markers' interiors (pixels whose 8 neighbours are
    all seed), which are already labelled and would only cost heap operations: on a GlaS-sized image with 20
    touching glands this takes the decode from ~0.2 s to the figure in docs/benchmarks.md.
    """
    components, n_components = ndimage.label(mask, structure=_EIGHT_CONNECTED)
    markers, count = ndimage.label(seeds, structure=_EIGHT_CONNECTED)
    component_of_marker = np.zeros(count + 1, dtype=np.int64)
    component_of_marker[markers[seeds]] = components[seeds]
    markers_per_component = np.bincount(component_of_marker[1:], minlength=n_components + 1)
    # component -> id: the one marker's id, or a new id after all markers' for a component without any
    lookup = np.zeros(n_components + 1, dtype=np.int32)
    single = markers_per_component[component_of_marker[1:]] == 1
    lookup[component_of_marker[1:][single]] = np.arange(1, count + 1, dtype=np.int32)[single]
    unmarked = np.flatnonzero(markers_per_component[1:] == 0) + 1
    lookup[unmarked] = np.arange(count + 1, count + 1 + unmarked.size, dtype=np.int32)
    instances = lookup[components]
    several = np.flatnonzero(markers_per_component >= 2)
    if several.size:
        interior = ndimage.binary_erosion(seeds, structure=_EIGHT_CONNECTED)
        boxes = ndimage.find_objects(components)
        for component in several:
            box = boxes[component - 1]
            within = components[box] == component
            flooded = watershed(contour[box], markers[box] * within, mask=within & ~interior[box], connectivity=2)
            inside = interior[box] & within
            flooded[inside] = markers[box][inside]
            instances[box][within] = flooded[within]
    return instances


def _disk(radius: int) -> np.ndarray:
    """A filled disk of the given radius: erosion by it narrows markers alike in every direction."""
    y, x = np.ogrid[-radius:radius + 1, -radius:radius + 1]
    return x * x + y * y <= radius * radius


def gland_index(class_names: list[str]) -> int:
    """The gland class: the one named "gland", else the only class that is neither background nor contour."""
    names = [name.strip().lower() for name in class_names]
    if "gland" in names:
        return names.index("gland")
    candidates = [k for k, name in enumerate(names) if name not in ("background", CONTOUR_CLASS)]
    if len(candidates) != 1:
        raise ValueError(f"cannot tell the gland class among {class_names}; instance decoding needs a class named "
                         "'gland' (or a single non-background class)")
    return candidates[0]


def decode_instances(probabilities: np.ndarray, class_names: list[str],
                     settings: InstancesConfig | None = None) -> np.ndarray:
    """Decode with the decoder ``settings.decoding`` names; ``auto`` = contour when the head's last class is
    "contour" (head.target: contour), semantic otherwise. ``class_names`` are the head's, contour included."""
    settings = settings or InstancesConfig()
    has_contour = bool(class_names) and class_names[-1].strip().lower() == CONTOUR_CLASS
    decoding = settings.decoding
    if decoding == "auto":
        decoding = "contour" if has_contour else "semantic"
    if decoding == "contour" and not has_contour:
        raise ValueError(f"instances.decoding is contour but the head's classes {class_names} end without "
                         "'contour'; train with head.target: contour or set instances.decoding: semantic")
    gland = gland_index(class_names[:-1] if has_contour else class_names)
    if decoding == "contour":
        return decode_contour_instances(probabilities, gland, len(class_names) - 1, settings)
    return decode_semantic_instances(probabilities, gland, settings,
                                     len(class_names) - 1 if has_contour else None)
