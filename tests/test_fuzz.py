"""A seeded sweep of damaged inputs through the command line: none may end in a traceback.

Every mutated input (truncated and bit-flipped PNG, BMP, JPEG and TIFF images, wrong masks, Grade.csv
variants, YAML with wrong types or Python tags, corrupted store chunks, attrs and done flags, damaged
checkpoints and safetensors) goes through `pathseg` in-process, as the console script runs it. A refused
input must end with a non-zero exit code and one line that names the file, and leave nothing flagged done.
Some mutations leave a valid file (a flipped bit in BMP pixels is still a BMP): an independent oracle
(Pillow decoding it whole at its size, zipfile's CRC check, torch's tensors-only load) says which, and
exactly those are accepted. `EXPECTED_INPUTS` fixes how many inputs each test puts through.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr

from tests.conftest import small_config, write_glas_fixture
from tests.fuzz_inputs import (
    FAST,
    IMAGE_FORMATS,
    MALFORMED_YAML,
    MASK_FORMATS,
    SIZE,
    WRONG_CLASSES,
    WRONG_LDM_SETTINGS,
    WRONG_SETTINGS,
    Sweep,
    attrs_mutations,
    bit_flips,
    checkpoint_still_valid,
    copy_tree,
    decodes_as_before,
    encoded,
    folder_dataset,
    grade_variants,
    image_mutations,
    linked_copy,
    mask_array,
    nested,
    no_store_marks,
    safetensors_header_end,
    safetensors_still_valid,
    tissue_like,
    truncations,
    wrong_masks,
)

SEED = 15
EXPECTED_INPUTS = {
    "images and masks": 4 * 20 + 3 * 6 + len(wrong_masks()) + 2,
    "Grade.csv": len(grade_variants(["a", "b"])),
    "YAML": len(WRONG_SETTINGS) + len(MALFORMED_YAML) + len(WRONG_CLASSES) + len(WRONG_LDM_SETTINGS),
    "stores": 4 + 2 + 1 + 7 + 2 + 18 + 3,
    "checkpoints": 6 + 5 + 5 + 3 + 7 + 2 + 2 * 6,
}
TINY_DATA = ["--set", "dataset.synthetic.train=1", "--set", "dataset.synthetic.val=0", "--set",
             "dataset.synthetic.test=0", "--set", "dataset.synthetic.height=64", "--set", "dataset.synthetic.width=64",
             "--set", "tiling.tile_size=64", "--set", "tiling.stride=64", "--timesteps", "50", "--quiet"]
SMALL_LDM_YAML = Path(__file__).parent / "fixtures" / "ldm" / "small_only_ssl.yaml"


def test_the_sweep_puts_at_least_200_inputs_through_the_command_line():
    assert sum(EXPECTED_INPUTS.values()) >= 200


@pytest.fixture
def sweep(monkeypatch, capsys, tmp_path) -> Sweep:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(os, "fsync", lambda descriptor: None)  # durability is test_reliability's; here it costs half
    return Sweep(monkeypatch, capsys)


def report(sweep: Sweep, what: str, expected: int) -> None:
    with sweep.capsys.disabled():  # one line per category in the test log: how many were refused, how many valid
        print(f"\nfuzz {what}: {sweep.total} inputs, {dict(sweep.outcomes)}, {sweep.commands} refusing commands")
    assert not sweep.violations, "\n".join(sweep.violations)
    assert sweep.total == expected


def put_through(sweep: Sweep, batch: Path, case: str, culprit: str, probe: Path, root: Path, stem: str,
                kind: str, *args: str) -> None:
    """A mutated image or mask: still valid (the oracle) goes into one batch extraction; otherwise it is refused."""
    if decodes_as_before(probe):
        name = f"{kind}_{sweep.total}"
        shutil.copy(probe, batch / ("images" if kind == "image" else "masks") / f"{name}{probe.suffix}")
        other = batch / ("masks" if kind == "image" else "images")
        shutil.copy(next(other.glob("a.*")), other / f"{name}{next(other.glob('a.*')).suffix}")
        sweep.outcomes["accepted"] += 1
        return
    cache = root.parent / f"cache-{root.name}"
    sweep.refused(case, culprit, "extract", "--data-root", root, "--set", f"cache_dir={cache}", *args, *FAST,
                  nothing_done=lambda: no_store_marks(cache, stem))


def test_damaged_images_and_masks_are_refused_in_one_line(sweep, tmp_path):
    rng = np.random.default_rng(SEED)
    batch = folder_dataset(tmp_path / "still-valid")
    probe_dir = tmp_path / "probe"
    probe_dir.mkdir()
    for ext, (fmt, options) in IMAGE_FORMATS.items():  # truncated and bit-flipped images
        for label, data in image_mutations(encoded(tissue_like(2), fmt, **options), rng):
            (probe := probe_dir / f"b.{ext}").write_bytes(data)
            root = folder_dataset(tmp_path / f"image-{ext}-{label}", ext)
            (root / "images" / f"b.{ext}").write_bytes(data)
            put_through(sweep, batch, f"{ext} {label}", f"b.{ext}", probe, root, "b", "image", "--dataset", "folder")
    for ext, (fmt, options) in MASK_FORMATS.items():  # truncated masks
        for label, data in truncations(encoded(mask_array(), fmt, **options), rng, 6):
            (probe := probe_dir / f"b.{ext}").write_bytes(data)
            root = folder_dataset(tmp_path / f"mask-{ext}-{label}")
            (root / "masks" / "b.png").unlink()
            (root / "masks" / f"b.{ext}").write_bytes(data)
            put_through(sweep, batch, f"mask {ext} {label}", f"b.{ext}", probe, root, "b", "mask", "--dataset",
                        "folder")
    for case, name, data in wrong_masks():  # wrong dtype, channels, labels, size, kind
        root = folder_dataset(tmp_path / f"wrong-{case}")
        (root / "masks" / "b.png").unlink()
        (root / "masks" / name).write_bytes(data)
        cache = tmp_path / f"cache-wrong-{case}"
        sweep.refused(case, name, "extract", "--dataset", "folder", "--data-root", root, "--set",
                      f"cache_dir={cache}", *FAST, nothing_done=lambda c=cache: no_store_marks(c, "b"))
    glas_annotations = [("colour annotation", np.stack([mask_array() * 255, mask_array(), mask_array()], -1)),
                        ("annotation of another size", mask_array()[:40])]
    for case, array in glas_annotations:  # GlaS's own annotations, read as label maps
        root = write_glas_fixture(tmp_path / f"glas-{case}", "png", {"train": 3, "testA": 1}, size=SIZE)
        (root / "train_2_anno.png").write_bytes(encoded(array.astype(np.uint8), "PNG"))
        cache = tmp_path / f"cache-glas-{case}"
        sweep.refused(case, "train_2_anno.png", "extract", "--dataset", "glas", "--data-root", root, "--set",
                      f"cache_dir={cache}", *FAST, nothing_done=lambda c=cache: no_store_marks(c, "train_2"))
    sweep.accepted("still-valid images and masks", "extract", "--dataset", "folder", "--data-root", batch,
                   "--set", f"cache_dir={tmp_path / 'cache-valid'}", "--set", "extract.batch_size=32", *FAST)
    report(sweep, "images and masks", EXPECTED_INPUTS["images and masks"])


def test_grade_csv_that_cannot_give_every_patient_is_refused(sweep, tmp_path):
    names = [f"train_{k}" for k in (1, 2, 3)] + ["testA_1"]
    for case, content in grade_variants(names):
        root = write_glas_fixture(tmp_path / f"glas-{case}", "png", {"train": 3, "testA": 1}, size=SIZE)
        grades = root / "Grade.csv"
        grades.unlink()
        if content is None:
            grades.mkdir()
        else:
            grades.write_bytes(content)
        cache = tmp_path / f"cache-{case}"
        sweep.refused(f"Grade.csv {case}", "Grade.csv", "extract", "--dataset", "glas", "--data-root", root,
                      "--set", f"cache_dir={cache}", *FAST, nothing_done=lambda c=cache: no_store_marks(c))
    report(sweep, "Grade.csv", EXPECTED_INPUTS["Grade.csv"])


def test_yaml_with_wrong_types_or_python_tags_is_refused_and_runs_nothing(sweep, tmp_path):
    inputs = [(f"setting {key}={value!r}", yaml.safe_dump(nested(key, value)).encode())
              for key, value in WRONG_SETTINGS] + MALFORMED_YAML
    for number, (case, content) in enumerate(inputs):
        path = tmp_path / f"pipeline-{number}.yaml"
        path.write_bytes(content)
        sweep.refused(f"pipeline.yaml {case}", path.name, "extract", "--config", path, "--quiet",
                      nothing_done=lambda: no_store_marks(tmp_path / "cache"))
    for number, (case, content) in enumerate(WRONG_CLASSES):
        root = folder_dataset(tmp_path / f"classes-{number}")
        (root / "classes.yaml").write_bytes(content)
        sweep.refused(f"classes.yaml {case}", "classes.yaml", "extract", "--dataset", "folder", "--data-root", root,
                      *FAST, nothing_done=lambda: no_store_marks(tmp_path / "cache"))
    (tmp_path / "model.ckpt").write_bytes(b"")  # the YAML is read, and refused, before the checkpoint
    for number, (key, value) in enumerate(WRONG_LDM_SETTINGS):
        tree = yaml.safe_load(SMALL_LDM_YAML.read_text())
        node = tree["model"]["params"]  # keys are relative to model.params
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
        path = tmp_path / f"ldm-{number}.yaml"
        path.write_text(yaml.safe_dump(tree))
        sweep.refused(f"LDM YAML {key}={value!r}", path.name, "convert-ldm", "--ckpt", tmp_path / "model.ckpt",
                      "--config", path, "--out", tmp_path / f"converted-{number}",
                      nothing_done=lambda n=number: _absent(tmp_path / f"converted-{n}"))
    assert not (tmp_path / "SENTINEL").exists()
    report(sweep, "YAML", EXPECTED_INPUTS["YAML"])


def _absent(path: Path) -> None:
    assert not path.exists() and not path.with_name(path.name + ".partial").exists(), f"{path} was written"


# ---------------------------------------------------------------------------------------------------------
# Stores: chunks, done flags, attrs and array metadata of a copy of a small extracted store
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A store of four one-tile images (train, train, val, test), a head fitted on it, and its config as a file:
    small enough that the commands below, which read until they meet the damage, take a fraction of a second."""
    from pathseg.extract.runner import run_extraction
    from pathseg.train_head.fit import fit_head

    from pathseg.config import config_to_dict

    tmp = tmp_path_factory.mktemp("trained")
    config = small_config(tmp, **{"dataset.synthetic.train": 2, "dataset.synthetic.val": 1, "dataset.synthetic.test": 1,
                                  "dataset.synthetic.height": 64, "dataset.synthetic.width": 64,
                                  "tiling.tile_size": 64, "tiling.stride": 64, "extract.timesteps": [50],
                                  "extract.blocks": ["up1"], "extract.tiles_per_shard": 1, "train.epochs": 1})
    store = run_extraction(config, show_progress=False).store
    run = fit_head(config, store_path=store, show_progress=False).run_dir
    path = tmp / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(config)))
    return path, Path(store), run


def chunk_mutants(store: Path, rng: np.random.Generator) -> list[tuple[str, str, bytes | None, str]]:
    """(case, file inside the store, new content or None for deleted, which stage-two commands also meet it).

    The damage sits in the validation image, which fit-head reads to choose its epoch and `evaluate --splits
    val` scores; tile labels are read by fit-head only, z0 by neither.
    """
    attrs = json.loads((store / "zarr.json").read_text())["attributes"]
    val = next(i for i, row in enumerate(attrs["images"]) if row["split"] == "val")
    shard = attrs["images"][val]["first_tile"] // attrs["tiles_per_shard"]
    feature = f"features/t0050/up1/c/{shard}/0/0/0"
    data = (store / feature).read_bytes()
    both, fit, none = "fit-head evaluate", "fit-head", ""
    mutants = [(f"feature shard {label}", feature, content, both if k == 0 else none)
               for k, (label, content) in enumerate(bit_flips(data, rng, 4))]
    mutants += [(f"feature shard {label}", feature, content, both) for label, content in truncations(data, rng, 2)]
    mutants.append(("feature shard deleted", feature, None, both))
    for name, commands in ((f"latents/z0/c/{shard}/0/0/0", none), ("tiles/labels/c/0/0/0", fit),
                           ("tiles/image/c/0", both), (f"images/{val}/labels/c/0/0", both),
                           (f"images/{val}/rgb/c/0/0/0", none), (f"done/t0050/up1/c/{shard}", both),
                           (f"images/done/c/{val}", both)):
        label, content = bit_flips((store / name).read_bytes(), rng, 1)[0]
        mutants.append((f"{name.split('/c/')[0]} chunk {label}", name, content, commands))
    return mutants


def test_damaged_stores_are_reported_by_verify_and_refused_by_stage_two(sweep, tmp_path, trained):
    config, pristine, run = trained
    rng = np.random.default_rng(SEED)
    both = "fit-head evaluate"
    stores = []
    for number, (case, name, content, commands) in enumerate(chunk_mutants(pristine, rng)):
        copy = copy_tree(pristine, tmp_path / f"store-{number}.zarr")
        (copy / name).unlink() if content is None else (copy / name).write_bytes(content)
        stores.append((case, copy, name.split("/c/")[0], commands))
    for number, flag in enumerate((7, 0)):  # a done flag that is neither 0 nor 1; a finished shard un-flagged
        copy = copy_tree(pristine, tmp_path / f"flag-{number}.zarr")
        zarr.open_group(str(copy), mode="r+")["done/t0050/up1"][2] = flag
        stores.append((f"done flag set to {flag}", copy, "done/t0050/up1" if flag else copy.name, both))
    attrs = json.loads((pristine / "zarr.json").read_text())["attributes"]
    for number, (case, change) in enumerate(attrs_mutations(attrs)):
        copy = copy_tree(pristine, tmp_path / f"attrs-{number}.zarr")
        document = json.loads((copy / "zarr.json").read_text())
        if isinstance(change, bytes):
            (copy / "zarr.json").write_bytes(change)
        else:
            document["attributes"] = change
            (copy / "zarr.json").write_text(json.dumps(document))
        stores.append((f"attrs {case}", copy, copy.name, both))
    val = next(i for i, row in enumerate(attrs["images"]) if row["split"] == "val")
    for number, (name, content) in enumerate((("features/t0050/up1/zarr.json", b'{"zarr_format": 3, "node_'),
                                              ("tiles/image/zarr.json", b"[]"),
                                              (f"images/{val}/labels/zarr.json", bytes(range(40))))):
        copy = copy_tree(pristine, tmp_path / f"metadata-{number}.zarr")
        (copy / name).write_bytes(content)
        stores.append((f"{name} damaged", copy, name.removesuffix("/zarr.json"), both))
    for case, copy, culprit, commands in stores:
        sweep.refused(f"verify: {case}", culprit, "cache", "verify", copy, "--quiet", lines_on="verify",
                      codes=(1, 2))
        if "fit-head" in commands:
            runs = tmp_path / "runs" / copy.stem
            sweep.refused(f"fit-head: {case}", culprit, "fit-head", "--config", config, "--store", copy, "--set",
                          f"runs_dir={tmp_path / 'runs'}", "--quiet", outcome=False,
                          nothing_done=lambda r=runs: _no_file(r, "run.json"))
        if "evaluate" in commands:
            sweep.refused(f"evaluate: {case}", culprit, "evaluate", run, "--store", copy, "--splits", "val",
                          "--quiet", outcome=False, nothing_done=lambda: _no_file(run, "metrics.json"))
    report(sweep, "stores", EXPECTED_INPUTS["stores"])


def _no_file(folder: Path, name: str) -> None:
    assert not list(folder.rglob(name)), f"{name} written under {folder}"


def test_damaged_run_records_and_heads_are_refused_in_one_line(sweep, tmp_path, trained):
    _, _, run = trained
    rng = np.random.default_rng(SEED)
    record, head = (run / "run.json").read_bytes(), (run / "head.safetensors").read_bytes()
    mutants = [("run.json", label, data) for label, data in truncations(record, rng, 2)[1:]]
    mutants += [("run.json", "a list", b"[1, 2]"), ("run.json", "not UTF-8", b"\xff\xfe{}")]
    mutants += [("head.safetensors", label, data) for label, data in truncations(head, rng, 2)]
    mutants += [("head.safetensors", label, data)
                for label, data in bit_flips(head, rng, 2, 0, safetensors_header_end(head))]
    for number, (name, label, data) in enumerate(mutants):
        copy = copy_tree(run, tmp_path / f"run-{number}")
        (copy / name).write_bytes(data)
        sweep.refused(f"{name} {label}", name, "evaluate", copy, "--quiet",
                      nothing_done=lambda c=copy: _no_file(c, "metrics.json"))
    report(sweep, "run records", len(mutants))


# ---------------------------------------------------------------------------------------------------------
# Checkpoints (.ckpt, .pth) and safetensors
# ---------------------------------------------------------------------------------------------------------


def test_damaged_checkpoints_and_safetensors_are_refused_in_one_line(sweep, tmp_path):
    import torch

    from tests.extract.test_ldm_checkpoint import build_reference

    rng = np.random.default_rng(SEED)
    ldm_yaml = tmp_path / "narrow_only_ssl.yaml"  # the small test LDM, narrower still: a 5 MB checkpoint
    tree = yaml.safe_load(SMALL_LDM_YAML.read_text())
    tree["model"]["params"]["unet_config"]["params"].update(channel_mult=[1, 2], attention_resolutions=[2],
                                                            num_res_blocks=1)
    tree["model"]["params"]["first_stage_config"]["params"]["ddconfig"]["ch_mult"] = [1, 1, 1]
    ldm_yaml.write_text(yaml.safe_dump(tree))
    state = build_reference(ldm_yaml).state_dict()
    clean = {}
    for kind, zip_format in (("zip", True), ("legacy", False)):
        clean[kind] = tmp_path / f"clean-{kind}.ckpt"
        torch.save({"state_dict": state, "epoch": 3, "global_step": 1200}, clean[kind],
                   _use_new_zipfile_serialization=zip_format)
    converted = tmp_path / "converted"
    sweep.accepted("clean checkpoint", "convert-ldm", "--ckpt", clean["zip"], "--config", ldm_yaml, "--out",
                   converted)
    zip_data, legacy_data = clean["zip"].read_bytes(), clean["legacy"].read_bytes()
    mutants = [("zip " + label, data) for label, data in truncations(zip_data, rng, 6)]
    mutants += [("zip " + label, data) for label, data in bit_flips(zip_data, rng, 5, 0, 4096)]
    mutants += [("zip " + label, data) for label, data in bit_flips(zip_data, rng, 5)]
    mutants += [("legacy " + label, data) for label, data in truncations(legacy_data, rng, 3)]
    mutants += [("legacy " + label, data) for label, data in bit_flips(legacy_data, rng, 7, 0, 3000)]
    for number, (case, data) in enumerate(mutants):
        ckpt = tmp_path / f"mutant-{number}.ckpt"
        ckpt.write_bytes(data)
        out = tmp_path / f"out-{number}"
        if checkpoint_still_valid(ckpt, state):
            sweep.accepted(f"ckpt {case}", "convert-ldm", "--ckpt", ckpt, "--config", ldm_yaml, "--out", out)
            sweep.outcomes["accepted"] += 1
            continue
        sweep.refused(f"ckpt {case}", ckpt.name, "convert-ldm", "--ckpt", ckpt, "--config", ldm_yaml,
                      "--out", out, nothing_done=lambda o=out: _absent(o))
        if number in (0, 8):  # the same loader behind --backbone FILE.ckpt
            cache = tmp_path / f"cache-ckpt-{number}"
            sweep.refused(f"--backbone {case}", ckpt.name, "extract", "--backbone", ckpt, "--backbone-config",
                          ldm_yaml, *TINY_DATA, "--set", f"cache_dir={cache}", "--blocks", "mid", outcome=False,
                          nothing_done=lambda c=cache: no_store_marks(c))
    pth = tmp_path / "vit256_small_dino.pth"  # SSL encoder weights: damaged before their keys are even looked at
    torch.save({"teacher": {"backbone.cls_token": torch.zeros(1, 1, 384)}, "epoch": 100}, pth)
    for number, (case, data) in enumerate(truncations(pth.read_bytes(), rng, 2)[1:] +
                                          bit_flips(pth.read_bytes(), rng, 1, 0, 800)):
        weights = tmp_path / f"encoder-{number}.pth"
        weights.write_bytes(data)
        cache = tmp_path / f"cache-encoder-{number}"
        sweep.refused(f"encoder weights {case}", weights.name, "extract", *TINY_DATA, "--blocks", "up1",
                      "--set", "conditioning.mode=ssl", "--set", "conditioning.encoder=hipt_vit_s16",
                      "--set", f"conditioning.encoder_weights={weights}", "--set", f"cache_dir={cache}",
                      nothing_done=lambda c=cache: no_store_marks(c))
    for part in ("ssl_projector/model.safetensors", "first_stage/diffusion_pytorch_model.safetensors"):
        original = converted / part
        data = original.read_bytes()
        header = safetensors_header_end(data)
        for label, content in truncations(data, rng, 3) + bit_flips(data, rng, 3, 0, header):
            backbone = linked_copy(converted, tmp_path / f"backbone-{sweep.total}")
            (backbone / part).unlink()
            (backbone / part).write_bytes(content)
            if safetensors_still_valid(backbone / part, original):
                sweep.outcomes["accepted"] += 1  # e.g. a flipped bit in the header's padding spaces; nothing to run
                continue
            cache = tmp_path / f"cache-{backbone.name}"
            sweep.refused(f"{part} {label}", part.split("/")[-1], "extract", "--backbone", backbone, *TINY_DATA,
                          "--set", f"cache_dir={cache}", "--blocks", "mid",
                          nothing_done=lambda c=cache: no_store_marks(c))
    report(sweep, "checkpoints", EXPECTED_INPUTS["checkpoints"])
