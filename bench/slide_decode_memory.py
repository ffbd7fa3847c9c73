"""Memory and time of decoding a slide's glands strip by strip: it must follow the slide's width, not its area.

Synthetic (background, gland, contour) probabilities of a slide full of touching elliptical glands are written
to a float16 Zarr, as predict's working store holds them. `predict/slide_glands.py` then decodes them into a
uint32 instance array. The peak of Python-traced memory (numpy, scipy and scikit-image allocate through it) is
measured for slides of one width and growing heights: strip decoding keeps it flat. Also the seconds per
megapixel and the number of glands found against the number drawn (glands cut by strips are joined).

    python bench/slide_decode_memory.py [--width 2048] [--heights 4096,8192,16384] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import zarr
from pathseg.predict.slide_glands import decode_slide
from scipy import ndimage

from pathseg.config import InstancesConfig


def write_probabilities(path: Path, height: int, width: int, seed: int = 0) -> tuple[zarr.Array, int]:
    """Probabilities written strip by strip (the generator itself stays small); returns them and the glands drawn."""
    rng = np.random.default_rng(seed)
    array = zarr.create_array(str(path), shape=(3, height, width), dtype="float16", chunks=(3, 256, 1024))
    drawn = 0
    for top in range(0, height, 512):
        rows = min(512, height - top)
        labels = np.zeros((rows, width), dtype=np.int32)
        for _ in range(width * rows // 12000):
            cy, cx = rng.integers(0, rows), rng.integers(0, width)
            ry, rx = rng.integers(25, 60), rng.integers(25, 60)
            y, x = np.ogrid[:rows, :width]
            inside = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1
            inside &= labels == 0
            if inside.sum() > 500:
                drawn += 1
                labels[inside] = drawn
        rim = (ndimage.grey_dilation(labels, size=5) != ndimage.grey_erosion(labels, size=5)) & (labels > 0)
        p = np.full((3, rows, width), 0.02, dtype=np.float32)
        p[0, labels == 0] = 0.96
        p[1, (labels > 0) & ~rim] = 0.96
        p[2, rim] = 0.96
        array[:, top : top + rows] = p.astype(np.float16)
    return array, drawn


def measure(height: int, width: int, folder: Path) -> dict:
    probabilities, drawn = write_probabilities(folder / f"p{height}.zarr", height, width)
    instances = zarr.create_array(str(folder / f"i{height}.zarr"), shape=(height, width), dtype="uint32",
                                  chunks=(256, 1024))
    tracemalloc.start()
    started = time.perf_counter()
    found = decode_slide(probabilities, ["background", "gland", "contour"], InstancesConfig(min_area=100), instances)
    seconds = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"height": height, "width": width, "megapixels": round(height * width / 1e6, 2),
            "seconds": round(seconds, 2), "seconds_per_megapixel": round(seconds / (height * width / 1e6), 3),
            "peak_traced_mib": round(peak / 2**20, 1), "glands_drawn": drawn, "glands_found": found}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--heights", default="4096,8192,16384")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(int(h), args.width, Path(tmp)) for h in args.heights.split(",")]
    result = {"machine": platform.processor() or platform.machine(), "runs": rows}
    for row in rows:
        print(row)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
