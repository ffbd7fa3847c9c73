"""Optional per-image instance maps of a folder dataset: `ROOT/instances/<stem>.png|tif|tiff`.

One integer map per image: 0 where there is no object, one positive id per object (ids need not be
consecutive). They give a folder dataset what GlaS's annotations give it: the store keeps them, so the
contour head target and evaluate's object metrics work on the user's own data.

The files are read as data, never as pictures: PNG through Pillow without any mode conversion (a 16-bit PNG
stays 16-bit), TIFF through tifffile so a uint32 map keeps ids above 2**31 (Pillow reads those as int32 and
wraps them negative). Size and channel count are checked from headers when listing, so a wrong file fails
before a long extraction; values are checked when a map is decoded.

Ids are not checked against the mask's classes: an object may cover pixels the mask calls background or
ignore. The mask stays the only source of classes; the map only says which pixels form one object, as
annotators draw it (an outline a few pixels looser than the class mask is common). The contour band never
overrides ignored labels (train_head/contours.py), and object metrics score the objects as written.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pathseg.datasets.base import open_image
from pathseg.errors import PathsegError

INSTANCES_DIR = "instances"
INSTANCE_EXTENSIONS = (".png", ".tif", ".tiff")
TIFF_EXTENSIONS = (".tif", ".tiff")
INT32_MAX = np.iinfo(np.int32).max
SAVE_AS = "save one integer id per pixel (0 = no object) as a 16-bit PNG or an integer TIFF"


def list_instances(root: Path, stems: list[str]) -> dict[str, Path] | None:
    """stem -> instance map, or None without an instances/ folder; a folder must cover every image, exactly.

    Partial coverage is refused rather than stored: a store whose images have instance maps only sometimes
    would train the contour head on "no objects here" wherever a map is missing.
    """
    directory = root / INSTANCES_DIR
    if not directory.is_dir():
        return None
    found: dict[str, Path] = {}
    for path in sorted(directory.iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        suffix = path.suffix.lower()
        if suffix in (".jpg", ".jpeg", ".bmp"):
            raise PathsegError(f"{path}: instance maps must be PNG or TIFF (JPEG is lossy, BMP 8-bit); {SAVE_AS}")
        if suffix not in INSTANCE_EXTENSIONS:
            continue
        if path.stem in found:
            raise PathsegError(f"{path} and {found[path.stem]}: two instance maps with stem {path.stem!r}; keep one")
        found[path.stem] = path
    known = set(stems)
    if strays := sorted(set(found) - known):
        raise PathsegError(f"{found[strays[0]]}: no image named {strays[0]}.* in {root / 'images'}; "
                           "add the image or remove the instance map")
    if missing := [stem for stem in stems if stem not in found]:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise PathsegError(f"{directory}: no instance map for {len(missing)} of {len(stems)} images ({shown}); "
                           f"add <stem>.png/.tif for each, or remove {INSTANCES_DIR}/ to extract without instances")
    return {stem: found[stem] for stem in stems}


def _tiff(path: Path):
    import tifffile

    try:
        return tifffile.TiffFile(path)
    except Exception as error:  # a malformed file makes tifffile raise many types; the file is at fault
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        raise PathsegError(f"{path}: cannot read this instance map ({reason}); replace or remove the file") from None


def _colour(path: Path, channels: int) -> PathsegError:
    return PathsegError(f"{path}: instance map has {channels} channels (colour); {SAVE_AS}")


def check_instance_header(path: Path, height: int, width: int, image: Path) -> None:
    """From the header alone: one channel, and the image's size pixel for pixel."""
    if path.suffix.lower() in TIFF_EXTENSIONS:
        with _tiff(path) as tif:
            page = tif.pages[0]
            found, channels = (page.imagelength, page.imagewidth), page.samplesperpixel
    else:
        with open_image(path, "instance map", header_only=True) as picture:
            found, channels = (picture.size[1], picture.size[0]), len(picture.getbands())
    if channels > 1:
        raise _colour(path, channels)
    if found != (height, width):
        raise PathsegError(f"{path}: instance map is {found[1]}x{found[0]} but image {image.name} is "
                           f"{width}x{height}; instance maps must match their image pixel for pixel")


def read_instances(path: Path) -> np.ndarray:
    """(H, W) int32 ids, as written; ids past int32 (uint32 TIFF) are renumbered 1..n, objects unchanged."""
    if path.suffix.lower() in TIFF_EXTENSIONS:
        with _tiff(path) as tif:
            try:
                raw = tif.pages[0].asarray()
            except Exception as error:  # see _tiff
                reason = (str(error).splitlines() or [type(error).__name__])[0]
                raise PathsegError(f"{path}: cannot decode this instance map ({reason}); replace it") from None
    else:
        with open_image(path, "instance map") as picture:
            raw = np.asarray(picture)
    if raw.ndim != 2:
        raise _colour(path, raw.shape[-1] if raw.ndim == 3 else raw.ndim)
    if raw.dtype == bool:
        raw = raw.astype(np.uint8)
    if raw.dtype.kind not in "ui":
        raise PathsegError(f"{path}: instance map holds {raw.dtype} values; {SAVE_AS}")
    if raw.size and raw.dtype.kind == "i" and int(raw.min()) < 0:
        bad = np.unique(raw[raw < 0])[:5].tolist()
        raise PathsegError(f"{path}: instance map holds negative ids {bad}; ids are 0 (no object) or positive")
    if raw.size and int(raw.max()) > INT32_MAX:
        # The store keeps int32 ids; renumbering keeps every object and the background as they are.
        ids, inverse = np.unique(raw, return_inverse=True)
        offset = 0 if ids[0] == 0 else 1
        return (inverse.reshape(raw.shape) + offset).astype(np.int32)
    return raw.astype(np.int32)
