"""Overlays outline every gland in a colour of its own, so merged and split glands show."""

from __future__ import annotations

import numpy as np
from pathseg.train_head.overlays import instance_colours, outline_instances, save_overlay
from PIL import Image


def two_touching_glands() -> np.ndarray:
    instances = np.zeros((20, 30), dtype=np.int32)
    instances[2:18, 2:15] = 1
    instances[2:18, 15:28] = 2
    return instances


def test_touching_glands_get_outlines_of_different_colours_and_interiors_stay():
    instances = two_touching_glands()
    panel = np.full((20, 30, 3), 7, dtype=np.uint8)
    out = outline_instances(panel, instances)
    colours = instance_colours(2)
    assert (out[10, 14] == colours[1]).all() and (out[10, 15] == colours[2]).all()  # both sides of the seam
    assert (colours[1] != colours[2]).any()
    assert (out[10, 8] == 7).all() and (out[0, 0] == 7).all()  # interior and background untouched


def test_colours_of_many_glands_are_distinct():
    colours = instance_colours(60)[1:]
    assert len({tuple(c) for c in colours}) == 60


def test_the_saved_overlay_outlines_truth_and_prediction(tmp_path):
    instances = two_touching_glands()
    rgb = np.full((20, 30, 3), 200, dtype=np.uint8)
    labels = (instances > 0).astype(np.uint8)
    merged = labels.astype(np.int32)  # a prediction that merged the two glands
    save_overlay(tmp_path / "o.png", rgb, labels, labels, 2, None, instances, merged)
    panel = np.asarray(Image.open(tmp_path / "o.png"))
    truth_panel, predicted_panel = panel[:, 38:68], panel[:, 76:106]
    assert (truth_panel[10, 15] == instance_colours(2)[2]).all()
    assert (predicted_panel[10, 15] != instance_colours(2)[2]).any()  # one object: no seam drawn there
