"""What each leaderboard row cost: feature seconds per tile (the UNet, an encoder, nothing for pixels) and head
seconds per epoch. A user choosing between the LDM, an encoder and a network trained from scratch needs the
price beside the score, and both figures come from records the runs and the store already keep.
"""

from __future__ import annotations

import json
from pathlib import Path

from pathseg.train_head.ablation_grid import Cell

from pathseg.store import FeatureStore, feature_key, is_z0
from pathseg.store.names import is_encoder, split_encoder_block

FEATURE_COSTS = "feature_costs"  # store attrs: array key -> {seconds_per_tile, device}, written by extraction


def feature_seconds_per_tile(store: FeatureStore, cell: Cell) -> float | None:
    """Seconds per tile of computing the cell's inputs: one UNet forward per timestep (blocks of one timestep
    share it), one forward per encoder (its layers share it), none for pixels; None where a store predates
    the records."""
    if cell.baseline:
        return 0.0
    costs = store.attrs.get(FEATURE_COSTS, {})
    encoders = store.attrs.get("encoders", {})
    total, counted = 0.0, set()
    for timestep, block in cell.pairs:
        if is_encoder(block):
            name, _ = split_encoder_block(block)
            what, value = ("enc", name), (encoders.get(block) or {}).get("seconds_per_tile")
        elif is_z0(block):
            what, value = ("z0",), (costs.get(feature_key(timestep, block)) or {}).get("seconds_per_tile")
        else:
            what, value = ("t", timestep), (costs.get(feature_key(timestep, block)) or {}).get("seconds_per_tile")
        if what in counted:
            continue
        if not isinstance(value, int | float):  # no record (an older store), or one edited into nonsense
            return None
        counted.add(what)
        total += float(value)
    return total


def head_seconds_per_epoch(run_dir: Path) -> float | None:
    """The fit's wall time over its epochs (validation stitching included, as a user waits for it)."""
    try:
        record = json.loads((Path(run_dir) / "run.json").read_text())
        return float(record["seconds"]) / int(record["train"]["epochs"])
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return None
