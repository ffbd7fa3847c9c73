"""What every dataset gives the pipeline: image records with lazy loaders, classes, and an identity."""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pathseg.errors import PathsegError

# Pillow logs what it meets in a malformed file (e.g. TIFF "More samples per pixel than can be decoded"), which
# logging's last-resort handler prints next to pathseg's own one-line error; the error says it already. Handlers
# a user configures still receive these records.
logging.getLogger("PIL").addHandler(logging.NullHandler())


@dataclass(frozen=True)
class ImageRecord:
    """One annotated image. Pixels load on demand so a dataset of any size can be listed cheaply."""

    id: str
    split: str
    height: int
    width: int
    load_rgb: Callable[[], np.ndarray] = field(repr=False, compare=False)
    load_labels: Callable[[], np.ndarray] = field(repr=False, compare=False)
    load_instances: Callable[[], np.ndarray] | None = field(default=None, repr=False, compare=False)
    group: str | None = None


class SegmentationDataset(ABC):
    name: str
    class_names: list[str]
    ignore_index: int | None = None
    splits: tuple[str, ...]

    @abstractmethod
    def records(self) -> list[ImageRecord]:
        """All images of the selected splits, in a stable order (the order tiles are stored in)."""

    @abstractmethod
    def identity(self) -> dict:
        """What makes two copies of this data the same data: recorded in, and fingerprinting, the store."""

    @property
    def has_instances(self) -> bool:
        return False

    def select(self, records: list[ImageRecord], wanted: list[str] | None) -> list[ImageRecord]:
        if wanted is None:
            return records
        unknown = sorted(set(wanted) - set(self.splits))
        if unknown:
            raise PathsegError(f"dataset {self.name!r} has no split(s) {unknown}; its splits are {list(self.splits)}")
        return [record for record in records if record.split in wanted]


def require_root(root: Path | None, dataset: str) -> Path:
    """Datasets read from disk need dataset.root; say how to give it."""
    if root is None:
        raise PathsegError(f"dataset {dataset!r} needs its folder: pass --data-root PATH (or set dataset.root)")
    return root


def require_pairs(images: dict[str, Path], masks: dict[str, Path], image_dir: Path, mask_dir: Path,
                  image_names: str = ".*", mask_names: str = ".png") -> None:
    """Every image has its mask and every mask its image (matched by stem); the first stray fails, named."""
    if orphan_masks := sorted(set(masks) - set(images)):
        stem = orphan_masks[0]
        raise PathsegError(
            f"{masks[stem]}: no image named {stem}{image_names} in {image_dir}; add the image or remove the mask"
        )
    if orphan_images := sorted(set(images) - set(masks)):
        stem = orphan_images[0]
        raise PathsegError(
            f"{images[stem]}: no mask named {stem}{mask_names} in {mask_dir}; add its mask or remove the image"
        )


def digest_files(paths: list[Path], root: Path) -> str:
    """Names and sizes, not contents: cheap on a multi-GB dataset, and a swapped file still shows."""
    listing = [(str(p.relative_to(root)), p.stat().st_size) for p in sorted(paths)]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def open_image(path: Path, what: str = "image", *, header_only: bool = False):
    """A PIL image, decoded (or only its header read), or one line naming the file.

    A malformed file makes Pillow raise almost any exception type (OSError, SyntaxError, ValueError,
    struct.error, IndexError, DecompressionBombError for a header whose size field was damaged...), so every
    exception raised while decoding is taken as the file's fault. Pillow's warnings (odd TIFF metadata, an
    image past its decompression-bomb warning size, as histology ROIs can be) are not printed: the file either
    decodes, or fails here in one line.
    """
    from PIL import Image

    image = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
            image = Image.open(path)
            if not header_only:
                image.load()
        return image
    except Image.DecompressionBombError as error:
        raise PathsegError(f"{path}: {error}; crop it or raise PIL.Image.MAX_IMAGE_PIXELS") from None
    except Exception as error:  # see the docstring: malformed files raise anything
        if image is not None:
            image.close()
        lines = [line for line in str(error).splitlines() if line.strip()]
        reason = lines[0] if lines else type(error).__name__
        raise PathsegError(f"{path}: cannot read this {what} ({reason}); replace or remove the file") from None


def read_rgb(path: Path) -> np.ndarray:
    with open_image(path) as image:
        return np.asarray(image.convert("RGB"))


def read_label_map(path: Path) -> np.ndarray:
    """A label map as integers: palette and grey images give their indices; an RGB map must be grey."""
    with open_image(path, "label map") as image:
        array = np.asarray(image)
    if array.ndim == 3:
        channels = array[..., :3]
        if not (
            np.array_equal(channels[..., 0], channels[..., 1]) and np.array_equal(channels[..., 0], channels[..., 2])
        ):
            raise PathsegError(f"{path}: label map is colour RGB; expected one label value per pixel")
        array = channels[..., 0]
    return array


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) from the header alone, without decoding pixels."""
    with open_image(path, header_only=True) as image:
        width, height = image.size
    return height, width
