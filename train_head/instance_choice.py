"""The instance decoding a run uses: settings chosen on val by `evaluate`, recorded beside the head.

How a prediction becomes gland objects (marker threshold, minimum object area) changes every object figure,
so it is chosen like the epoch is: on the val split only. `evaluate` searches the `instances.*` grids on val
and writes the choice to `<run>/instances.json` with the head's digest; test splits and `predict` then
decode with the same values. A choice made for another head (a refit) or under other grids is not used.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pathseg.config import InstancesConfig, PipelineConfig
from pathseg.files import atomic_write_text
from pathseg.loading.data_files import read_json_object
from pathseg.store import digest

CHOICE_FILE = "instances.json"
CHOICE_SCHEMA = 1


def search_settings(config: PipelineConfig) -> dict[str, Any]:
    """What a choice depends on besides the head: the decoder's fixed settings and the grids searched."""
    return {"instances": config.instances.model_dump(mode="json"),
            "min_object_area": config.evaluate.min_object_area,
            "blend": config.evaluate.blend, "val_split": config.train.val_split}


def read_choice(run: Any, config: PipelineConfig) -> dict | None:
    """The recorded choice when it was made for this head under these settings; None otherwise."""
    path = Path(run.directory) / CHOICE_FILE
    if not path.exists():
        return None
    record = read_json_object(path, "delete it and rerun `pathseg evaluate`")
    if (record.get("schema") != CHOICE_SCHEMA or record.get("head_sha256") != run.record.get("head_sha256")
            or record.get("settings_digest") != digest(search_settings(config))):
        return None
    return record


def write_choice(run: Any, config: PipelineConfig, chosen: dict[str, Any], scores: list[dict]) -> dict:
    """Record a val choice (`chosen`: marker_threshold, min_area, baseline_min_area) and every scored candidate."""
    record = {"schema": CHOICE_SCHEMA, "head_sha256": run.record.get("head_sha256"),
              "settings_digest": digest(search_settings(config)), "settings": search_settings(config),
              "chosen": chosen, "val_scores": scores}
    atomic_write_text(Path(run.directory) / CHOICE_FILE, json.dumps(record, indent=2))
    return record


def decoding_settings(run: Any, config: PipelineConfig) -> tuple[InstancesConfig, int, str]:
    """(instance settings, baseline minimum object area, where they came from) for decoding this run's output.

    With a val choice recorded for this head, its marker threshold and minimum areas replace the configured
    ones; otherwise the configured values are used as they are, and the source says so.
    """
    record = read_choice(run, config)
    if record is None:
        return config.instances, config.evaluate.min_object_area, "configured (no val choice recorded)"
    chosen = record["chosen"]
    settings = config.instances.model_copy(update={"marker_threshold": float(chosen["marker_threshold"]),
                                                   "min_area": int(chosen["min_area"])})
    return settings, int(chosen["baseline_min_area"]), f"chosen on {record['settings']['val_split']}"
