"""The dataset section: which images, where, and each dataset's own options (split files, classes, folds).

Apart from `sections.py` so each module keeps to one job; `sections.DatasetConfig` is this one, re-exported.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from pathseg.config.section import Section


class SyntheticOptions(Section):
    """Sizes of the generated dataset; odd sizes on purpose, so padding and stitching are exercised."""

    train: int = Field(8, ge=1)
    val: int = Field(2, ge=0)
    test: int = Field(4, ge=0)
    height: int = Field(288, ge=32)
    width: int = Field(352, ge=32)
    seed: int = 0


class GlaSOptions(Section):
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0, description="share of train patients held out")
    split_seed: int = 0


BCSS_FIVE_CLASSES: dict[str, list[str]] = {
    "tumor": ["tumor", "angioinvasion", "dcis"],
    "stroma": ["stroma"],
    "inflammatory": ["lymphocytic_infiltrate", "plasma_cells", "other_immune_infiltrate"],
    "necrosis": ["necrosis_or_debris"],
    "other": [
        "glandular_secretions",
        "blood",
        "exclude",
        "metaplasia_NOS",
        "fat",
        "mucoid_material",
        "normal_acinus_or_duct",
        "lymphatics",
        "undetermined",
        "nerve",
        "skin_adnexa",
        "blood_vessel",
        "other",
    ],
}


def _institution_codes(value: list[str]) -> list[str]:
    codes = [code.strip().upper() for code in value]
    bad = [code for code in codes if len(code) != 2 or not code.isalnum()]
    if bad:
        raise ValueError(f"{bad} are not TCGA tissue source site codes (two letters/digits, as in TCGA-XX-...)")
    return list(dict.fromkeys(codes))


class BCSSOptions(Section):
    """The grouping is a table, not code: works disagree on where `exclude` and `undetermined` belong."""

    mpp: float = Field(0.5, gt=0, description="microns per pixel the ROIs are resampled to")
    native_mpp: float = Field(0.25, gt=0, description="source resolution when a file name has no _MPP-x tag")
    resample: Literal["area", "bicubic", "lanczos"] = "area"
    classes: dict[str, list[str]] = Field(
        default_factory=lambda: copy.deepcopy(BCSS_FIVE_CLASSES),
        description="output class -> gtruth_codes.tsv labels, in class-index order",
    )
    ignore: list[str] = Field(
        ["outside_roi"], validate_default=True, description="labels that become the ignore index (don't care)"
    )
    test_institutions: list[str] = ["OL", "LL", "E2", "EW", "GM", "S3"]
    val_institutions: list[str] = Field(["BH", "C8", "A8", "A1", "E9"], validate_default=True)

    @field_validator("classes")
    @classmethod
    def _groups_valid(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        if not value:
            raise ValueError("at least one class is needed")
        if len(value) > 255:
            raise ValueError(f"{len(value)} classes do not fit a uint8 label map with 255 as ignore index")
        seen: dict[str, str] = {}
        for name, labels in value.items():
            if not labels:
                raise ValueError(f"class {name!r} lists no labels")
            for label in labels:
                if label in seen and seen[label] != name:
                    raise ValueError(f"label {label!r} is in both class {seen[label]!r} and class {name!r}")
                seen[label] = name
        return value

    @field_validator("ignore")
    @classmethod
    def _ignore_apart(cls, value: list[str], info: Any) -> list[str]:
        grouped = {label for labels in info.data.get("classes", {}).values() for label in labels}
        both = sorted(grouped & set(value))
        if both:
            raise ValueError(f"labels {both} are both in a class and in ignore; keep each in one place")
        return value

    @field_validator("test_institutions")
    @classmethod
    def _codes_valid(cls, value: list[str]) -> list[str]:
        return _institution_codes(value)

    @field_validator("val_institutions")
    @classmethod
    def _val_apart(cls, value: list[str], info: Any) -> list[str]:
        codes = _institution_codes(value)
        shared = sorted(set(codes) & set(info.data.get("test_institutions", [])))
        if shared:
            raise ValueError(f"institutions {shared} are in both val_institutions and test_institutions")
        return codes


class FolderOptions(Section):
    """Paths are relative to dataset.root unless absolute; without a splits file the split is seeded."""

    mpp: float | None = Field(None, gt=0, description="microns per pixel of the images, for predict on slides")
    classes_file: Path = Path("classes.yaml")
    splits_file: Path = Path("splits.csv")
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0, description="share of images held out for validation")
    test_fraction: float = Field(
        0.2, ge=0.0, lt=1.0, validate_default=True, description="share of images held out for test"
    )
    split_seed: int = 0

    @field_validator("test_fraction")
    @classmethod
    def _fractions_leave_train(cls, value: float, info: Any) -> float:
        if value + info.data.get("val_fraction", 0.0) >= 1.0:
            raise ValueError("val_fraction + test_fraction must stay below 1 so some images train")
        return value


class DatasetConfig(Section):
    name: str = "synthetic"
    root: Path | None = None
    splits: list[str] | None = None
    synthetic: SyntheticOptions = SyntheticOptions()
    glas: GlaSOptions = GlaSOptions()
    bcss: BCSSOptions = BCSSOptions()
    folder: FolderOptions = FolderOptions()
