"""Settings of how predictions are scored and become gland objects: `evaluate:` and `instances:`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from pathseg.config.section import Section


class EvaluateConfig(Section):
    splits: list[str] | None = None
    blend: Literal["mean", "gaussian"] = "gaussian"  # 4x fewer seams on GlaS than mean (bench/blend_seams.py)
    overlays: int = Field(4, ge=0)
    min_object_area: int = Field(0, ge=0)


class InstancesConfig(Section):
    """How a prediction becomes gland objects (pathseg/metrics/instances.py); pipeline.yaml says what each does."""

    decoding: Literal["auto", "contour", "semantic"] = "auto"
    marker_threshold: float = Field(0.5, ge=0.0, lt=1.0)
    marker_erosion: int = Field(2, ge=0)
    min_area: int = Field(100, ge=0)
    fill_holes: bool = True
    # evaluate chooses marker_threshold, min_area and the baseline's evaluate.min_object_area on val from these
    # grids (train_head/instance_choice.py), records the choice in the run, and decodes test and predict with it
    tune: bool = True
    marker_thresholds: list[float] = Field([0.3, 0.4, 0.5, 0.6, 0.7], min_length=1)
    min_areas: list[int] = Field([0, 100, 250, 500, 1000, 2000], min_length=1)

    @field_validator("marker_thresholds")
    @classmethod
    def _thresholds_in_range(cls, value: list[float]) -> list[float]:
        if any(not 0.0 <= v < 1.0 for v in value):
            raise ValueError(f"every marker threshold must be in [0, 1), got {value}")
        return sorted(set(value))

    @field_validator("min_areas")
    @classmethod
    def _areas_non_negative(cls, value: list[int]) -> list[int]:
        if any(v < 0 for v in value):
            raise ValueError(f"every minimum area must be >= 0, got {value}")
        return sorted(set(value))
