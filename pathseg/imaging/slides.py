"""Whole-slide images read at a chosen resolution, and where the tissue is: shared by predict and pretrain.

The reader is OpenSlide (openslide-python with the openslide-bin wheel: no system libraries). It reads
the formats pathology users have (Aperio SVS, Hamamatsu NDPI, 3DHISTECH MRXS, Leica SCN, Philips TIFF,
Ventana BIF, DICOM, generic tiled TIFF) where tiffslide covers SVS and TIFF only, and it is what most
pathology tools (QuPath's Bio-Formats aside) are checked against.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from pathseg.errors import PathsegError
from pathseg.progress import say

SLIDE_ONLY_SUFFIXES = {".svs", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu", ".dcm"}  # never plain images
THUMBNAIL_MPP = 8.0  # µm/px of the tissue-detection thumbnail (~1.25x objective)
MPP_TOLERANCE = 0.01  # a given mpp within 1% of the file's is the same resolution, rounded differently
# Side of the largest region read at once, in pixels of the level read (16 MiB of RGBA): a slide with one
# level (flat tiled TIFF, OME-TIFF) has no coarse level for its thumbnail, and reading level 0 whole would
# take its area in memory (32 GB for 100k x 80k px); larger reads are cut into blocks this size.
BLOCK_PX = 2048
_MARGIN = 3  # level rows/columns around a block that the resampling filters reach (bicubic: 2)
_told: set[tuple[str, float]] = set()  # (file, given mpp) already warned about in this process


def _openslide():
    try:
        import openslide
    except ImportError as error:  # openslide-bin missing: the library itself cannot load
        raise PathsegError(f"the slide reader cannot load ({error}); pip install openslide-python openslide-bin") \
            from None
    return openslide


class Slide:
    """One whole-slide image: its pyramid, its microns per pixel, and regions read at any resolution."""

    def __init__(self, path: Path, mpp: float | None = None, force_mpp: bool = False) -> None:
        """`mpp` is level 0's µm/px for a file that records none; a file's own value wins over it (a command
        can mix 40x slides that record theirs with 20x ones that do not) unless `force_mpp`."""
        openslide = _openslide()
        self.path = Path(path)
        if force_mpp and mpp is None:
            raise PathsegError(f"{self.path}: forcing the microns per pixel needs a value; give --mpp with --force-mpp")
        if not self.path.is_file():
            raise PathsegError(f"{self.path} does not exist")
        try:
            self._slide = openslide.OpenSlide(str(self.path))
        except (openslide.OpenSlideUnsupportedFormatError, openslide.OpenSlideError, OSError) as error:
            reason = str(error).splitlines()[0] if str(error) else "unsupported format"
            raise PathsegError(f"{self.path}: not a slide OpenSlide can read ({reason}); convert it to a pyramidal "
                               "TIFF, or give it as a plain image") from None
        self.recorded_mpp = self._recorded_mpp()
        self.mpp = mpp if force_mpp or self.recorded_mpp is None else self.recorded_mpp
        if mpp is not None and not force_mpp and self.recorded_mpp is not None:
            self._tell_disagreement(mpp)
        if self.mpp is None:
            raise PathsegError(f"{self.path}: the slide records no microns per pixel; pass --mpp with its level-0 "
                               "resolution (e.g. --mpp 0.25 for a 40x scan)")

    def _recorded_mpp(self) -> float | None:
        values = []
        for key in ("openslide.mpp-x", "openslide.mpp-y"):
            try:
                value = float(self._slide.properties.get(key, "nan"))
            except ValueError:
                value = math.nan
            if math.isfinite(value) and value > 0:
                values.append(value)
        return float(np.mean(values)) if values else None

    def _tell_disagreement(self, given: float) -> None:
        """One line, once per file and value in a process, when the given mpp is not the file's own."""
        recorded = self.recorded_mpp
        key = (str(self.path.resolve()), given)
        if abs(given - recorded) <= MPP_TOLERANCE * recorded or key in _told:
            return
        _told.add(key)
        say(f"{self.path}: the file records {recorded:.4g} µm/px at level 0, not the {given:.4g} given; reading it "
            f"at {recorded:.4g} (--force-mpp to use {given:.4g} anyway)")

    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) of level 0."""
        return tuple(self._slide.dimensions)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return tuple(self._slide.level_downsamples)

    def size_at(self, mpp: float) -> tuple[int, int]:
        """(width, height) of the whole slide at `mpp`."""
        scale = self.mpp / mpp
        width, height = self.dimensions
        return max(1, round(width * scale)), max(1, round(height * scale))

    def read(self, x: int, y: int, width: int, height: int, mpp: float) -> np.ndarray:
        """(height, width, 3) uint8 RGB at `mpp`, whose top-left corner is (x, y) in pixels at that `mpp`.

        Read from the finest level no coarser than asked, then area-resampled; outside the slide and
        transparent pixels are white, as an empty glass slide. A read larger than `BLOCK_PX` at that level
        (a thumbnail of a slide without coarse levels) is made block by block, each resampled on its share
        of the same grid, so memory follows a block while the pixels are those of one read.
        """
        factor = mpp / self.mpp  # level-0 px per output px
        level = self._slide.get_best_level_for_downsample(max(factor, 1.0))
        while level > 0 and self.level_downsamples[level] > factor + 1e-6:
            level -= 1
        downsample = self.level_downsamples[level]
        x0, y0 = round(x * factor), round(y * factor)
        read_w = max(1, math.ceil(width * factor / downsample))
        read_h = max(1, math.ceil(height * factor / downsample))
        resample = Image.Resampling.BOX if downsample < factor else Image.Resampling.BICUBIC
        if read_w <= BLOCK_PX and read_h <= BLOCK_PX:
            rgb = self._region(level, x0, y0, read_w, read_h)
            return np.asarray(rgb if rgb.size == (width, height) else rgb.resize((width, height), resample))
        scale_x, scale_y = read_w / width, read_h / height  # level px per output px, as one resize has them
        exact = (read_w, read_h) == (width, height)
        margin = 0 if exact else _MARGIN
        step_x = max(1, int((BLOCK_PX - 2 * margin) / scale_x))
        step_y = max(1, int((BLOCK_PX - 2 * margin) / scale_y))
        out = np.empty((height, width, 3), dtype=np.uint8)
        for top in range(0, height, step_y):
            bottom = min(height, top + step_y)
            r0 = max(0, math.floor(top * scale_y) - margin)
            r1 = min(read_h, math.ceil(bottom * scale_y) + margin)
            for left in range(0, width, step_x):
                right = min(width, left + step_x)
                c0 = max(0, math.floor(left * scale_x) - margin)
                c1 = min(read_w, math.ceil(right * scale_x) + margin)
                block = self._region(level, x0 + round(c0 * downsample), y0 + round(r0 * downsample), c1 - c0, r1 - r0)
                if not exact:
                    box = (left * scale_x - c0, top * scale_y - r0, right * scale_x - c0, bottom * scale_y - r0)
                    block = block.resize((right - left, bottom - top), resample, box=box)
                out[top:bottom, left:right] = np.asarray(block)
        return out

    def _region(self, level: int, x0: int, y0: int, width: int, height: int) -> Image.Image:
        """RGB of `level` at level-0 (x0, y0), `width` x `height` level pixels, transparency on white."""
        try:
            region = self._slide.read_region((x0, y0), level, (width, height))
        except Exception as error:  # noqa: BLE001 - a corrupt tile surfaces as one of several openslide errors
            raise PathsegError(f"{self.path}: cannot read level {level} at ({x0}, {y0}) "
                               f"({str(error).splitlines()[0]}); the file may be truncated or corrupt") from None
        white = Image.new("RGBA", region.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, region).convert("RGB")

    def thumbnail(self, mpp: float = THUMBNAIL_MPP) -> np.ndarray:
        """The whole slide at `mpp`, for finding tissue; read block by block when no level is coarse enough."""
        width, height = self.size_at(mpp)
        return self.read(0, 0, width, height, mpp)

    def close(self) -> None:
        self._slide.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """The threshold that best separates two classes of `values` (Otsu 1979), on a histogram."""
    histogram, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(histogram)
    weight_high = weight_low[-1] - weight_low
    mean_low = np.cumsum(histogram * centres) / np.maximum(weight_low, 1)
    total_mean = (histogram * centres).sum()
    mean_high = (total_mean - np.cumsum(histogram * centres)) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(centres[int(np.argmax(between))])


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation in [0, 1]: stained tissue is coloured, glass and background are grey or white."""
    rgb = rgb.astype(np.float32)
    high, low = rgb.max(axis=-1), rgb.min(axis=-1)
    return np.where(high > 0, (high - low) / np.maximum(high, 1e-6), 0.0)


def tissue_mask(rgb: np.ndarray, threshold: float | None = None, min_saturation: float = 0.05,
                smoothing_px: int = 2) -> np.ndarray:
    """Where the tissue is on a thumbnail: saturation above Otsu's threshold (or `threshold`), smoothed.

    A floor (`min_saturation`) keeps a blank slide blank (Otsu would split its noise in two); closing then
    opening joins tissue fragments and drops specks; holes inside tissue (lumen, fat) are kept as tissue so
    the head sees them, as it did in training.
    """
    sat = saturation(rgb)
    if threshold is None:
        threshold = max(otsu_threshold(sat), min_saturation) if sat.max() > min_saturation else 1.0
    mask = sat > threshold
    if smoothing_px > 0 and mask.any():
        structure = np.ones((2 * smoothing_px + 1,) * 2, dtype=bool)
        mask = ndimage.binary_opening(ndimage.binary_closing(mask, structure), structure)
        mask = ndimage.binary_fill_holes(mask)
    return mask
