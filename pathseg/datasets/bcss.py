"""BCSS (Amgad et al. 2019) in its official layout, resampled to a working resolution and grouped by a config table.

    ROOT/rgbs_colorNormalized/TCGA-XX-....png   H&E ROIs at 0.25 um/px
    ROOT/masks/TCGA-XX-....png                  one GT code per pixel, same names
    ROOT/gtruth_codes.tsv or ROOT/meta/gtruth_codes.tsv   label <TAB> GT_code

Splits go by institution (the TCGA tissue source site XX), never by ROI: ROIs of one site share staining
and scanner, and a site on both sides of a split would flatter every score.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pathseg.config import BCSSOptions, DatasetConfig
from pathseg.datasets.base import (
    ImageRecord,
    SegmentationDataset,
    digest_files,
    image_size,
    open_image,
    require_pairs,
    require_root,
)
from pathseg.errors import PathsegError
from pathseg.loading.data_files import read_text

IMAGE_DIR = "rgbs_colorNormalized"
MASK_DIR = "masks"
CODES_FILE = "gtruth_codes.tsv"
IGNORE_INDEX = 255
INSTITUTION = re.compile(r"^TCGA-([A-Za-z0-9]{2})-")
MPP_TAG = re.compile(r"_MPP-(\d+(?:\.\d+)?)", re.IGNORECASE)


def find_codes_file(root: Path) -> Path:
    for candidate in (root / CODES_FILE, root / "meta" / CODES_FILE):
        if candidate.is_file():
            return candidate
    raise PathsegError(
        f"{root}: no {CODES_FILE} at {root / CODES_FILE} or {root / 'meta' / CODES_FILE}; "
        "copy it from the BCSS release (tab-separated label and GT_code)"
    )


def read_codes(path: Path) -> dict[str, int]:
    """label -> GT code, in file order; a header row (`label<TAB>GT_code`) is optional."""
    codes: dict[str, int] = {}
    for number, line in enumerate(read_text(path, "copy it again from the BCSS release").splitlines(), start=1):
        cells = [cell.strip() for cell in line.split("\t")] if "\t" in line else line.split()
        if not cells or not cells[0]:
            continue
        if len(cells) < 2:
            raise PathsegError(f"{path}:{number}: expected `label<TAB>GT_code`, found {line!r}")
        label, raw = cells[0], cells[1]
        if not raw.lstrip("-").isdecimal():
            if not codes:
                continue  # the header
            raise PathsegError(f"{path}:{number}: GT_code {raw!r} of {label!r} is not an integer")
        code = int(raw)
        if not 0 <= code < IGNORE_INDEX:
            raise PathsegError(f"{path}:{number}: GT_code {code} of {label!r} is outside 0..254 (masks are 8-bit)")
        if label in codes:
            raise PathsegError(f"{path}:{number}: label {label!r} is listed twice")
        if code in codes.values():
            raise PathsegError(f"{path}:{number}: GT_code {code} is given to two labels")
        codes[label] = code
    if not codes:
        raise PathsegError(f"{path}: lists no labels; expected rows `label<TAB>GT_code`")
    return codes


def code_table(codes: dict[str, int], options: BCSSOptions, codes_path: Path) -> np.ndarray:
    """A 256-entry lookup, GT code -> output class (0..K-1) or IGNORE_INDEX; codes the tsv lacks stay -1.

    Every label must be placed, in a class or in `ignore`: a label silently dropped into some default
    would change what a class means without anyone deciding it.
    """
    known = set(codes)
    for name, labels in [*options.classes.items(), ("ignore", options.ignore)]:
        unknown = [label for label in labels if label not in known]
        if unknown:
            key = "dataset.bcss.ignore" if name == "ignore" else f"dataset.bcss.classes.{name}"
            raise PathsegError(f"{key} names {unknown}, which {codes_path} does not list; its labels are {list(codes)}")
    table = np.full(256, -1, dtype=np.int16)
    for index, labels in enumerate(options.classes.values()):
        for label in labels:
            table[codes[label]] = index
    for label in options.ignore:
        table[codes[label]] = IGNORE_INDEX
    unplaced = [label for label, code in codes.items() if table[code] < 0]
    if unplaced:
        raise PathsegError(
            f"labels {unplaced} of {codes_path} are in no class of dataset.bcss.classes and not in "
            "dataset.bcss.ignore; add each to one of them"
        )
    return table


def _open(path: Path):
    """PIL image of a possibly very large ROI (BCSS ROIs can pass PIL's decompression-bomb warning)."""
    return open_image(path)


RESAMPLE = {"area": "BOX", "bicubic": "BICUBIC", "lanczos": "LANCZOS"}


def load_rgb(path: Path, size: tuple[int, int], method: str) -> np.ndarray:
    """(H, W, 3) uint8 at the working resolution; PIL filters are antialiased when they shrink."""
    from PIL import Image

    image = _open(path).convert("RGB")
    height, width = size
    if image.size != (width, height):
        image = image.resize((width, height), resample=getattr(Image.Resampling, RESAMPLE[method]))
    return np.asarray(image)


def load_labels(path: Path, size: tuple[int, int], table: np.ndarray, codes_path: Path) -> np.ndarray:
    """(H, W) uint8 classes and IGNORE_INDEX at the working resolution; unknown codes fail, naming them."""
    from PIL import Image

    raw = np.asarray(_open(path))
    if raw.ndim == 3:
        channels = raw[..., :3]
        if channels.shape[-1] == 3 and not (
            np.array_equal(channels[..., 0], channels[..., 1]) and np.array_equal(channels[..., 0], channels[..., 2])
        ):
            raise PathsegError(f"{path}: mask is colour RGB; BCSS masks hold one GT code per pixel")
        raw = channels[..., 0]
    present = np.flatnonzero(np.bincount(raw.ravel(), minlength=256)) if raw.dtype == np.uint8 else np.unique(raw)
    unknown = [int(v) for v in present if not 0 <= v <= 255 or table[int(v)] < 0]
    if unknown:
        raise PathsegError(
            f"{path}: mask values {unknown[:20]} are not GT codes of {codes_path}; fix the mask or add them to the tsv"
        )
    labels = table[raw].astype(np.uint8)
    height, width = size
    if labels.shape != (height, width):
        labels = np.asarray(Image.fromarray(labels).resize((width, height), resample=Image.Resampling.NEAREST))
    return labels


@dataclass(frozen=True)
class ROI:
    name: str
    institution: str
    image: Path
    mask: Path
    native_mpp: float


class BCSS(SegmentationDataset):
    name = "bcss"
    ignore_index = IGNORE_INDEX
    splits = ("train", "val", "test")

    def __init__(self, root: Path, options: BCSSOptions, wanted: list[str] | None = None) -> None:
        self.root = Path(root)
        self.options = options
        self.wanted = wanted
        if not (self.root / IMAGE_DIR).is_dir() or not (self.root / MASK_DIR).is_dir():
            raise PathsegError(
                f"BCSS folder {self.root} lacks {IMAGE_DIR}/ and {MASK_DIR}/; pass --data-root with the BCSS release"
            )
        self.codes_path = find_codes_file(self.root)
        self.codes = read_codes(self.codes_path)
        self.table = code_table(self.codes, options, self.codes_path)
        self.class_names = list(options.classes)

    def split_of(self, institution: str) -> str:
        if institution in self.options.test_institutions:
            return "test"
        if institution in self.options.val_institutions:
            return "val"
        return "train"

    def rois(self) -> list[ROI]:
        images = {p.stem: p for p in (self.root / IMAGE_DIR).iterdir() if p.suffix.lower() == ".png"}
        masks = {p.stem: p for p in (self.root / MASK_DIR).iterdir() if p.suffix.lower() == ".png"}
        require_pairs(images, masks, self.root / IMAGE_DIR, self.root / MASK_DIR, ".png", ".png")
        if not images:
            raise PathsegError(f"{self.root / IMAGE_DIR}: no .png ROIs found; check --data-root")
        rois = []
        for stem in sorted(images):
            match = INSTITUTION.match(stem)
            if not match:
                raise PathsegError(
                    f"{images[stem]}: name does not start with TCGA-XX- (XX = tissue source site), "
                    "which the institution splits need; keep the official BCSS names"
                )
            tag = MPP_TAG.search(stem)
            native = float(tag.group(1)) if tag else self.options.native_mpp
            rois.append(ROI(stem, match.group(1).upper(), images[stem], masks[stem], native))
        return rois

    def working_size(self, roi: ROI) -> tuple[int, int]:
        """(height, width) after resampling, from the headers: listing never decodes pixels."""
        height, width = image_size(roi.image)
        mask_size = image_size(roi.mask)
        if mask_size != (height, width):
            raise PathsegError(
                f"{roi.mask}: mask is {mask_size[1]}x{mask_size[0]} but its image is {width}x{height}; fix the pair"
            )
        scale = roi.native_mpp / self.options.mpp
        return max(1, round(height * scale)), max(1, round(width * scale))

    def records(self) -> list[ImageRecord]:
        records = []
        for roi in self.rois():
            size = self.working_size(roi)
            records.append(
                ImageRecord(
                    id=roi.name,
                    split=self.split_of(roi.institution),
                    height=size[0],
                    width=size[1],
                    load_rgb=functools.partial(load_rgb, roi.image, size, self.options.resample),
                    load_labels=functools.partial(load_labels, roi.mask, size, self.table, self.codes_path),
                    group=roi.institution,
                )
            )
        return self.select(records, self.wanted)

    def identity(self) -> dict:
        files = [p for d in (IMAGE_DIR, MASK_DIR) for p in (self.root / d).iterdir() if p.suffix.lower() == ".png"]
        return {
            "name": self.name,
            "options": self.options.model_dump(mode="json"),
            "codes_digest": hashlib.sha256(self.codes_path.read_bytes()).hexdigest(),
            "splits": self.wanted,
            "files_digest": digest_files(files, self.root),
        }


def build_bcss(config: DatasetConfig) -> BCSS:
    return BCSS(require_root(config.root, "bcss"), config.bcss, config.splits)
