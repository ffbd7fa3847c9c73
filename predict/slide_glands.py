"""A slide's glands as objects: decoded strip by strip from the blended probabilities, measured whole, written
as a pyramidal uint32 OME-TIFF, `instances.csv` and `instances.geojson` (level-0 coordinates), ids shared."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr
from pathseg.predict import glands
from pathseg.predict.geojson import write_geojson
from pathseg.predict.gland_outputs import GlandMeasures, gland_features, write_gland_table
from pathseg.predict.slide_outputs import write_label_ome_tiff

from pathseg.config import InstancesConfig
from pathseg.metrics.instances import decode_instances, gland_index
from pathseg.metrics.pixel import background_index_of


def decode_slide(probabilities: zarr.Array, head_classes: list[str], settings: InstancesConfig,
                 instances: zarr.Array) -> int:
    """Fill `instances` from the (head classes, H, W) probabilities; returns the number of glands.

    Pixels no tissue tile reached hold no probabilities (all 0): they are taken as certain background (the
    store's background class, else the first), so the decoder's softmax check holds and no gland grows there.
    """
    unfiltered = settings.model_copy(update={"min_area": 0})
    empty_class = background_index_of(head_classes[:-1] if head_classes[-1] == "contour" else head_classes) or 0

    def decode(block: np.ndarray) -> np.ndarray:
        nothing = block.sum(axis=0) < 0.5
        block[empty_class][nothing] = 1.0
        total = block.sum(axis=0, keepdims=True)
        return decode_instances(block / total, head_classes, unfiltered)  # float16 sums renormalised

    return glands.decode_in_strips(probabilities, decode, instances, settings.min_area,
                                   strip_rows=glands.STRIP_ROWS, halo=glands.HALO_ROWS)


def write_slide_glands(folder: Path, instances: zarr.Array, class_names: list[str], *, slide_id: str, mpp: float,
                       level0_per_px: float, object_type: str, simplify: float) -> int:
    """Measure every gland over the strips of `instances` (prediction mpp) and write the three outputs."""
    measures = GlandMeasures()
    for top in range(0, instances.shape[0], glands.STRIP_ROWS):
        measures.add(np.asarray(instances[top : top + glands.STRIP_ROWS]), top)
    outlines = measures.outlines()
    rows = measures.rows(outlines, mpp)
    for row in rows:  # centroids in level-0 pixels of the slide, as the GeoJSON's coordinates
        row["centroid_x_px"] = round(row["centroid_x_px"] * level0_per_px, 2)
        row["centroid_y_px"] = round(row["centroid_y_px"] * level0_per_px, 2)
    gland = gland_index(class_names)
    features = gland_features(outlines, rows, image_id=slide_id, class_name=class_names[gland], class_index=gland,
                              scale=level0_per_px, object_type=object_type, simplify=simplify)
    write_label_ome_tiff(folder / "instances.ome.tif", instances, mpp, None,
                         name="gland instances: 0 = none, k = row id k of instances.csv")
    write_gland_table(folder / "instances.csv", rows, mpp)
    write_geojson(folder / "instances.geojson", features)
    return len(rows)
