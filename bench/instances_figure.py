"""Touching glands before and after the instance step: one picture for docs/instances.md (issue 23, item 7).

For one image of a store: the image, the truth glands, the connected components of a semantic run (with
its val-chosen minimum area), and the instances of a contour run (with its val-chosen decoding), each
object outlined in a colour of its own. Both runs decode exactly as `pathseg evaluate` does (the same
stitching, fold and recorded choice), so the picture shows what the table's figures count. With no
`--image`, the test image where the contour run gains the most objects matched over the semantic run is
taken, among the first `--candidates` of the split.

    python bench/instances_figure.py SEMANTIC_RUN CONTOUR_RUN --split testA [--image testA_3] --out FILE.jpg
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from pathseg.train_head.contours import contour_fold, fold_prediction
from pathseg.train_head.evaluate import choose_on_val
from pathseg.train_head.instance_choice import decoding_settings
from pathseg.train_head.overlays import outline_instances
from pathseg.train_head.runs import load_run
from pathseg.train_head.stitching import stitched_logits
from PIL import Image, ImageDraw

from pathseg.config import PipelineConfig
from pathseg.metrics.instances import decode_instances
from pathseg.metrics.objects import object_f1
from pathseg.metrics.pixel import instances_from_semantic
from pathseg.store import FeatureStore


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=0, keepdims=True))
    return shifted / shifted.sum(axis=0, keepdims=True)


def objects_of(run_dir: Path, store: FeatureStore, indices: list[int], decoded: bool) -> dict[int, np.ndarray]:
    """Per image: the run's objects as evaluate scores them (components, or decoded instances)."""
    run = load_run(run_dir)
    config = PipelineConfig.model_validate(run.record["config"])
    head = run.load_head("cpu")
    choose_on_val(run, config, store, head, "cpu", show_progress=False)  # no-op when this grid's choice is recorded
    settings, baseline_area, _ = decoding_settings(run, config)
    fold = contour_fold(run.record)
    result = {}
    for index, logits in stitched_logits(head, store, run.pairs, indices, "cpu", 16, config.evaluate.blend):
        if decoded:
            result[index] = decode_instances(_softmax(logits), list(run.record["class_names"]), settings)
        else:
            prediction = fold_prediction(logits.argmax(axis=0).astype(np.uint8), fold)
            result[index] = instances_from_semantic(prediction > 0, baseline_area)
    return result


def _labelled(panel: np.ndarray, text: str) -> np.ndarray:
    image = Image.fromarray(panel)
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 0, 8 + 7 * len(text), 18], fill="white")
    draw.text((4, 3), text, fill="black")
    return np.asarray(image)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("semantic_run", type=Path)
    parser.add_argument("contour_run", type=Path)
    parser.add_argument("--split", default="testA")
    parser.add_argument("--image", help="image id; default: the one where the contour run gains most")
    parser.add_argument("--candidates", type=int, default=20)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--scale", type=float, default=0.75, help="size of the saved picture (docs stay small)")
    args = parser.parse_args()
    store = FeatureStore.open(Path(load_run(args.contour_run).record["store"]))
    entries = store.images
    if args.image:
        indices = [i for i, e in enumerate(entries) if e.id == args.image]
    else:
        indices = [i for i, e in enumerate(entries) if e.split == args.split][: args.candidates]
    semantic = objects_of(args.semantic_run, store, indices, decoded=False)
    contour = objects_of(args.contour_run, store, indices, decoded=True)

    def gain(index: int) -> int:
        truth = store.image_instances(index)
        return object_f1(truth, contour[index])["tp"] - object_f1(truth, semantic[index])["tp"]

    index = max(indices, key=gain)
    rgb = store.image_rgb(index)
    truth = store.image_instances(index)
    counts = {name: object_f1(truth, objects) for name, objects in (("cc", semantic[index]), ("inst", contour[index]))}
    panels = [
        _labelled(rgb, entries[index].id),
        _labelled(outline_instances(rgb, truth, 3), f"truth: {int(truth.max())} glands"),
        _labelled(outline_instances(rgb, semantic[index], 3),
                  f"semantic + components: {counts['cc']['tp']} of {int(truth.max())} found, "
                  f"{counts['cc']['fp']} false"),
        _labelled(outline_instances(rgb, contour[index], 3),
                  f"contour + instances: {counts['inst']['tp']} of {int(truth.max())} found, "
                  f"{counts['inst']['fp']} false"),
    ]
    gap = np.full((rgb.shape[0], 8, 3), 255, dtype=np.uint8)
    top = np.concatenate([panels[0], gap, panels[1]], axis=1)
    bottom = np.concatenate([panels[2], gap, panels[3]], axis=1)
    figure = np.concatenate([top, np.full((8, top.shape[1], 3), 255, dtype=np.uint8), bottom], axis=0)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    picture = Image.fromarray(figure)
    picture = picture.resize((round(picture.width * args.scale), round(picture.height * args.scale)), Image.LANCZOS)
    picture.save(args.out, quality=85)
    print(f"{entries[index].id}: cc {counts['cc']}, inst {counts['inst']} -> {args.out}")


if __name__ == "__main__":
    main()
