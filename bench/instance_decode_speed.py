"""How long instance decoding takes for one GlaS-sized image, on one core, for both decoders.

Evaluate and predict decode every image (and predict every slide strip), so decoding must stay a small part of
the per-image cost: the target is under 0.2 s per 775 x 522 image for contour decoding. The probability map is
synthetic: ~20 elliptical glands, many touching, with a contour band inside each gland's rim, blurred and
renormalised like a head's softmax. torch-free on purpose (this measures numpy / scipy / scikit-image only).
With --glas DIR, the same probabilities are made from every GlaS annotation (*_anno.png) as well: the time per
real image, and the object F1 of both decoders against that annotation (a check of the decoding, not a model).

    python bench/instance_decode_speed.py [--repeats 15] [--glas DIR] [--json FILE]
"""

from __future__ import annotations

import os

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # one core, set before numpy loads
    os.environ.setdefault(_name, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from contextlib import nullcontext  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import skimage  # noqa: E402
from scipy import ndimage  # noqa: E402

from pathseg.config import InstancesConfig  # noqa: E402
from pathseg.metrics.instances import decode_contour_instances, decode_semantic_instances  # noqa: E402
from pathseg.metrics.objects import object_f1  # noqa: E402

HEIGHT, WIDTH = 522, 775  # GlaS images are 775 x 522 (width x height)


def synthetic_glands(n_glands: int = 20, seed: int = 0, band: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """(3, H, W) float32 probabilities (background, gland, contour) and the int32 truth instances they came from.

    Glands are ellipses on a jittered 5 x 4 grid, sized so neighbours overlap; a later gland takes the shared
    pixels, so pairs touch along a line, which is the case the contour decoder exists for.
    """
    rng = np.random.default_rng(seed)
    truth = np.zeros((HEIGHT, WIDTH), dtype=np.int32)
    yy, xx = np.mgrid[:HEIGHT, :WIDTH]
    rows, cols = 4, 5
    for k in range(n_glands):
        cy = (k // cols + 0.5) * HEIGHT / rows + rng.uniform(-10, 10)
        cx = (k % cols + 0.5) * WIDTH / cols + rng.uniform(-10, 10)
        ry, rx = rng.uniform(55, 75), rng.uniform(70, 90)
        truth[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = k + 1
    return probabilities_from(truth, band, rng), truth


def probabilities_from(truth: np.ndarray, band: int, rng: np.random.Generator) -> np.ndarray:
    """What a good contour head would output for these glands: a ``band``-px contour rim inside each, blurred
    (sigma 1.5 px) and with a little noise, renormalised to sum to 1."""
    gland = truth > 0
    eroded = np.zeros_like(gland)
    for label, box in enumerate(ndimage.find_objects(truth), start=1):
        if box is not None:  # the box grown by the band, so a gland's rim runs along its box's edges too
            grown = tuple(slice(max(side.start - band, 0), side.stop + band) for side in box)
            eroded[grown] |= ndimage.binary_erosion(truth[grown] == label, iterations=band, border_value=1)
    onehot = np.stack([~gland, eroded, gland & ~eroded]).astype(np.float32)
    soft = np.stack([ndimage.gaussian_filter(channel, 1.5) for channel in onehot])
    soft += rng.uniform(0, 0.05, soft.shape).astype(np.float32)
    return soft / soft.sum(axis=0, keepdims=True)


def glas_check(folder: Path, settings: InstancesConfig) -> dict[str, object]:
    """Decode probabilities made from each GlaS annotation; median seconds and mean object F1 per decoder."""
    from PIL import Image

    seconds: dict[str, list[float]] = {"contour": [], "semantic": []}
    f1: dict[str, list[float]] = {"contour": [], "semantic": []}
    files = sorted(folder.glob("*_anno.png")) + sorted(folder.glob("*_anno.bmp"))
    rng = np.random.default_rng(0)
    for path in files:
        truth = np.asarray(Image.open(path)).astype(np.int32)
        probabilities = probabilities_from(truth, 3, rng)
        for name, decode in decoders(probabilities, settings).items():
            start = time.perf_counter()
            decoded = decode()
            seconds[name].append(time.perf_counter() - start)
            f1[name].append(object_f1(truth, decoded)["f1"])
    return {"images": len(files), **{name: {"median_s": statistics.median(seconds[name]),
                                            "max_s": max(seconds[name]),
                                            "mean_object_f1": statistics.fmean(f1[name])} for name in seconds}}


def decoders(probabilities: np.ndarray, settings: InstancesConfig) -> dict[str, Callable[[], np.ndarray]]:
    return {"contour": lambda: decode_contour_instances(probabilities, 1, 2, settings),
            "semantic": lambda: decode_semantic_instances(probabilities, 1, settings, contour_index=2)}


def median_seconds(function, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--glas", type=Path, default=None, help="a GlaS folder: also decode its annotations")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    args = parser.parse_args()
    try:
        from threadpoolctl import threadpool_limits
        limits = threadpool_limits(1)
    except ImportError:
        limits = nullcontext()
    probabilities, truth = synthetic_glands()
    settings = InstancesConfig()
    results: dict[str, object] = {
        "shape": list(probabilities.shape), "truth_glands": int(truth.max()), "repeats": args.repeats,
        "machine": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "load_average_before": os.getloadavg()[0], "numpy": np.__version__,
        "scikit_image": skimage.__version__, "settings": settings.model_dump(),
    }
    with limits:
        for name, decode in decoders(probabilities, settings).items():
            objects = int(decode().max())  # warm-up, and the object count
            median, times = median_seconds(decode, args.repeats)
            results[name] = {"median_s": median, "min_s": min(times), "max_s": max(times), "objects": objects}
            print(f"{name:8s} median {median * 1000:7.1f} ms  (min {min(times) * 1000:.1f}, max "
                  f"{max(times) * 1000:.1f}) over {args.repeats} runs; {objects} objects of {truth.max()}")
        if args.glas:
            results["glas"] = glas_check(args.glas, settings)
            print(f"GlaS annotations: {results['glas']}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
