"""Which blending of overlapping tiles gives fewer seams: `mean` or `gaussian` (evaluate.blend)?

For a trained run and its store, every image of the chosen splits is stitched both ways from the same tile
logits. Reported per blend: pixel accuracy and mIoU of the stitched images, and a seam ratio: how often
the predicted class changes between two neighbouring pixels across a line where a tile edge falls, over
how often it changes between any two neighbouring pixels. A ratio near 1 means tile edges leave no trace;
above 1, seams. Also writes, for the first images, side-by-side PNGs (image | mean | gaussian) to look at.

    python bench/blend_seams.py RUN_DIR --splits val,testA --png-dir /tmp/seams \
        --json bench/results/blend_seams_glas.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from _common import add_output_options, print_table, save_json, start
from pathseg.train_head.overlays import colourise
from pathseg.train_head.runs import load_run
from pathseg.train_head.stitching import stitched_logits

from pathseg.metrics.pixel import ConfusionMatrix, background_index_of, pixel_metrics
from pathseg.store import FeatureStore

BLENDS = ("mean", "gaussian")


def edge_lines(length: int, pad: int, tile: int, stride: int, tiles: int) -> list[int]:
    """Image coordinates e (1..length-1) where a tile starts or ends, so pixels e-1 and e straddle it."""
    lines = set()
    for k in range(tiles):
        for padded in (k * stride, k * stride + tile):
            e = padded - pad
            if 0 < e < length:
                lines.add(e)
    return sorted(lines)


def changes(labels: np.ndarray, rows: list[int], cols: list[int]) -> tuple[float, float]:
    """(change rate across the given row/column lines, change rate across all neighbouring pixels)."""
    vertical = labels[1:] != labels[:-1]  # between row e-1 and e, at index e-1
    horizontal = labels[:, 1:] != labels[:, :-1]
    at_edges = [vertical[e - 1].mean() for e in rows] + [horizontal[:, e - 1].mean() for e in cols]
    overall = (vertical.sum() + horizontal.sum()) / (vertical.size + horizontal.size)
    return (float(np.mean(at_edges)) if at_edges else 0.0), float(overall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--splits", default="val")
    parser.add_argument("--pngs", type=int, default=2, help="side-by-side PNGs per split (with --png-dir)")
    parser.add_argument("--png-dir", type=Path, default=None,
                        help="where the PNGs go; keep them out of the repository (they show dataset images)")
    add_output_options(parser, "nothing")
    args = parser.parse_args()
    machine = start()
    run = load_run(args.run)
    store = FeatureStore.open(Path(run.record["store"]))
    head = run.load_head("cpu")
    names = store.class_names
    results = {}
    rows_out = []
    for split in args.splits.split(","):
        images = [i for i, entry in enumerate(store.images) if entry.split == split]
        per_blend = {}
        predictions: dict[str, dict[int, np.ndarray]] = {}
        for blend in BLENDS:
            matrix = ConfusionMatrix(len(names), store.ignore_index)
            edge_rates, overall_rates = [], []
            predictions[blend] = {}
            for index, logits in stitched_logits(head, store, run.pairs, images, torch.device("cpu"), 8, blend):
                labels = logits.argmax(axis=0).astype(np.uint8)
                matrix.update(store.image_labels(index), labels)
                grid = store.image_grid(index)
                edges_y = edge_lines(grid.height, grid.pad_top, grid.tile_size, grid.stride, grid.rows)
                edges_x = edge_lines(grid.width, grid.pad_left, grid.tile_size, grid.stride, grid.cols)
                at_edges, overall = changes(labels, edges_y, edges_x)
                edge_rates.append(at_edges)
                overall_rates.append(overall)
                if len(predictions[blend]) < args.pngs:
                    predictions[blend][index] = labels
            metrics = pixel_metrics(matrix, names, background_index_of(names))
            seam = float(np.mean(edge_rates) / max(np.mean(overall_rates), 1e-12))
            per_blend[blend] = {"pixel_accuracy": metrics["pixel_accuracy"], "miou": metrics["miou"],
                                "seam_ratio": seam, "edge_change_rate": float(np.mean(edge_rates)),
                                "overall_change_rate": float(np.mean(overall_rates))}
            rows_out.append([split, blend, f"{metrics['pixel_accuracy']:.4f}", f"{metrics['miou']:.4f}",
                             f"{np.mean(edge_rates):.4f}", f"{np.mean(overall_rates):.4f}", f"{seam:.3f}"])
        results[split] = per_blend
        if args.png_dir is None:
            continue
        args.png_dir.mkdir(parents=True, exist_ok=True)
        from PIL import Image

        for index in predictions["mean"]:
            rgb = store.image_rgb(index)
            gap = np.full((rgb.shape[0], 8, 3), 255, dtype=np.uint8)
            panel = np.concatenate([rgb, gap, colourise(rgb, predictions["mean"][index], None), gap,
                                    colourise(rgb, predictions["gaussian"][index], None)], axis=1)
            Image.fromarray(panel).save(args.png_dir / f"{store.images[index].id}_mean_vs_gaussian.png")
    print_table(f"blending on {args.run}", ["split", "blend", "pixel acc", "mIoU", "change rate at tile edges",
                                             "change rate overall", "seam ratio"], rows_out)
    save_json(args.json, {"machine": machine, "run": str(args.run), "results": results})


if __name__ == "__main__":
    main()
