"""`pathseg evaluate`: predict every tile from the store, stitch whole images, score them.

Scores are computed on whole images, not tiles: overlapping tile logits are blended (`evaluate.blend`)
and the padding cropped, which is how the contest metrics (object F1, Dice, Hausdorff) are defined.

Object metrics are reported twice for one run, so the gain of the instance step is visible: `objects`, from
connected components of the predicted map (the baseline, `evaluate.min_object_area`), and
`objects_decoded`, from instances decoded by `pathseg.metrics.instances` (`instances.*`: the watershed from
interior markers for a contour head, components with holes filled and small objects dropped otherwise).
The decoding's free values (marker threshold, both minimum areas) are chosen on the val split
(`instances.tune`, train_head/instance_tuning.py), recorded in the run (`instances.json`), and used for every
split scored and by predict.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pathseg.train_head.contours import contour_fold, fold_prediction
from pathseg.train_head.fit import pick_device
from pathseg.train_head.instance_choice import decoding_settings, read_choice, search_settings, write_choice
from pathseg.train_head.instance_tuning import DecodingSearch
from pathseg.train_head.overlays import save_overlay
from pathseg.train_head.runs import Run, extraction_identity, load_run
from pathseg.train_head.stitching import stitched_logits
from pathseg.train_head.tables import metrics_markdown, metrics_text

from pathseg.config import InstancesConfig, PipelineConfig
from pathseg.errors import PathsegError
from pathseg.files import atomic_write_text
from pathseg.metrics.instances import decode_instances
from pathseg.metrics.objects import GlandMetrics
from pathseg.metrics.pixel import ConfusionMatrix, background_index_of, instances_from_semantic, pixel_metrics
from pathseg.progress import progress_bar, say
from pathseg.store import FeatureStore
from pathseg.store.identity import encoder_identities, encoder_identity

# Bumped whenever a figure's definition changes (2: GlaS object metrics pooled over the split as the contest
# pools them, strict > 50% F1 rule, Hausdorff pairing by minimum Hausdorff distance; 3: objects of decoded
# instances beside connected components; 4: decoding values chosen on val), so that cached scores made under an
# older definition are recomputed, never mixed with new ones.
METRICS_VERSION = 4


def default_splits(store: FeatureStore, config: PipelineConfig) -> list[str]:
    """Held-out splits: everything but the training and validation splits (val if nothing else)."""
    held_out = [s for s in store.splits() if s not in (config.train.train_split, config.train.val_split)]
    return held_out or [config.train.val_split]


@dataclass
class EvaluationResult:
    directory: Path
    metrics: dict


def open_scored_store(run: Run, store_path: Path | None) -> FeatureStore:
    """The run's own store, or another one made with the same extraction (other images, same features)."""
    own = Path(run.record["store"])
    if store_path is None or Path(store_path).resolve() == own.resolve():
        store = FeatureStore.open(own)
        if store.fingerprint != run.record["store_fingerprint"]:
            raise PathsegError(f"{store.path} was re-extracted since run {run.directory} was trained (fingerprint "
                               "changed); refit the head")
        return store
    store = FeatureStore.open(Path(store_path))
    expected = run.record.get("extraction")
    if expected is None and (own / "zarr.json").exists():
        expected = extraction_identity(FeatureStore.open(own))
    if expected is None:
        raise PathsegError(f"run {run.directory} does not record its extraction and its store {own} is gone, so "
                           f"{store.path} cannot be checked against it; refit the head on {store.path}")
    found = extraction_identity(store)
    differing = [key for key in expected if expected[key] != found.get(key)]
    if differing:
        raise PathsegError(f"{store.path} was not extracted like run {run.directory}'s store (differs in "
                           f"{', '.join(differing)}); its features would mean something else to this head")
    return store


def encoders_differ(run: Run, store: FeatureStore) -> list[str]:
    """The run's encoder blocks whose arrays now hold other weights' maps: encoder arrays are outside the store's
    fingerprint, so a store extended with another encoder's weights keeps it."""
    recorded = {block: encoder_identity(entry) for block, entry in (run.record.get("encoders") or {}).items()}
    found = encoder_identities(store.attrs, list(recorded))
    return [block for block, identity in recorded.items() if identity != found.get(block)]


def evaluate_run(config: PipelineConfig, run: Run | Path, *, splits: list[str] | None = None,
                 store_path: Path | None = None, show_progress: bool = True, store: FeatureStore | None = None,
                 echo: bool = True, out_name: str | None = None) -> EvaluationResult:
    """Score a run on its own store, or (`store_path`) on another store extracted the same way.

    `store` is the run's own store already open (ablate scores many runs of one store); `echo` prints the tables;
    `out_name` the folder in the run the reports go to (ablate keeps one per decoding setting it sweeps).
    """
    run = run if isinstance(run, Run) else load_run(run)
    if store is None or store.fingerprint != run.record["store_fingerprint"]:
        store = open_scored_store(run, store_path)
    own_store = store.fingerprint == run.record["store_fingerprint"]
    changed = encoders_differ(run, store)
    if changed:
        raise PathsegError(f"{store.path}: {', '.join(changed)} hold maps of other encoder weights than run "
                           f"{run.directory} was trained on; refit the head on them (fit-head, or ablate)")
    store.require(run.pairs)
    splits = splits or config.evaluate.splits or default_splits(store, config)
    unknown = [s for s in splits if s not in store.splits()]
    if unknown:
        raise PathsegError(f"{store.path} has no split(s) {unknown}; its splits are {store.splits()}")
    device = pick_device(config.train.device)
    head = run.load_head(device)
    class_names = store.class_names  # scored on the store's classes: a contour head's contour folds back
    fold = contour_fold(run.record)
    out_dir = run.directory / (out_name or ("eval" if own_store else f"eval-{store.path.stem}"))
    decoding, baseline_area, decoding_source = None, config.evaluate.min_object_area, "configured"
    decoding_note = None
    if store.has_instances:
        if own_store:
            decoding_note = choose_on_val(run, config, store, head, device, show_progress)
        decoding, baseline_area, decoding_source = decoding_settings(run, config)
    results: dict[str, dict] = {}
    images = store.images
    for split in splits:
        indices = [i for i, entry in enumerate(images) if entry.split == split]
        matrix = ConfusionMatrix(len(class_names), store.ignore_index)
        glands = GlandMetrics() if store.has_instances else None
        decoded = GlandMetrics() if store.has_instances else None
        with progress_bar(f"evaluate {split}", len(indices), "images", show_progress) as advance:
            stitched = stitched_logits(head, store, run.pairs, indices, device, config.train.batch_size,
                                       config.evaluate.blend, prefetch=config.train.prefetch)
            for rank, (index, logits) in enumerate(stitched):
                prediction = fold_prediction(logits.argmax(axis=0).astype(np.uint8), fold)
                truth = store.image_labels(index)
                matrix.update(truth, prediction)
                truth_instances = decoded_instances = None
                if glands is not None:
                    truth_instances = store.image_instances(index)
                    predicted = instances_from_semantic(prediction > 0, baseline_area)
                    glands.update(truth_instances, predicted)
                    decoded_instances = _decoded(logits, run.record["class_names"], decoding)
                    decoded.update(truth_instances, decoded_instances)
                if rank < config.evaluate.overlays:
                    save_overlay(out_dir / "overlays" / split / f"{images[index].id}.png", store.image_rgb(index),
                                 truth, prediction, len(class_names), store.ignore_index, truth_instances,
                                 decoded_instances)
                advance(1)
        split_metrics = pixel_metrics(matrix, class_names, background_index_of(class_names))
        split_metrics["images"] = len(indices)
        if glands is not None and indices:
            split_metrics["objects"] = glands.summary()
            split_metrics["objects_decoded"] = decoded.summary()
        results[split] = split_metrics
    report = {
        "metrics_version": METRICS_VERSION,
        "run": str(run.directory),
        "head_sha256": run.record.get("head_sha256"),  # which head these scores are of (ablate reuses them by it)
        "store": str(store.path),
        "store_fingerprint": store.fingerprint,
        "store_compute_precision": store.compute_precision,
        "timesteps": run.record["timesteps"],
        "blocks": run.record["blocks"],
        "class_names": class_names,
        "ignore_index": store.ignore_index,
        "blend": config.evaluate.blend,
        "min_object_area": baseline_area,
        "instances": decoding.model_dump(mode="json") if decoding is not None else None,
        "instances_source": decoding_source if decoding is not None else None,
        "decoding_settings": search_settings(config),  # what ablate compares before reusing these scores
        "splits": results,
    }
    atomic_write_text(out_dir / "metrics.json", json.dumps(report, indent=2))
    atomic_write_text(out_dir / "metrics.md", metrics_markdown(report))
    if echo:
        print(metrics_text(report))
        if decoding_note:  # said once scoring has succeeded: an error stays the only line a failure prints
            say(decoding_note)
        say(f"wrote {out_dir / 'metrics.json'} and {out_dir / 'metrics.md'}")
    return EvaluationResult(out_dir, report)


def choose_on_val(run: Run, config: PipelineConfig, store: FeatureStore, head: torch.nn.Module, device: torch.device,
                   show_progress: bool) -> str | None:
    """Search the decoding grids on the val split and record the choice, unless this head already has one.
    Returns what was done, in words, for the caller to say."""
    val_split = config.train.val_split
    if not config.instances.tune or read_choice(run, config) is not None:
        return None
    indices = [i for i, entry in enumerate(store.images) if entry.split == val_split]
    if not indices:
        return (f"instances.tune: {store.path} has no {val_split!r} images to choose the decoding on; the "
                "configured instances.* and evaluate.min_object_area were used")
    search = DecodingSearch(config.instances)
    class_names = list(run.record["class_names"])
    fold = contour_fold(run.record)
    with progress_bar(f"choose decoding on {val_split}", len(indices), "images", show_progress) as advance:
        for index, logits in stitched_logits(head, store, run.pairs, indices, device, config.train.batch_size,
                                             config.evaluate.blend, prefetch=config.train.prefetch):
            prediction = fold_prediction(logits.argmax(axis=0).astype(np.uint8), fold)
            try:
                search.update(_softmax(logits), class_names, prediction, store.image_instances(index))
            except ValueError as error:
                raise PathsegError(f"instances: {error}") from None
            advance(1)
    chosen, scores = search.choice()
    write_choice(run, config, chosen, scores)
    return (f"decoding chosen on {val_split} (object F1): marker_threshold {chosen['marker_threshold']}, min_area "
            f"{chosen['min_area']} (F1 {chosen['decoded_val_f1']:.3f}); connected components min area "
            f"{chosen['baseline_min_area']} (F1 {chosen['baseline_val_f1']:.3f}) -> {run.directory / 'instances.json'}")


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=0, keepdims=True))
    return shifted / shifted.sum(axis=0, keepdims=True)


def _decoded(logits: np.ndarray, class_names: list[str], settings: InstancesConfig) -> np.ndarray:
    """The image's gland instances as `settings` decode them, from the head's own classes (contour included)."""
    try:
        return decode_instances(_softmax(logits), list(class_names), settings)
    except ValueError as error:
        raise PathsegError(f"instances: {error}") from None
