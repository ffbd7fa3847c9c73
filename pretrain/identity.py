"""What a pretraining is: every setting that changes its weights, and which of them a resumed run may change.

The identity holds the model shapes, data, tiling, conditioning, seed, the first stage's step count and
crop, and every other `pretrain` setting that changes what training does (`STEP_LOCAL`). Its digest is the
settings key a finished backbone's `pretrain.json` records: the same key means the same weights, so a
finished run is done, and another key is refused unless `--overwrite`.

The total `--steps` is not in it: the learning rates are constant and the EMA warm-up counts steps done,
so step k of a run does not depend on how many follow, and a finished run extends to a larger `--steps`.
A setting that made step k depend on the total (a learning-rate schedule over the run, say) would have to
put `steps` into the identity, and such runs could not be extended: `STEP_LOCAL` is where that is decided.

A stopped run may resume with other `RECOVERY` settings (the learning rates, weight decay, loss weights and
batch size: what gets a run past a NaN or out of memory); the record lists each such change.

Records and checkpoints are compared as data only: nothing they name is imported or built.
"""

from __future__ import annotations

import json
from typing import Any

from pathseg.extract.runner import conditioning_fingerprint
from pathseg.pretrain.data import crop_size
from pathseg.pretrain.presets import phase_steps

from pathseg.config import PipelineConfig
from pathseg.store import digest
from pathseg.store.identity import canonical_json

# The identity before it held `settings` (a record's settings_key was the digest of these).
LEGACY_KEYS = ("models", "data", "tiling", "conditioning", "seed", "first_stage_steps", "first_stage_crop")
# Held through what they give (the identity's models, data, seed and phase-1 entries), so two spellings of one
# run are one run: a crop not smaller than the tile is whole tiles, a fraction and a step count the same split.
DERIVED = ("preset", "unet_width", "first_stage_width", "first_stage", "first_stage_crop", "steps",
           "first_stage_fraction", "first_stage_steps", "splits", "slides", "mpp", "level0_mpp", "force_level0_mpp",
           "tissue_threshold", "min_tissue", "seed", "first_stage_from")
# Not the weights: where the run computes (device and autocast change them only by rounding, like another
# machine; the record says which were used), how often it saves, and the pictures drawn after training.
NOT_WEIGHTS = ("device", "autocast", "checkpoint_every", "keep_checkpoint", "samples", "sample_steps",
               "reconstructions", "quality_split", "quality_tiles")
# Everything else, held as set: each changes what step k does without reference to the total step count.
STEP_LOCAL = ("batch_size", "lr_first_stage", "lr_unet", "weight_decay", "ssim_weight", "kl_weight",
              "condition_dropout", "ema_decay", "flips", "colour_jitter", "cached_images", "first_stage_whole_fraction",
              "warmup_steps", "lr_decay_after", "min_snr_gamma", "accumulation", "lowpass_weight", "lowpass_pool")
# What only phase 1 uses: not keyed when the first stage comes from another backbone (`first_stage_from`).
FIRST_STAGE_ONLY = ("lr_first_stage", "ssim_weight", "kl_weight", "first_stage_whole_fraction", "lowpass_weight",
                    "lowpass_pool")
# Settings added after checkpoints were written, at the values that leave training as it was: a checkpoint or
# record without them is read as having used these, so older runs still resume and extend.
ADDED_LATER = {"first_stage_whole_fraction": 0.0, "warmup_steps": 0, "lr_decay_after": None, "min_snr_gamma": None,
               "accumulation": 1, "lowpass_weight": 0.0, "lowpass_pool": 8}
RECOVERY = ("lr_first_stage", "lr_unet", "weight_decay", "ssim_weight", "kl_weight", "lowpass_weight", "lowpass_pool",
            "batch_size")


def run_identity(config: PipelineConfig, configs: dict, data: dict, first_stage_digest: str | None = None) -> dict:
    """The run's identity (JSON-plain, for the checkpoint and the record).

    `settings` holds every pretrain setting neither derived nor `NOT_WEIGHTS`, so a setting added later is
    keyed until someone decides otherwise. A first stage taken from another backbone is held by its weights'
    digest, not its path, so moving that directory changes nothing.
    """
    s = config.pretrain
    left_out = set(DERIVED) | set(NOT_WEIGHTS)
    identity = {
        "models": configs,
        "data": data,
        "tiling": config.tiling.model_dump(mode="json"),
        "conditioning": conditioning_fingerprint(config),
        "seed": s.seed,
        "first_stage_steps": phase_steps(s)[0],
        "first_stage_crop": crop_size(s.first_stage_crop, config.tiling.tile_size),  # None: whole tiles
        "settings": {k: v for k, v in s.model_dump(mode="json").items() if k not in left_out},
    }
    if not s.lowpass_weight:  # the pool shapes a term that is off: every pool spells the same run
        identity["settings"]["lowpass_pool"] = ADDED_LATER["lowpass_pool"]
    if first_stage_digest is not None:  # no phase 1: its settings change nothing, so they do not key the run
        identity["first_stage_from"] = first_stage_digest
        identity["first_stage_crop"] = None
        identity["settings"] = {k: v for k, v in identity["settings"].items() if k not in FIRST_STAGE_ONLY}
    return json.loads(canonical_json(identity))


def settings_key(identity: dict) -> str:
    """The finished run's key: the digest of its whole identity."""
    return digest(identity)


def resumable(identity: dict) -> dict:
    """What a checkpoint must share with a run to be resumed by it: the identity less the `RECOVERY` settings."""
    settings = {k: v for k, v in identity.get("settings", {}).items() if k not in RECOVERY}
    return {**identity, "settings": settings}


def resume_key(identity: dict) -> str:
    return digest(resumable(identity))


def normalised(theirs: dict, ours: dict) -> dict:
    """A checkpoint's identity in today's form, so checkpoints of older versions still resume and extend.

    Before `first_stage_steps` it held `steps` and `first_stage_fraction`; before `settings` it held none of
    them, and the run that wrote it is taken to have used ours (the only thing that version compared).
    """
    theirs = dict(theirs)
    if "first_stage_steps" not in theirs and "steps" in theirs and "first_stage_fraction" in theirs:
        steps = int(theirs.pop("steps"))
        fraction = float(theirs.pop("first_stage_fraction"))
        theirs["first_stage_steps"] = min(max(1, round(steps * fraction)), steps - 1)
    if "settings" not in theirs and set(theirs) == set(LEGACY_KEYS):  # ours, less what that version could not do
        theirs["settings"] = {**ours.get("settings", {}), **ADDED_LATER}
    return with_added_settings(theirs)


def with_added_settings(identity: dict) -> dict:
    """The identity with every `ADDED_LATER` setting it lacks at its neutral value."""
    settings = identity.get("settings")
    added = {k: v for k, v in ADDED_LATER.items()
             if not ("first_stage_from" in identity and k in FIRST_STAGE_ONLY)}  # not keyed there at all
    if not isinstance(settings, dict) or set(added) <= set(settings):
        return identity
    return {**identity, "settings": {**added, **settings}}


def differences(ours: dict, theirs: dict) -> list[str]:
    """Names of what differs, settings by their config names (`pretrain.lr_unet`)."""
    names = sorted(k for k in (ours.keys() | theirs.keys()) - {"settings"} if ours.get(k) != theirs.get(k))
    mine, other = ours.get("settings", {}), theirs.get("settings", {})
    if isinstance(mine, dict) and isinstance(other, dict):
        names += sorted(f"pretrain.{k}" for k in mine.keys() | other.keys() if mine.get(k) != other.get(k))
    return names


def recovery_changes(ours: dict, theirs: dict) -> dict[str, list[Any]]:
    """{setting: [the checkpoint's value, ours]} for the `RECOVERY` settings a resume changes."""
    mine, other = ours.get("settings", {}), theirs.get("settings", {})
    return {k: [other.get(k), mine.get(k)] for k in RECOVERY if other.get(k) != mine.get(k)}


def recorded_identity(record: dict, ours: dict) -> tuple[str | None, dict | None]:
    """(settings key, identity) of a finished backbone's record, in today's terms where it can tell.

    A record from before `settings` keyed only `LEGACY_KEYS`; when those match ours, the config it recorded
    says what its other settings were (read as values, never built). Either may be None: unreadable.
    """
    key = record.get("settings_key")
    identity = record.get("identity")
    if isinstance(identity, dict):
        completed = with_added_settings(identity)
        return (key if completed is identity else settings_key(completed)), completed
    if key != digest({k: ours.get(k) for k in LEGACY_KEYS}):
        return key, None
    pretrain = (record.get("config") or {}).get("pretrain") or {}
    if not isinstance(pretrain, dict):
        return key, None
    theirs = {**ours, "settings": {k: pretrain[k] if k in pretrain else ADDED_LATER.get(k)
                                   for k in ours.get("settings", {})}}
    return settings_key(theirs), theirs
