#!/usr/bin/env bash
# Fetch the wheels pathseg needs on the lent GPU machine into .whl/ (git-ignored), then check the set.
#
# Why: that machine has Python 3.12 with torch, torchvision, timm, scipy, scikit-image, tifffile, typer, rich,
# numpy, pillow, pyyaml, matplotlib, safetensors, huggingface-hub and many more, but not diffusers, zarr,
# numcodecs, dask, pydantic, rasterio, shapely, openslide or monai, and it reaches no package registry. So the
# missing distributions travel with the working tree as cp312 manylinux x86-64 wheels (the device call carries
# at most 64 MiB with the repo), and are installed there with --no-index (README, "The GPU suite").
#
# Versions are those of this project's own virtual environment (.venv), which pyproject.toml admits and the
# tests run against, except rasterio: 1.3.11 (pyproject admits >= 1.3) is a 21 MiB wheel, 1.4.4 a 34 MiB one,
# and only its `features.shapes` is used. Each wheel is fetched with --no-deps, so every dependency the machine lacks is listed here
# by name; the check at the end proves no requirement is left out.
#
#     bash bench/gpu_wheels.sh                     # fetch into .whl/ and check
#     bash bench/gpu_wheels.sh --check             # check what is already in .whl/
#     bash bench/gpu_wheels.sh --check --try PY312 # and install them with PY312's own pip, offline, and import
#
# --try takes a CPython 3.12 that has the GPU machine's other packages (numpy, scipy, scikit-image, pillow, pyyaml,
# typer, rich, tifffile, matplotlib, requests, filelock, regex, safetensors, huggingface-hub==1.33.0, click, attrs,
# certifi, pyparsing, fsspec, toolz, cloudpickle, packaging, zipp, setuptools): e.g. a venv of pyenv's 3.12 with
# those pip-installed. It installs the wheels, then pathseg from this tree, into a fresh --target with --no-index,
# as the README's run command does, and imports everything that needs no torch (and the rest if it has torch).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=.whl
PYTHON=${PYTHON:-python3}
FETCH=1
TRY=
while [[ $# -gt 0 ]]; do
    case "$1" in
        --check) FETCH= ;;
        --try) TRY=${2:?--try needs a Python 3.12}; shift ;;
        *) echo "gpu_wheels.sh: unknown argument $1 (use --check, --try PYTHON3.12)" >&2; exit 2 ;;
    esac
    shift
done

# Missing there, with the dependencies of each that the machine also lacks (ask `python3 -m pip show NAME` there).
PACKAGES=(
    diffusers==0.42.1 importlib_metadata==10.2.0 lazy-importer==0.1.0  # diffusers (zipp, hub, regex, ... are there)
    typing_extensions==4.16.0  # pydantic needs >= 4.16, newer than the machine's may be; newer ones only add names
    zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0
    dask==2026.8.0 partd==1.4.2 locket==1.0.0
    pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
    rasterio==1.3.11 affine==3.0.1 cligj==0.7.2 click-plugins==1.1.1.2 snuggs==1.4.7
    shapely==2.2.0
    openslide-python==1.4.7 openslide-bin==4.0.1.2
    monai==1.6.1
)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
           manylinux1_x86_64)

if [[ -n "$FETCH" ]]; then
    mkdir -p "$WHEELS"
    platform_args=()
    for p in "${PLATFORMS[@]}"; do platform_args+=(--platform "$p"); done
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platform_args[@]}" -d "$WHEELS" "${PACKAGES[@]}" 2> >(grep -v "is ignored: it is neither" >&2)
fi

# The check: one version of each distribution (two would stop the whole install there), no wheel beyond the list,
# every wheel installable on CPython 3.12 / manylinux x86-64, and every requirement (extras aside) of every
# wheel either carried (at an admitted version) or on the GPU machine (KINDS.md's list of its packages).
"$PYTHON" - "$WHEELS" "${PACKAGES[@]}" <<'PY'
import re
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.tags import Tag
    from packaging.utils import canonicalize_name, parse_wheel_filename
except ImportError:  # pip vendors it
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.tags import Tag
    from pip._vendor.packaging.utils import canonicalize_name, parse_wheel_filename

# What the GPU machine already has (its image's package list, 2026-11-17); versions where a session read them.
THERE = {
    "numpy": "2.5.2", "torch": "2.11.0", "safetensors": "0.8.0", "huggingface-hub": "1.33.0", "triton": "3.6.0",
    "torchvision": "0.26.0",
}
THERE_UNVERSIONED = """
attrs certifi charset-normalizer click cloudpickle filelock fsspec httpx idna jinja2 matplotlib packaging pillow
psutil pyparsing python-dateutil pyyaml regex requests rich scikit-image scipy setuptools six tifffile timm toolz
typer urllib3 zipp tqdm
""".split()
ENVIRONMENT = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
               "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
               "platform_machine": "x86_64", "os_name": "posix", "extra": ""}
# Interpreter tags CPython 3.12 accepts and platform tags a glibc >= 2.28 x86-64 machine accepts.
PYTHONS = {"cp312", "py3", "py312"}
ABI3_FROM = {f"cp3{minor}" for minor in range(2, 13)}  # a stable-ABI wheel built for CPython 3.x <= 3.12
PLATFORM = re.compile(r"^(any|manylinux1_x86_64|manylinux2010_x86_64|manylinux2014_x86_64|manylinux_2_(\d+)_x86_64)$")

folder, wanted = Path(sys.argv[1]), sys.argv[2:]
pinned = {canonicalize_name(w.split("==")[0]): w.split("==")[1] for w in wanted}
problems, carried, total = [], {}, 0
for wheel in sorted(folder.glob("*.whl")):
    name, version, _, tags = parse_wheel_filename(wheel.name)
    total += wheel.stat().st_size
    if name in carried:
        problems.append(f"two versions of {name}: {carried[name][0]} and {version}")
    carried[name] = (version, wheel)
    if pinned.get(name) is None:
        problems.append(f"{wheel.name} is not in the list")
    elif str(version) != pinned[name]:
        problems.append(f"{wheel.name}: version {version}, the list pins {pinned[name]}")

    def fits(tag: Tag) -> bool:
        match = PLATFORM.match(tag.platform)
        glibc_ok = match is not None and (match.group(2) is None or int(match.group(2)) <= 28)
        python_ok = (tag.interpreter in PYTHONS and tag.abi in ("cp312", "none")) or (
            tag.abi == "abi3" and tag.interpreter in ABI3_FROM)
        return python_ok and glibc_ok

    if not any(fits(tag) for tag in tags):
        problems.append(f"{wheel.name} does not install on CPython 3.12, manylinux x86-64")
for name in pinned:
    if name not in carried:
        problems.append(f"{name}=={pinned[name]} is listed but not in {folder}/")

checked = 0
for name, (version, wheel) in sorted(carried.items()):
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        message = Parser().parsestr(archive.read(metadata).decode())
    for line in message.get_all("Requires-Dist") or []:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate(ENVIRONMENT):
            continue  # an extra, or another Python or platform
        checked += 1
        needed = canonicalize_name(requirement.name)
        if needed in carried:
            if not requirement.specifier.contains(str(carried[needed][0]), prereleases=True):
                problems.append(f"{name} needs {requirement}; {carried[needed][0]} is carried")
        elif needed in THERE:
            if not requirement.specifier.contains(THERE[needed], prereleases=True):
                problems.append(f"{name} needs {requirement}; the GPU machine has {THERE[needed]}")
        elif needed not in THERE_UNVERSIONED:
            problems.append(f"{name} needs {requirement}: neither carried nor on the GPU machine")
        # a package there without a known version: its presence is all that can be checked from here

print(f"{len(carried)} wheels, {total / 2**20:.1f} MiB in {folder}/; {checked} requirements checked")
if problems:
    print("\n".join(f"problem: {p}" for p in problems))
    sys.exit(1)
print("complete: every requirement is carried or on the GPU machine")
PY

[[ -z "$TRY" ]] && exit 0
"$TRY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' || { echo "--try: $TRY is not CPython 3.12" >&2; exit 2; }
target=$(mktemp -d)
source=$(mktemp -d)  # the files a device call carries (tracked and untracked, not ignored): no build/ left here
trap 'rm -rf "$target" "$source"' EXIT
git ls-files -co --exclude-standard -z | tar -cf - --null -T - | tar -xf - -C "$source"
options=(-q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$target")
"$TRY" -m pip install "${options[@]}" "$WHEELS"/*.whl
"$TRY" -m pip install "${options[@]}" --no-build-isolation "$source"
PYTHONPATH="$target" "$TRY" -P - "$target" <<'PY'  # -P: this folder's pathseg/ must not shadow the installed one
import importlib
import sys
import tempfile
from pathlib import Path

import numpy as np

target = Path(sys.argv[1])
print(f"CPython {sys.version.split()[0]}, numpy {np.__version__}, into a fresh target with --no-index:")
try:
    import torch  # noqa: F401
    with_torch = True
except ImportError:
    with_torch = False
modules = ["zarr", "numcodecs", "dask.array", "pydantic", "rasterio.features", "shapely", "openslide", "diffusers",
           "pathseg.config", "pathseg.store", "pathseg.imaging.slides", "pathseg.datasets"]
if with_torch:
    modules += ["monai", "pathseg.extract.runner", "pathseg.train_head.fit", "pathseg.predict.command",
                "pathseg.pretrain.trainer", "pathseg.cli"]
for name in modules:
    module = importlib.import_module(name)
    assert Path(module.__file__).resolve().is_relative_to(target.resolve()) or name.split(".")[0] not in (
        "pathseg", "zarr", "diffusers"), f"{name} came from {module.__file__}, not the target"
print(f"  imported {len(modules)} modules: {', '.join(modules)}")
import openslide
import shapely.geometry
import tifffile
import zarr
from rasterio.features import shapes

labels = np.zeros((64, 64), np.uint8)
labels[10:30, 10:40] = 1
areas = [shapely.geometry.shape(g).area for g, _ in shapes(labels, mask=labels > 0)]
assert areas == [600.0], areas
with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / "slide.tif"
    rgb = np.random.default_rng(0).integers(0, 255, (1024, 1024, 3), dtype=np.uint8)
    with tifffile.TiffWriter(path) as tif:
        for level in range(2):
            per_cm = 1e4 / (0.5 * 2**level)
            tif.write(np.ascontiguousarray(rgb[:: 2**level, :: 2**level]), tile=(256, 256), photometric="rgb",
                      compression="zlib", subfiletype=int(level > 0), resolution=(per_cm, per_cm),
                      resolutionunit="CENTIMETER")
    slide = openslide.OpenSlide(str(path))
    assert slide.level_count == 2 and float(slide.properties["openslide.mpp-x"]) == 0.5
    array = zarr.create_array(store=str(Path(tmp) / "z.zarr"), shape=(4, 8, 8), chunks=(1, 8, 8), shards=(4, 8, 8),
                              dtype="float16", compressors=zarr.codecs.ZstdCodec(level=3))
    array[:] = 1.5
    assert float(array[:].sum()) == 384.0
print(f"  rasterio polygons + shapely, openslide {openslide.__library_version__} "
      "on a pyramidal TIFF, a sharded zstd zarr array: all work")
if not with_torch:
    print("  not checked: modules that need torch (this Python has none; the GPU machine brings its own)")
PY
