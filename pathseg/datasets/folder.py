"""The user's own annotated images: a folder of images, a folder of masks with the same stems, a classes file.

    ROOT/images/<stem>.png|tif|tiff|jpg|jpeg|bmp
    ROOT/masks/<stem>.png|tif|tiff|bmp          label indices, or colours mapped through classes.yaml
    ROOT/classes.yaml                           class names, optional colours, ignore value, mask format
    ROOT/splits.csv                             optional `stem,split` rows; else a seeded split
    ROOT/instances/<stem>.png|tif|tiff          optional integer instance maps, one per image (folder_instances)

Everything that can be checked from names and headers is checked when listing, so a broken pair fails
before a long extraction starts; label values are checked when a mask is decoded.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pathseg.config import DatasetConfig, FolderOptions
from pathseg.datasets.base import (
    ImageRecord,
    SegmentationDataset,
    digest_files,
    image_size,
    open_image,
    read_rgb,
    require_pairs,
    require_root,
)
from pathseg.datasets.folder_instances import check_instance_header, list_instances, read_instances
from pathseg.errors import PathsegError
from pathseg.loading.data_files import escapes_folder, read_csv_rows, read_yaml

IMAGE_EXTENSIONS = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
MASK_EXTENSIONS = (".png", ".tif", ".tiff", ".bmp")
IGNORE_INDEX = 255
SPLIT_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
DEFAULT_SPLITS = ("train", "val", "test")

Colour = tuple[int, int, int]


def parse_colour(value: object) -> Colour | None:
    """`[r, g, b]` or `"#rrggbb"`: what people copy from an annotation tool's legend."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().lstrip("#")
        if not re.fullmatch(r"[0-9a-fA-F]{6}", text):
            raise ValueError(f"colour {value!r} is not #rrggbb")
        return int(text[0:2], 16), int(text[2:4], 16), int(text[4:6], 16)
    if isinstance(value, list | tuple) and len(value) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in value):
        return int(value[0]), int(value[1]), int(value[2])
    raise ValueError(f"colour {value!r} is neither [r, g, b] with 0..255 values nor #rrggbb")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ClassEntry(_Strict):
    name: str = Field(min_length=1)
    color: Colour | None = None
    value: int | None = Field(None, ge=0, le=65535, description="mask value of this class (default: its position)")

    @field_validator("color", mode="before")
    @classmethod
    def _colour(cls, value: object) -> Colour | None:
        return parse_colour(value)


class ClassesFile(_Strict):
    classes: list[ClassEntry | str] = Field(min_length=1)
    mask_format: Literal["index", "color"] = "index"
    ignore_index: int | None = Field(None, ge=0, le=65535, description="mask value meaning 'not annotated'")
    ignore_color: Colour | None = None

    @field_validator("mask_format", mode="before")
    @classmethod
    def _spelling(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        return {"colour": "color", "rgb": "color", "label": "index", "indices": "index"}.get(value.lower(), value)

    @field_validator("ignore_color", mode="before")
    @classmethod
    def _colour(cls, value: object) -> Colour | None:
        return parse_colour(value)


@dataclass(frozen=True)
class ClassTable:
    """What a classes file says, checked: output class k is names[k]; masks store values[k] or colors[k]."""

    path: Path
    names: list[str]
    colors: list[Colour] | None
    values: list[int]
    mask_format: str
    ignore_value: int | None
    ignore_color: Colour | None

    @property
    def has_ignore(self) -> bool:
        return self.ignore_value is not None or self.ignore_color is not None


def read_classes(path: Path) -> ClassTable:
    if not path.is_file():
        raise PathsegError(
            f"{path} does not exist; write it with the class names (README, 'Your own annotated images') "
            "or point dataset.folder.classes_file at yours"
        )
    raw = read_yaml(path, "fix it as README's 'Your own annotated images' shows")
    if isinstance(raw, list):
        raw = {"classes": raw}
    try:
        parsed = ClassesFile.model_validate(raw)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "top level"
        message = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
        raise PathsegError(f"{path}: {where}: {message}") from None
    entries = [ClassEntry(name=e) if isinstance(e, str) else e for e in parsed.classes]
    names = [e.name for e in entries]
    # Unnumbered classes count up from 0, stepping over the ignore value: `ignore_index: 0` with
    # `classes: [a, b]` reads the common "0 = unlabelled, 1..K = classes" masks without any `value`.
    implicit = [v for v in range(len(entries) + 1) if v != parsed.ignore_index]
    values = [e.value if e.value is not None else implicit[k] for k, e in enumerate(entries)]
    colors = [e.color for e in entries]

    def duplicates(items: list) -> list:
        return sorted({str(item) for item in items if items.count(item) > 1})

    if len(names) > IGNORE_INDEX:
        raise PathsegError(f"{path}: {len(names)} classes; at most 255 fit a uint8 label map with 255 as ignore")
    for what, items in (("class names", names), ("class values", values)):
        if duplicates(items):
            raise PathsegError(f"{path}: {what} {duplicates(items)} appear more than once")
    if parsed.mask_format == "color":
        missing = [e.name for e in entries if e.color is None]
        if missing:
            raise PathsegError(f"{path}: mask_format is color but classes {missing} have no color")
        if duplicates(colors):
            raise PathsegError(f"{path}: colours {duplicates(colors)} are given to more than one class")
        if parsed.ignore_index is not None:
            raise PathsegError(f"{path}: colour masks mark 'not annotated' with ignore_color, not ignore_index")
        if parsed.ignore_color is not None and parsed.ignore_color in colors:
            raise PathsegError(f"{path}: ignore_color {list(parsed.ignore_color)} is also a class colour")
    else:
        if parsed.ignore_color is not None:
            raise PathsegError(f"{path}: index masks mark 'not annotated' with ignore_index, not ignore_color")
        if parsed.ignore_index is not None and parsed.ignore_index in values:
            raise PathsegError(
                f"{path}: ignore_index {parsed.ignore_index} is also the value of class "
                f"{names[values.index(parsed.ignore_index)]!r}; give that class another `value`"
            )
    return ClassTable(
        path=path,
        names=names,
        colors=None if any(c is None for c in colors) else [c for c in colors if c is not None],
        values=values,
        mask_format=parsed.mask_format,
        ignore_value=parsed.ignore_index,
        ignore_color=parsed.ignore_color,
    )


def _open_mask(path: Path):
    return open_image(path, "mask")


def _index_labels(path: Path, classes: ClassTable) -> np.ndarray:
    raw = np.asarray(_open_mask(path))
    if raw.ndim == 3:
        channels = raw[..., :3]
        if channels.shape[-1] == 3 and not (
            np.array_equal(channels[..., 0], channels[..., 1]) and np.array_equal(channels[..., 0], channels[..., 2])
        ):
            raise PathsegError(
                f"{path}: mask is colour RGB but {classes.path} says mask_format: index; set mask_format: color "
                "with a color per class, or save masks as one label value per pixel"
            )
        raw = channels[..., 0]
    if raw.dtype == bool:
        raw = raw.astype(np.uint8)
    if raw.dtype.kind not in "ui":
        raise PathsegError(f"{path}: mask holds {raw.dtype} values; label masks need integers")
    if raw.dtype not in (np.uint8, np.uint16):
        low, high = (int(raw.min()), int(raw.max())) if raw.size else (0, 0)
        if low < 0 or high > 65535:
            bad = np.unique(raw[(raw < 0) | (raw > 65535)])[:10].tolist()
            raise PathsegError(f"{path}: mask values {bad} are not in {classes.path}; fix the mask or the classes file")
        raw = raw.astype(np.int32)
    counts = np.bincount(raw.ravel(), minlength=max(classes.values) + 1)
    lookup = np.full(len(counts), -1, dtype=np.int16)
    for index, value in enumerate(classes.values):
        lookup[value] = index
    if classes.ignore_value is not None and classes.ignore_value < len(lookup):
        lookup[classes.ignore_value] = IGNORE_INDEX
    present = np.flatnonzero(counts)
    unknown = present[lookup[present] < 0]
    if unknown.size:
        known = f"values {classes.values}" + (
            f", ignore {classes.ignore_value}" if classes.ignore_value is not None else ""
        )
        raise PathsegError(
            f"{path}: mask values {unknown[:20].tolist()} are not in {classes.path} (it knows {known}); "
            "fix the mask or add those classes"
        )
    return lookup[raw].astype(np.uint8)


def _colour_labels(path: Path, classes: ClassTable) -> np.ndarray:
    rgb = np.asarray(_open_mask(path).convert("RGB"))
    keys = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    labels = np.full(keys.shape, IGNORE_INDEX, dtype=np.uint8)
    placed = np.zeros(keys.shape, dtype=bool)
    targets = [(index, colour) for index, colour in enumerate(classes.colors or [])]
    if classes.ignore_color is not None:
        targets.append((IGNORE_INDEX, classes.ignore_color))
    for index, (r, g, b) in targets:
        hit = keys == ((r << 16) | (g << 8) | b)
        labels[hit] = index
        placed |= hit
    if not placed.all():
        unknown = np.unique(keys[~placed])[:10]
        shown = ", ".join(f"#{int(k):06x}" for k in unknown)
        raise PathsegError(f"{path}: mask colours {shown} are not in {classes.path}; fix the mask or add those classes")
    return labels


def load_labels(path: Path, classes: ClassTable) -> np.ndarray:
    """(H, W) uint8: class k where the mask holds class k's value or colour, IGNORE_INDEX where not annotated."""
    return _colour_labels(path, classes) if classes.mask_format == "color" else _index_labels(path, classes)


def _list_files(directory: Path, extensions: tuple[str, ...], kind: str) -> dict[str, Path]:
    if not directory.is_dir():
        raise PathsegError(f"{directory} does not exist; a folder dataset needs images/ and masks/ under its root")
    found: dict[str, Path] = {}
    for path in sorted(directory.iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        suffix = path.suffix.lower()
        if kind == "mask" and suffix in (".jpg", ".jpeg"):
            raise PathsegError(f"{path}: JPEG masks are lossy and corrupt label values; save masks as PNG")
        if suffix not in extensions:
            continue
        if path.stem in found:
            raise PathsegError(f"{path} and {found[path.stem]}: two {kind}s with stem {path.stem!r}; keep one")
        found[path.stem] = path
    return found


def read_splits(path: Path, stems: list[str]) -> dict[str, str]:
    """stem -> split from `stem,split` rows (header optional); every image must be placed, once.

    A row names an image by its stem only: a folder part (`../x`, `sub/x`) is refused outright, so a splits
    file from elsewhere cannot point pathseg at files outside images/.
    """
    rows = [row for row in read_csv_rows(path, "write `stem,split` rows") if row and any(c.strip() for c in row)]
    known = set(stems)
    splits: dict[str, str] = {}
    for number, row in enumerate(rows, start=1):
        cells = [cell.strip() for cell in row]
        if number == 1 and cells[0].lower() in ("stem", "image", "name") and cells[0] not in known:
            continue
        if len(cells) < 2 or not cells[1]:
            raise PathsegError(f"{path}:{number}: expected `stem,split`, found {','.join(row)!r}")
        stem, split = cells[0], cells[1]
        if escapes_folder(stem):
            raise PathsegError(f"{path}:{number}: {stem!r} is a path, not an image stem; name images by their stem "
                               "(file name without extension) in images/")
        if stem not in known:
            raise PathsegError(f"{path}:{number}: no image with stem {stem!r} in images/; fix or drop the row")
        if stem in splits:
            raise PathsegError(f"{path}:{number}: image {stem!r} is listed twice")
        if not SPLIT_NAME.match(split):
            raise PathsegError(f"{path}:{number}: split name {split!r} should be letters, digits, _ or -")
        splits[stem] = split
    missing = [stem for stem in stems if stem not in splits]
    if missing:
        raise PathsegError(f"{path}: no row for images {missing[:10]}; add a `stem,split` row for each")
    return splits


def seeded_splits(stems: list[str], val_fraction: float, test_fraction: float, seed: int) -> dict[str, str]:
    """Exact counts from a seeded permutation of the sorted stems; at least one image always trains."""
    n = len(stems)
    n_test = min(round(test_fraction * n), max(n - 1, 0))
    n_val = min(round(val_fraction * n), max(n - 1 - n_test, 0))
    order = np.random.default_rng(seed).permutation(n)
    splits = {stem: "train" for stem in stems}
    for rank, index in enumerate(order):
        if rank < n_test:
            splits[stems[index]] = "test"
        elif rank < n_test + n_val:
            splits[stems[index]] = "val"
    return splits


class FolderDataset(SegmentationDataset):
    name = "folder"

    def __init__(self, root: Path, options: FolderOptions, wanted: list[str] | None = None) -> None:
        self.root = Path(root)
        self.options = options
        self.wanted = wanted
        if not self.root.is_dir():
            raise PathsegError(
                f"dataset folder {self.root} does not exist; pass --data-root with your images/ and masks/"
            )
        self.classes_path = self.root / options.classes_file
        self.classes = read_classes(self.classes_path)
        self.class_names = list(self.classes.names)
        self.class_colors = self.classes.colors
        self.ignore_index = IGNORE_INDEX if self.classes.has_ignore else None
        self.splits_path = self.root / options.splits_file
        if not self.splits_path.is_file() and options.splits_file != FolderOptions().splits_file:
            raise PathsegError(f"dataset.folder.splits_file {self.splits_path} does not exist; fix the path")
        self._pairs = self._pair_files()
        stems = list(self._pairs)
        self._instances = list_instances(self.root, stems)
        if self.splits_path.is_file():
            self._split = read_splits(self.splits_path, stems)
        else:
            self._split = seeded_splits(stems, options.val_fraction, options.test_fraction, options.split_seed)
        self.splits = tuple(dict.fromkeys([*DEFAULT_SPLITS, *self._split.values()]))

    @property
    def has_instances(self) -> bool:
        return self._instances is not None

    def _pair_files(self) -> dict[str, tuple[Path, Path]]:
        images = _list_files(self.root / "images", IMAGE_EXTENSIONS, "image")
        masks = _list_files(self.root / "masks", MASK_EXTENSIONS, "mask")
        require_pairs(images, masks, self.root / "images", self.root / "masks", ".*", ".png/.tif/.bmp")
        if not images:
            raise PathsegError(f"{self.root / 'images'}: no images ({', '.join(IMAGE_EXTENSIONS)}); check --data-root")
        return {stem: (images[stem], masks[stem]) for stem in sorted(images)}

    def records(self) -> list[ImageRecord]:
        records = []
        for stem, (image, mask) in self._pairs.items():
            height, width = image_size(image)
            mask_height, mask_width = image_size(mask)
            if (mask_height, mask_width) != (height, width):
                raise PathsegError(
                    f"{mask}: mask is {mask_width}x{mask_height} but image {image.name} is {width}x{height}; "
                    "masks must match their image pixel for pixel"
                )
            instances = self._instances[stem] if self._instances is not None else None
            if instances is not None:
                check_instance_header(instances, height, width, image)
            records.append(
                ImageRecord(
                    id=stem,
                    split=self._split[stem],
                    height=height,
                    width=width,
                    load_rgb=functools.partial(read_rgb, image),
                    load_labels=functools.partial(load_labels, mask, self.classes),
                    load_instances=functools.partial(read_instances, instances) if instances is not None else None,
                )
            )
        return self.select(records, self.wanted)

    def identity(self) -> dict:
        # Instance maps join the digest only when present, so a store made without them keeps its identity.
        files = [path for pair in self._pairs.values() for path in pair] + list((self._instances or {}).values())
        splits_digest = (
            hashlib.sha256(self.splits_path.read_bytes()).hexdigest() if self.splits_path.is_file() else None
        )
        return {
            "name": self.name,
            "classes_digest": hashlib.sha256(self.classes_path.read_bytes()).hexdigest(),
            "splits_file_digest": splits_digest,
            "options": self.options.model_dump(mode="json", exclude=METADATA_OPTIONS),
            "splits": self.wanted,
            "files_digest": digest_files(files, self.root),
        }


METADATA_OPTIONS = {"mpp"}  # describe the images without changing a pixel: not part of any store's identity


def build_folder(config: DatasetConfig) -> FolderDataset:
    return FolderDataset(require_root(config.root, "folder"), config.folder, config.splits)
