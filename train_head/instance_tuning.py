"""Choosing a run's instance decoding on val: marker threshold and minimum object areas, by object F1.

Small-object removal alone moves GlaS object F1 several-fold (random tiny, test A: 0.077 with every speck
kept, 0.249 with objects under 500 px dropped), so a comparison of decoders is only fair when each gets its
own tuned minimum area. Both are tuned here on the val split, never on test:
- the connected-components baseline: `evaluate.min_object_area` over `instances.min_areas`;
- the configured decoder (`instances.decoding`): `instances.min_area` over the same grid and, for the contour
  decoder, `instances.marker_threshold` over `instances.marker_thresholds`.

Dropping objects under an area after decoding gives the same map as decoding with that minimum area (holes
are filled before the area test either way), so each threshold is decoded once and every area is a relabel.
Candidates are ranked by pooled object F1 (the contest's ranking figure); ties go to the smaller area, then
the threshold nearest 0.5, so that a flat val curve does not pick an extreme.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from pathseg.config import InstancesConfig
from pathseg.metrics.instances import decode_instances
from pathseg.metrics.objects import object_f1
from pathseg.metrics.pixel import instances_from_semantic


@dataclass
class _Counts:
    tp: int = 0
    fp: int = 0
    fn: int = 0

    def add(self, scores: dict) -> None:
        self.tp += int(scores["tp"])
        self.fp += int(scores["fp"])
        self.fn += int(scores["fn"])

    @property
    def f1(self) -> float:
        total = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / total if total else 1.0


@dataclass
class DecodingSearch:
    """Pooled detection counts of every candidate over the val images fed to it."""

    settings: InstancesConfig
    decoded: dict[tuple[float, int], _Counts] = field(default_factory=dict)
    baseline: dict[int, _Counts] = field(default_factory=dict)
    images: int = 0

    def thresholds(self, class_names: list[str]) -> list[float]:
        """Only the contour decoder reads a marker threshold; the others are searched over area alone."""
        contour = class_names[-1].strip().lower() == "contour" and self.settings.decoding in ("auto", "contour")
        return list(self.settings.marker_thresholds) if contour else [self.settings.marker_threshold]

    def update(self, probabilities: np.ndarray, class_names: list[str], folded_prediction: np.ndarray,
               truth: np.ndarray) -> None:
        """One val image: `probabilities` over the head's classes, `folded_prediction` on the store's classes."""
        areas = self.settings.min_areas
        for threshold in self.thresholds(class_names):
            unfiltered = decode_instances(probabilities, class_names,
                                          self.settings.model_copy(update={"marker_threshold": threshold,
                                                                           "min_area": 0}))
            for area, instances in _area_filtered(unfiltered, areas):
                self.decoded.setdefault((threshold, area), _Counts()).add(object_f1(truth, instances))
        components = instances_from_semantic(folded_prediction > 0)
        for area, instances in _area_filtered(components, areas):
            self.baseline.setdefault(area, _Counts()).add(object_f1(truth, instances))
        self.images += 1

    def choice(self) -> tuple[dict, list[dict]]:
        """(chosen values, every candidate's val F1) once all val images are in."""
        def decoded_rank(item: tuple[tuple[float, int], _Counts]) -> tuple:
            (threshold, area), counts = item
            return (-counts.f1, area, abs(threshold - 0.5), threshold)

        (threshold, area), _ = min(self.decoded.items(), key=decoded_rank)
        baseline_area, _ = min(self.baseline.items(), key=lambda item: (-item[1].f1, item[0]))
        chosen = {"marker_threshold": threshold, "min_area": area, "baseline_min_area": baseline_area,
                  "decoded_val_f1": round(self.decoded[(threshold, area)].f1, 6),
                  "baseline_val_f1": round(self.baseline[baseline_area].f1, 6), "val_images": self.images}
        scores = [{"decoding": "decoded", "marker_threshold": t, "min_area": a, "object_f1": round(c.f1, 6)}
                  for (t, a), c in sorted(self.decoded.items())]
        scores += [{"decoding": "connected components", "min_area": a, "object_f1": round(c.f1, 6)}
                   for a, c in sorted(self.baseline.items())]
        return chosen, scores


def _area_filtered(instances: np.ndarray, areas: Iterable[int]) -> Iterable[tuple[int, np.ndarray]]:
    """The map with objects under each area dropped, ids renumbered 1..n (as finish_instances leaves them)."""
    sizes = np.bincount(instances.ravel())
    for area in areas:
        keep = sizes >= max(area, 1)
        keep[0] = False
        lookup = np.zeros(sizes.size, dtype=np.int32)
        lookup[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
        yield area, lookup[instances]
