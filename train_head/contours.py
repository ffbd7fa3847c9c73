"""`head.target: contour`: a boundary class learnt beside the store's classes (DCAN / CUMedVision2).

The target of a tile is its stored labels (`tiles/labels`, still the only source of the other classes) with
every pixel of an instance that lies within `head.contour_width` px of that instance's boundary set to a new
last class, "contour". The band sits on the instance side: a gland's pixels next to the background or next to
another gland, so two touching glands are parted by two bands (2 x width px) and the band, folded back into the
gland class, never grows a gland past its annotated outline. The image border is not a boundary (a gland cut
by it is not outlined there).

The band is computed once per fit from the store's whole-image instance maps, padded and cut tile by tile like
the labels (`tiling.pad_mode`: mirrored where the labels are mirrored; where the labels hold the ignore index
the band never overrides it), and kept as packed bits: an eighth of the labels' bytes, unpacked per tile in
microseconds, so epochs cost what they cost before.

Width: 3 px by default, at tile resolution (GlaS at 0.62 um/px: about 2 um): glands touching in the annotation
come out 6 px apart once the band is removed, while a small gland (tens of px across) keeps most of its interior,
and the band stays a few pixels wide, below a feature cell (8 px for a 256 px tile's 32 x 32 maps) but within
what the head's upsampled logits resolve.

Loss: `train.loss` as for a semantic head (cross-entropy, + soft Dice with `ce+dice`) over all classes, contour
included, with no class weight: the Dice term averages classes present in the batch, so the thin band counts as
much as background and gland there, which is the weighting DCAN's per-class balance aims for.

Scoring stays on the store's classes: a predicted "contour" pixel is folded into the class the band covers in
the training labels (`fold_class`, "gland" on GlaS) before pixel metrics and connected components, so the
figures of a contour head compare with a semantic head's.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from pathseg.config import HeadConfig
from pathseg.errors import PathsegError
from pathseg.imaging.tiling import cut_tile, pad_to_grid
from pathseg.metrics.pixel import background_index_of
from pathseg.store import FeatureStore

CONTOUR = "contour"


def run_class_names(store: FeatureStore, head: HeadConfig) -> list[str]:
    """The classes the head predicts: the store's, plus "contour" last when the target asks for it."""
    return [*store.class_names, CONTOUR] if head.target == "contour" else list(store.class_names)


def check_target(head: HeadConfig, store: FeatureStore) -> None:
    """A contour target needs instance maps; refuse before any training rather than learn an empty class."""
    if head.target == "contour" and not store.has_instances:
        raise PathsegError(f"{store.path} has no instance maps, so head.target=contour has no boundaries to learn; "
                           "set head.target=semantic or extract a dataset with instances (GlaS, folder instances/)")


def contour_band(instances: np.ndarray, width: int) -> np.ndarray:
    """(H, W) bool: instance pixels within `width` px (Euclidean) of a pixel of another instance or background.

    A pixel with a 4-neighbour of a different id is on the boundary (distance 1); the band is every instance
    pixel whose distance to such a neighbour is at most `width`, so it is `width` px thick on each instance.
    """
    instances = np.asarray(instances)
    inside = instances > 0
    differs = np.zeros(instances.shape, dtype=bool)  # pixels (any id) with a 4-neighbour of another id
    vertical = instances[1:] != instances[:-1]
    horizontal = instances[:, 1:] != instances[:, :-1]
    differs[1:] |= vertical
    differs[:-1] |= vertical
    differs[:, 1:] |= horizontal
    differs[:, :-1] |= horizontal
    if not (differs & inside).any():
        return np.zeros(instances.shape, dtype=bool)
    # distance of every pixel to the nearest instance pixel on a boundary (0 on it): width - 1 inward is the band
    distance = ndimage.distance_transform_edt(~(differs & inside))
    return inside & (distance <= width - 1)


class TileContours:
    """The contour band of chosen tiles, packed to bits, and the class a predicted contour folds back into."""

    def __init__(self, tiles: np.ndarray, bits: np.ndarray, tile_size: int, n_store_tiles: int,
                 contour_class: int, fold_class: int, ignore_index: int | None) -> None:
        self.tile_size = tile_size
        self.bits = bits  # (n, ceil(T*T/8)) uint8
        self.row_of = np.full(n_store_tiles, -1, dtype=np.int64)
        self.row_of[np.asarray(tiles, dtype=np.int64)] = np.arange(len(tiles))
        self.contour_class = contour_class
        self.fold_class = fold_class
        self.ignore_index = ignore_index

    @property
    def nbytes(self) -> int:
        return int(self.bits.nbytes)

    def band(self, tile: int) -> np.ndarray:
        row = int(self.row_of[tile])
        if row < 0:
            raise ValueError(f"tile {tile} has no contour band: it was not among the tiles the band was built for")
        size = self.tile_size
        return np.unpackbits(self.bits[row], count=size * size).reshape(size, size).astype(bool)

    def mark(self, labels: np.ndarray, band: np.ndarray) -> None:
        """Set `band` pixels of one tile's labels (already rotated like `band`) to the contour class, in place;
        ignore-index pixels (padding that shows no tissue, unlabelled areas) stay ignored."""
        where = band if self.ignore_index is None else band & (labels != self.ignore_index)
        labels[where] = self.contour_class

    @classmethod
    def build(cls, store: FeatureStore, tiles: np.ndarray, width: int) -> TileContours:
        """Per image (its band once), then per tile (cut from the padded band as the labels were cut)."""
        tiles = np.unique(np.asarray(tiles, dtype=np.int64))
        size = store.tile_size
        pad_mode = store.attrs["identity"]["tiling"].get("pad_mode", "reflect")
        tile_image, origins = store.tile_images(), store.tile_origins()
        bits = np.zeros((len(tiles), -(-size * size // 8)), dtype=np.uint8)
        n_classes = len(store.class_names)
        covered = np.zeros(n_classes, dtype=np.int64)  # store labels under the band: which class a contour is
        images = tile_image[tiles]
        for index in np.unique(images).tolist():
            instances = store.image_instances(index)
            if instances is None:
                continue
            band = contour_band(instances, width)
            under = store.image_labels(index)[band]
            covered += np.bincount(under[under < n_classes], minlength=n_classes)[:n_classes]
            padded = pad_to_grid(band, store.image_grid(index), pad_mode)
            for row in np.flatnonzero(images == index).tolist():
                bits[row] = np.packbits(cut_tile(padded, tuple(origins[tiles[row]]), size))
        background = background_index_of(store.class_names)
        if covered.any():
            fold = int(np.argmax(covered))
        else:  # no band in these images: the first class that is not the background
            fold = next((c for c in range(n_classes) if c != background), 0)
        return cls(tiles, bits, size, store.n_tiles, n_classes, fold, store.ignore_index)


def contour_fold(record: dict) -> tuple[int, int] | None:
    """(contour class, class it folds into) of a run record, None for a semantic head."""
    if record.get("head", {}).get("target", "semantic") != "contour":
        return None
    return len(record["class_names"]) - 1, int(record["contour_fold_class"])


def fold_prediction(prediction: np.ndarray, fold: tuple[int, int] | None) -> np.ndarray:
    """Predicted classes on the store's classes: a contour pixel becomes the class its band covers."""
    if fold is None:
        return prediction
    contour, into = fold
    prediction[prediction == contour] = into
    return prediction
