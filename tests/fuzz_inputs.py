"""Inputs for the fuzzed sweep (tests/test_fuzz.py): seeded mutations, small datasets to put them in, and the
checks every refused input must pass. Kept apart so the sweep itself reads as a list of cases."""

from __future__ import annotations

import io
import logging
import re
import shutil
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from tests.conftest import run_cli

FAST = ["--set", "tiling.tile_size=64", "--set", "tiling.stride=64", "--timesteps", "50", "--blocks", "up1",
        "--quiet"]
SIZE = (48, 64)  # (height, width): one 64 px tile per image


# ---- mutations --------------------------------------------------------------------------------------


def truncations(data: bytes, rng: np.random.Generator, count: int) -> list[tuple[str, bytes]]:
    """`count` distinct cut points (the empty file among them), earliest first."""
    points = {0}
    while len(points) < min(count, len(data)):
        points.add(int(rng.integers(1, len(data))))
    return [(f"cut@{p}", data[:p]) for p in sorted(points)]


def bit_flips(data: bytes, rng: np.random.Generator, count: int, start: int = 0, stop: int | None = None
              ) -> list[tuple[str, bytes]]:
    """`count` single-bit flips at distinct positions in data[start:stop]."""
    stop = len(data) if stop is None else min(stop, len(data))
    chosen: dict[int, int] = {}
    while len(chosen) < min(count, stop - start):
        chosen.setdefault(int(rng.integers(start, stop)), int(rng.integers(8)))
    flipped = []
    for position, bit in sorted(chosen.items()):
        copy = bytearray(data)
        copy[position] ^= 1 << bit
        flipped.append((f"flip@{position}.{bit}", bytes(copy)))
    return flipped


def image_mutations(data: bytes, rng: np.random.Generator) -> list[tuple[str, bytes]]:
    """8 truncations and 12 flips, 8 of them in the first 256 bytes, where headers and tables are (a flip in raw
    pixels is still a valid image, so most of those would only show that valid images are accepted)."""
    return truncations(data, rng, 8) + bit_flips(data, rng, 8, 0, 256) + bit_flips(data, rng, 4, 256)


# ---- images --------------------------------------------------------------------------------------------


def tissue_like(seed: int = 0) -> np.ndarray:
    """A smooth gradient with noise: compresses like a photograph, so JPEG and PNG have real entropy-coded data."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[: SIZE[0], : SIZE[1]]
    base = np.stack([120 + 60 * np.sin(x / 9), 90 + 50 * np.cos(y / 7), 160 + 0.5 * x], axis=-1)
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def encoded(array: np.ndarray, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt, **options)
    return buffer.getvalue()


IMAGE_FORMATS = {"png": ("PNG", {}), "bmp": ("BMP", {}), "jpg": ("JPEG", {"quality": 90}), "tif": ("TIFF", {})}


def decodes_as_before(path: Path, size: tuple[int, int] = SIZE) -> bool:
    """The independent oracle: Pillow decodes the whole file to RGB, at the original size."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # odd metadata is not invalidity; the decode says
            with Image.open(path) as image:
                image.load()
                return image.convert("RGB").size == (size[1], size[0])
    except Exception:  # the oracle only asks "valid or not"
        return False


def mask_array() -> np.ndarray:
    mask = np.zeros(SIZE, np.uint8)
    mask[10:30, 12:40] = 1
    return mask


def folder_dataset(root: Path, image_ext: str = "png") -> Path:
    """The user's own layout: images/a, images/b, masks a.png, b.png, classes.yaml (background, tumor)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.yaml").write_text("classes: [background, tumor]\n")
    fmt, options = IMAGE_FORMATS[image_ext]
    for stem, seed in (("a", 1), ("b", 2)):
        (root / "images" / f"{stem}.{image_ext}").write_bytes(encoded(tissue_like(seed), fmt, **options))
        (root / "masks" / f"{stem}.png").write_bytes(encoded(mask_array(), "PNG"))
    return root


# ---- outcomes -----------------------------------------------------------------------------------------


@dataclass
class Sweep:
    """Runs inputs through the command line and sorts what happened; every violation is kept for the report."""

    monkeypatch: object
    capsys: object
    outcomes: Counter = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    commands: int = 0

    def cli(self, *args: str) -> tuple[int, str, str]:
        """`pathseg ARGS` in-process, as the console script runs it: an exception that escapes is what a user would
        see as a traceback, and Python's warnings (which pytest would keep to itself) are printed lines too."""
        records: list[logging.LogRecord] = []
        handler = logging.Handler(logging.WARNING)
        handler.emit = records.append  # what logging's last-resort handler would print on a console
        root = logging.getLogger()
        with warnings.catch_warnings(record=True) as caught:
            warnings.resetwarnings()  # Python's own defaults, as a console script has them
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", category)
            root.addHandler(handler)
            try:
                code, out, err = run_cli(self.monkeypatch, self.capsys, *map(str, args))
            except Exception as error:  # recorded as the violation it is
                out, err = self.capsys.readouterr()
                code, err = -1, f"{err}Traceback (escaped the CLI): {type(error).__name__}: {error}"
            finally:
                root.removeHandler(handler)
        printed = "".join(f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}\n" for w in caught)
        printed += "".join(f"{r.name}: {r.getMessage()}\n" for r in records if _reaches_console(r))
        return code, out, printed + err

    def refused(self, case: str, culprit: str, *args: str, lines_on: str = "err", codes: tuple[int, ...] = (2,),
                nothing_done=None, outcome: bool = True) -> None:
        """The input must fail: an exit code in `codes`, no traceback, and on stderr one line naming `culprit`.

        `lines_on="verify"`: `cache verify` lists the problems it found on stdout (exit 1), one line each, one of
        them naming `culprit`, or refuses a store it cannot open on stderr (exit 2). `outcome=False`: another
        command on an input already counted.
        """
        code, out, err = self.cli(*args)
        if lines_on == "verify":
            lines_on = "out" if code == 1 else "err"
        lines = [line for line in (err if lines_on == "err" else out).splitlines() if line.strip()]
        problems = []
        if "Traceback" in out + err:
            problems.append("traceback")
        if code == 0:
            problems.append("accepted")
        elif code not in codes:
            problems.append(f"exit code {code}")
        if lines_on == "err" and len(lines) != 1:
            problems.append(f"{len(lines)} lines")
        if not any(culprit in line for line in lines):
            problems.append(f"{culprit!r} not named")
        if nothing_done is not None:
            try:
                nothing_done()
            except AssertionError as error:
                problems.append(f"marked done: {error}")
        if problems:
            self.violations.append(f"{case}: {', '.join(problems)}: {(err or out).strip()[-400:]}")
        self.outcomes["violation" if problems else "refused"] += outcome
        self.commands += 1

    def accepted(self, case: str, *args: str) -> tuple[str, str]:
        code, out, err = self.cli(*args)
        if code != 0 or "Traceback" in out + err:
            self.violations.append(f"{case}: valid input refused (exit {code}): {err.strip()[-400:]}")
        return out, err

    @property
    def total(self) -> int:
        return sum(self.outcomes.values())


def _reaches_console(record: logging.LogRecord) -> bool:
    """Whether a console script would print the record: some logger on its way up has a handler (diffusers has its
    own), or none has and logging's last-resort handler prints it. A NullHandler on the way counts as a handler."""
    logger = logging.getLogger(record.name)
    while logger is not None and logger.name != "root":
        if logger.handlers:
            return any(not isinstance(h, logging.NullHandler) and h.level <= record.levelno for h in logger.handlers)
        if not logger.propagate:
            return False
        logger = logger.parent
    return True


def no_store_marks(cache: Path, image_id: str | None = None) -> None:
    """Nothing flagged done for a refused input: no feature shard, and not the refused image."""
    from pathseg.store import FeatureStore, list_stores

    for path in list_stores(cache):
        store = FeatureStore.open(path)
        assert not store.feature_infos() or not any(
            not store.missing_shards(i.timestep, i.block) for i in store.feature_infos()
        ), "a feature array is complete"
        for index, entry in enumerate(store.images):
            assert not (entry.id == image_id and store.image_done()[index]), f"image {image_id} flagged written"


def copy_tree(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def culprit_name(path: Path) -> str:
    return re.sub(r"\s+", " ", path.name)


# ---- masks ----------------------------------------------------------------------------------------------


def _tiff(array: np.ndarray) -> bytes:
    import tifffile

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array)
    return buffer.getvalue()


def wrong_masks() -> list[tuple[str, str, bytes]]:
    """(case, file name in masks/, content) for mask b: each is wrong in dtype, channels, labels, size or kind."""
    mask = mask_array()
    seven, big, wide = mask.copy(), mask.astype(np.uint16), mask.astype(np.uint32)
    seven[0, 0], big[0, 0], wide[0, 0] = 7, 300, 70000
    negative = mask.astype(np.int8)
    negative[0, 0] = -1
    nan = mask.astype(np.float64)
    nan[0, 0] = np.nan
    colour = np.stack([mask * 255, mask * 0, mask * 0], axis=-1).astype(np.uint8)
    rgba = np.concatenate([colour, np.full((*SIZE, 1), 255, np.uint8)], axis=-1)
    return [
        ("float32 mask", "b.tif", _tiff(mask.astype(np.float32))),
        ("float64 mask with NaN", "b.tif", _tiff(nan)),
        ("complex mask", "b.tif", _tiff(mask.astype(np.complex64))),
        ("int8 mask with -1", "b.tif", _tiff(negative)),
        ("uint32 mask with 70000", "b.tif", _tiff(wide)),
        ("uint16 mask with 300", "b.png", encoded(big, "PNG")),
        ("unknown label 7", "b.png", encoded(seven, "PNG")),
        ("colour RGB mask", "b.png", encoded(colour, "PNG")),
        ("colour RGBA mask", "b.png", encoded(rgba, "PNG")),
        ("mask of another size", "b.png", encoded(mask[:40], "PNG")),
        ("empty mask file", "b.png", b""),
        ("text named .png", "b.png", b"classes: [background, tumor]\n"),
        ("JPEG mask", "b.jpg", encoded(np.stack([mask * 200] * 3, axis=-1), "JPEG")),
        ("planar 3-channel TIFF mask", "b.tif", _tiff(np.stack([mask, mask * 2, mask], axis=-1))),
    ]


MASK_FORMATS = {"png": ("PNG", {}), "tif": ("TIFF", {}), "bmp": ("BMP", {})}


# ---- Grade.csv ------------------------------------------------------------------------------------------


GRADE_HEADER = "name,patient ID, grade (GlaS), grade (Sirinukunwattana et al. 2015)\n"


def grade_rows(names: list[str]) -> str:
    return "".join(f"{name},{1 + k % 2}, benign, healthy\n" for k, name in enumerate(names))


def grade_variants(names: list[str]) -> list[tuple[str, bytes | None]]:
    """(case, content; None = a folder in its place) of Grade.csv variants that cannot give every patient."""
    rows = grade_rows(names)
    return [
        ("empty", b""),
        ("header only", GRADE_HEADER.encode()),
        ("no patient column", ("name,grade\n" + "".join(f"{n},benign\n" for n in names)).encode()),
        ("semicolons", (GRADE_HEADER + rows).replace(",", ";").encode()),
        ("latin-1 bytes", (GRADE_HEADER + rows).encode() + "train_9,\xe9\n".encode("latin-1")),
        ("NUL bytes", (GRADE_HEADER + rows).encode().replace(b"benign", b"ben\x00ign", 1)),
        ("random bytes", np.random.default_rng(3).integers(0, 256, 400, dtype=np.uint8).tobytes()),
        ("a field past csv's limit", (GRADE_HEADER + f"{names[0]},{'9' * 200_000}, benign, x\n").encode()),
        ("unbalanced quote", (GRADE_HEADER + f'{names[0]},"1, benign, healthy\n' + rows).encode()),
        ("empty patient", (GRADE_HEADER + rows.replace(f"{names[1]},2", f"{names[1]},", 1)).encode()),
        ("name only rows", (GRADE_HEADER + "".join(f"{n}\n" for n in names)).encode()),
        ("one image, two patients", (GRADE_HEADER + rows + f"{names[0]},7, benign, healthy\n").encode()),
        ("a train image missing", (GRADE_HEADER + grade_rows(names[1:])).encode()),
        ("a folder named Grade.csv", None),
    ]


# ---- YAML ------------------------------------------------------------------------------------------------


WRONG_SETTINGS: list[tuple[str, object]] = [
    ("cache_dir", [1, 2]), ("runs_dir", {"a": 1}), ("dataset", "glas"), ("dataset.name", ["glas"]),
    ("dataset.splits", "train"), ("dataset.synthetic.train", "four"), ("dataset.synthetic.height", 3.5),
    ("dataset.glas.val_fraction", "a fifth"), ("dataset.glas.val_fraction", 1.5), ("dataset.bcss.classes", ["tumor"]),
    ("dataset.folder.test_fraction", 0.9), ("tiling.tile_size", "big"), ("tiling.tile_size", 100),
    ("tiling.stride", -1), ("tiling.pad_mode", "mirror"), ("backbone.seed", "zero"),
    ("backbone.trust_checkpoint", "maybe"), ("backbone.trust_checkpoint", [True]), ("conditioning.mode", "text"),
    ("extract.timesteps", "fifty"), ("extract.timesteps", [1000]), ("extract.timesteps", []), ("extract.blocks", 5),
    ("extract.batch_size", 0), ("extract.compile", "sometimes"), ("extract.compression_level", 30),
    ("head.width", "wide"), ("head.mlp_hidden", [0]), ("train.epochs", 0), ("train.lr", "fast"),
    ("train.loss", "focal"), ("evaluate.blend", "max"), ("ablate.seeds", -2), ("ablate.sweep", ["head.width"]),
    ("pretrain.first_stage_crop", 30),
]

MALFORMED_YAML: list[tuple[str, bytes]] = [
    ("top level is a list", b"- tiling\n- extract\n"),
    ("top level is a number", b"42\n"),
    ("section is a number", b"tiling: 5\n"),
    ("tab indentation", b"tiling:\n\ttile_size: 64\n"),
    ("unclosed bracket", b"extract:\n  timesteps: [50, 150\n"),
    ("not UTF-8", "dataset:\n  name: gl\xe4s\n".encode("latin-1")),
    ("binary", bytes(range(256)) * 4),
    ("nested too deep", b"a: " + b"[" * 5000 + b"]" * 5000 + b"\n"),
    ("python object tag", b"dataset:\n  name: !!python/object/apply:os.system ['touch SENTINEL']\n"),
    ("python name tag", b"dataset:\n  name: !!python/name:os.system\n"),
    ("python new-object tag", b"extract: !!python/object/new:subprocess.Popen [['touch', 'SENTINEL']]\n"),
    ("unknown tag", b"tiling:\n  tile_size: !custom 64\n"),
]

WRONG_CLASSES: list[tuple[str, bytes]] = [
    ("classes is a number", b"classes: 5\n"),
    ("no classes", b"classes: []\n"),
    ("class name is a number", b"classes:\n  - {name: 3}\n"),
    ("value is a word", b"classes:\n  - {name: a, value: x}\n  - {name: b}\n"),
    ("colour of two numbers", b"classes:\n  - {name: a, color: [1, 2]}\n  - {name: b}\n"),
    ("negative ignore index", b"classes: [a, b]\nignore_index: -1\n"),
    ("mask format is a number", b"classes: [a, b]\nmask_format: 7\n"),
    ("unknown mask format", b"classes: [a, b]\nmask_format: ternary\n"),
    ("unknown key", b"classes: [a, b]\nlabels: [x]\n"),
    ("duplicate names", b"classes: [a, a]\n"),
    ("python tag", b"classes: !!python/object/apply:os.system ['touch SENTINEL']\n"),
    ("not UTF-8", "classes: [fond, tum\xe9r]\n".encode("latin-1")),
    ("top level is a string", b"background tumor\n"),
]

WRONG_LDM_SETTINGS: list[tuple[str, object]] = [
    ("unet_config.params.model_channels", "big"), ("unet_config.params.model_channels", -32),
    ("unet_config.params.channel_mult", 4), ("unet_config.params.channel_mult", []),
    ("unet_config.params.num_res_blocks", 0), ("unet_config.params.attention_resolutions", "8"),
    ("unet_config.params.num_heads", 0), ("unet_config.params.context_dim", None),
    ("linear_start", "a"), ("timesteps", 0), ("first_stage_config.params.embed_dim", [3]),
    ("first_stage_config.params.n_embed", "x"), ("first_stage_config.params.ddconfig", 5),
    ("first_stage_config.params.ddconfig.ch_mult", []), ("cond_stage_config.params.patch_embed_dim", -1),
]


def nested(dotted: str, value: object) -> dict:
    tree: dict = {}
    node = tree
    keys = dotted.split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value
    return tree


# ---- stores -----------------------------------------------------------------------------------------------


def attrs_mutations(attrs: dict) -> list[tuple[str, object]]:
    """(case, new attrs: a dict, or bytes for the whole zarr.json) of a store's root attrs, each one wrong."""
    import copy
    import json

    def changed(edit) -> dict:
        tree = copy.deepcopy(attrs)
        edit(tree)
        return tree

    def image(field_name, value):
        return lambda tree: tree["images"][0].__setitem__(field_name, value)

    feature = next(iter(attrs["features"]))
    text = json.dumps({"zarr_format": 3, "node_type": "group", "attributes": attrs}).encode()
    return [
        ("zarr.json cut short", text[: len(text) // 2]),
        ("zarr.json not UTF-8", text.replace(b'"tiles_per_shard"', b'"tiles_per_sh\xe4rd"')),
        ("attributes are a list", json.dumps({"zarr_format": 3, "node_type": "group", "attributes": [1]}).encode()),
        ("image id escapes", changed(image("id", "../../../escaped"))),
        ("image split escapes", changed(image("split", "../x"))),
        ("negative image height", changed(image("height", -1))),
        ("tile rows as text", changed(image("rows", "2"))),
        ("first tile shifted", changed(image("first_tile", 1))),
        ("tile size a word", changed(lambda t: t.__setitem__("tile_size", "big"))),
        ("no classes", changed(lambda t: t.__setitem__("class_names", []))),
        ("ignore index 300", changed(lambda t: t.__setitem__("ignore_index", 300))),
        ("no tiles per shard", changed(lambda t: t.__setitem__("tiles_per_shard", 0))),
        ("no image table", changed(lambda t: t.pop("images"))),
        ("duplicate image ids", changed(lambda t: t["images"][1].__setitem__("id", t["images"][0]["id"]))),
        ("feature block escapes", changed(lambda t: t["features"][feature].__setitem__("block", "../../x"))),
        ("feature of 0 channels", changed(lambda t: t["features"][feature].__setitem__("channels", 0))),
        ("unknown precision", changed(lambda t: t.__setitem__("compute_precision", "float8"))),
        ("identity edited", changed(lambda t: t["identity"].__setitem__("noise_seed", 99))),
    ]


# ---- checkpoints and safetensors -----------------------------------------------------------------------


def same_tensors(left: dict, right: dict) -> bool:
    import torch

    return left.keys() == right.keys() and all(
        isinstance(right[k], torch.Tensor) and left[k].dtype == right[k].dtype and torch.equal(left[k], right[k])
        for k in left)


def checkpoint_still_valid(path: Path, state: dict) -> bool:
    """The oracle for a damaged .ckpt: zipfile's CRC check passes and torch's tensors-only loader gives back
    exactly the original state_dict (a flip in a zip comment, an unused field or the epoch counter)."""
    import zipfile

    import torch

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                if archive.testzip() is not None:
                    return False
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        return isinstance(loaded, dict) and same_tensors(state, loaded.get("state_dict", {}))
    except Exception:  # the oracle only asks "valid or not"
        return False


def safetensors_still_valid(path: Path, original: Path) -> bool:
    from safetensors.torch import load_file

    try:
        return same_tensors(load_file(str(original)), load_file(str(path)))
    except Exception:  # the oracle only asks "valid or not"
        return False


def safetensors_header_end(data: bytes) -> int:
    return 8 + int.from_bytes(data[:8], "little")


def linked_copy(source: Path, target: Path) -> Path:
    """A copy of a directory whose files are hard links (cheap); replace a file before writing to it."""
    shutil.copytree(source, target, copy_function=lambda a, b: Path(b).hardlink_to(a))
    return target
