"""GlaS (Warwick-QU) in its official layout: `train_N.bmp`, `train_N_anno.bmp`, `testA_*`, `testB_*`, `Grade.csv`.

Validation images are carved out of train by patient, never by image: GlaS has several images per
patient, and a patient on both sides of the split would leak.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np

from pathseg.config import DatasetConfig
from pathseg.datasets.base import (
    ImageRecord,
    SegmentationDataset,
    digest_files,
    image_size,
    read_label_map,
    read_rgb,
    require_root,
)
from pathseg.errors import PathsegError
from pathseg.loading.data_files import read_csv_rows

IMAGE_NAME = re.compile(r"^(train|testA|testB)_(\d+)\.(bmp|png)$", re.IGNORECASE)
OFFICIAL_SPLITS = ("train", "testA", "testB")


def read_grades(path: Path) -> dict[str, str]:
    """image name -> patient ID; the official headers carry leading spaces, so keys are stripped.

    Patients decide the validation split, so a row without a patient, or an image given two patients, is
    refused rather than guessed.
    """
    rows = read_csv_rows(path, "use the official GlaS Grade.csv")
    if not any(rows):
        raise PathsegError(f"{path}: empty; expected the official GlaS Grade.csv")
    header_row = next(row for row in rows if row)
    header = [cell.strip().lower() for cell in header_row]
    if "name" not in header or "patient id" not in header:
        raise PathsegError(f"{path}: needs columns 'name' and 'patient ID', found {header_row}")
    name_col, patient_col = header.index("name"), header.index("patient id")
    patients: dict[str, str] = {}
    for number, row in enumerate(rows[rows.index(header_row) + 1 :], start=rows.index(header_row) + 2):
        if not any(cell.strip() for cell in row):
            continue
        name = row[name_col].strip() if len(row) > name_col else ""
        patient = row[patient_col].strip() if len(row) > patient_col else ""
        if not name or not patient:
            raise PathsegError(f"{path}:{number}: expected an image name and its patient ID, found {row}")
        if patients.setdefault(name, patient) != patient:
            raise PathsegError(f"{path}:{number}: {name} is given patients {patients[name]} and {patient}")
    if not patients:
        raise PathsegError(f"{path}: lists no images under its header; expected the official GlaS Grade.csv")
    return patients


def carve_validation(patients: dict[str, str], fraction: float, seed: int) -> set[str]:
    """Names of train images whose patients are held out; whole patients only, chosen by seed."""
    unique = sorted(set(patients.values()), key=lambda p: (len(p), p))
    if fraction <= 0 or len(unique) < 2:
        return set()
    count = min(len(unique) - 1, max(1, round(fraction * len(unique))))
    chosen = set(np.random.default_rng(seed).permutation(unique)[:count].tolist())
    return {name for name, patient in patients.items() if patient in chosen}


def _instances(path: Path) -> np.ndarray:
    return read_label_map(path).astype(np.int32)


def _semantic(path: Path) -> np.ndarray:
    return (read_label_map(path) > 0).astype(np.uint8)


class GlaS(SegmentationDataset):
    name = "glas"
    class_names = ["background", "gland"]
    splits = ("train", "val", "testA", "testB")

    def __init__(self, root: Path, val_fraction: float = 0.2, split_seed: int = 0, wanted: list[str] | None = None):
        self.root = Path(root)
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.wanted = wanted
        if not self.root.is_dir():
            raise PathsegError(
                f"GlaS folder {self.root} does not exist; pass --data-root with the unpacked Warwick-QU data"
            )

    @property
    def has_instances(self) -> bool:
        return True

    def _images(self) -> list[tuple[str, str, Path, Path]]:
        found = []
        for path in self.root.iterdir():
            match = IMAGE_NAME.match(path.name)
            if not match:
                continue
            stem = path.stem
            annotations = [
                a
                for a in (path.with_name(f"{stem}_anno{ext}") for ext in (".bmp", ".png", ".BMP", ".PNG"))
                if a.exists()
            ]
            if not annotations:
                raise PathsegError(f"{path}: no annotation {stem}_anno.bmp or {stem}_anno.png next to it")
            found.append((match.group(1), stem, path, annotations[0]))
        if not found:
            raise PathsegError(
                f"{self.root}: no GlaS images (train_N.bmp/png, testA_N..., testB_N...) found; check --data-root"
            )
        split_rank = {name: i for i, name in enumerate(OFFICIAL_SPLITS)}
        found.sort(key=lambda item: (split_rank[item[0]], int(item[1].split("_")[1])))
        return found

    def _patients(self) -> dict[str, str]:
        grades = self.root / "Grade.csv"
        if not grades.exists():
            if self.val_fraction > 0:
                raise PathsegError(
                    f"{grades} is missing; it gives the patients needed for the validation split "
                    "(add it, or set dataset.glas.val_fraction=0)"
                )
            return {}
        return read_grades(grades)

    def records(self) -> list[ImageRecord]:
        images = self._images()
        patients = self._patients()
        unplaced = [stem for split, stem, _, _ in images if split == "train" and stem not in patients]
        if unplaced and self.val_fraction > 0:
            raise PathsegError(
                f"{self.root / 'Grade.csv'}: no row for {', '.join(unplaced[:5])}; the validation split needs every "
                "train image's patient (add the rows, or set dataset.glas.val_fraction=0)"
            )
        train_patients = {stem: patients.get(stem, stem) for split, stem, _, _ in images if split == "train"}
        held_out = carve_validation(train_patients, self.val_fraction, self.split_seed)
        records = []
        for split, stem, image_path, anno_path in images:
            if split == "train" and stem in held_out:
                split = "val"
            height, width = image_size(image_path)
            if image_size(anno_path) != (height, width):
                anno_height, anno_width = image_size(anno_path)
                raise PathsegError(
                    f"{anno_path}: annotation is {anno_width}x{anno_height} but its image {image_path.name} is "
                    f"{width}x{height}; fix or remove the pair"
                )
            records.append(
                ImageRecord(
                    id=stem,
                    split=split,
                    height=height,
                    width=width,
                    load_rgb=functools.partial(read_rgb, image_path),
                    load_labels=functools.partial(_semantic, anno_path),
                    load_instances=functools.partial(_instances, anno_path),
                    group=patients.get(stem),
                )
            )
        return self.select(records, self.wanted)

    def identity(self) -> dict:
        files = [
            p
            for p in self.root.iterdir()
            if p.is_file() and (IMAGE_NAME.match(p.name) or "_anno" in p.name or p.name == "Grade.csv")
        ]
        return {
            "name": self.name,
            "val_fraction": self.val_fraction,
            "split_seed": self.split_seed,
            "splits": self.wanted,
            "files_digest": digest_files(files, self.root),
        }


def build_glas(config: DatasetConfig) -> GlaS:
    return GlaS(require_root(config.root, "glas"), config.glas.val_fraction, config.glas.split_seed, config.splits)
