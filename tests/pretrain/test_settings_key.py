"""A pretraining's settings key: every setting that changes the weights is in it, `--overwrite` means it, and
nothing a `pretrain.json` or checkpoint names is ever imported.

Same tiny runs as tests/test_pretrain.py (width 8, 64 px tiles, one CPU thread), cut to 4-8 steps.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from pathseg.pretrain.checkpoints import CHECKPOINT, load_checkpoint, save_checkpoint
from pathseg.pretrain.command import run_identity, run_pretraining, work_dir_for
from pathseg.pretrain.data import build_stream
from pathseg.pretrain.presets import model_configs

from pathseg.config import PretrainConfig
from pathseg.errors import PathsegError
from pathseg.store import PRETRAIN_RECORD, digest
from tests.pretrain.test_pretraining import history, pretrain_config

QUICK = {"pretrain.steps": 4, "pretrain.samples": 0, "pretrain.reconstructions": 0}
# Settings that change what training does, each with another value than SMALL_PRETRAIN's or the default.
CHANGED = {
    "pretrain.batch_size": 2, "pretrain.lr_first_stage": 0.002, "pretrain.lr_unet": 0.002,
    "pretrain.weight_decay": 0.01, "pretrain.ssim_weight": 0.5, "pretrain.kl_weight": 1e-5,
    "pretrain.condition_dropout": 0.2, "pretrain.ema_decay": 0.99, "pretrain.flips": False,
    "pretrain.colour_jitter": 0.1, "pretrain.cached_images": 1, "pretrain.seed": 3,
    "pretrain.first_stage_steps": 1, "pretrain.first_stage_crop": 16, "pretrain.preset": "small",
    "pretrain.first_stage": "kl", "pretrain.unet_width": 16, "pretrain.splits": ["val"],
    "pretrain.first_stage_whole_fraction": 0.25, "pretrain.warmup_steps": 10, "pretrain.lr_decay_after": 100,
    "pretrain.min_snr_gamma": 5.0, "pretrain.accumulation": 2, "pretrain.lowpass_weight": 1.0,
}
LEGACY = ("models", "data", "tiling", "conditioning", "seed", "first_stage_steps", "first_stage_crop")
# Settings that leave the weights as they are.
UNCHANGED = {"pretrain.device": "cpu", "pretrain.checkpoint_every": 1, "pretrain.keep_checkpoint": False,
             "pretrain.samples": 3, "pretrain.sample_steps": 3, "pretrain.reconstructions": 1,
             "pretrain.steps": 40, "pretrain.autocast": "off", "pretrain.quality_split": "test",
             "pretrain.quality_tiles": 2}


def settings_key(tmp: Path, **overrides) -> str:
    config = pretrain_config(tmp, **{"pretrain.first_stage_steps": 2, **overrides})
    return digest(run_identity(config, model_configs(config.pretrain), build_stream(config).reader.identity()))


def test_every_setting_that_changes_the_weights_changes_the_key_and_no_other(tmp_path):
    base = settings_key(tmp_path)
    changed = [name for name, value in CHANGED.items() if settings_key(tmp_path, **{name: value}) == base]
    assert changed == [], f"not in the settings key: {changed}"
    unchanged = [name for name, value in UNCHANGED.items() if settings_key(tmp_path, **{name: value}) != base]
    assert unchanged == [], f"in the settings key though the weights stay: {unchanged}"


def test_the_low_pass_pool_keys_the_run_only_when_the_term_is_on(tmp_path):
    """With `lowpass_weight` 0 the pool changes nothing, so two spellings of that run are one run."""
    assert settings_key(tmp_path, **{"pretrain.lowpass_pool": 4}) == settings_key(tmp_path)
    on = {"pretrain.lowpass_weight": 1.0}
    assert settings_key(tmp_path, **on, **{"pretrain.lowpass_pool": 4}) != settings_key(tmp_path, **on)


def test_every_pretrain_setting_is_classified(tmp_path):
    """A new setting must be sorted into one of the three, and one whose step k depends on the total (an LR
    schedule) would break extension: the classification is where that is decided."""
    from pathseg.pretrain.identity import DERIVED, NOT_WEIGHTS, STEP_LOCAL

    groups = [set(DERIVED), set(NOT_WEIGHTS), set(STEP_LOCAL)]
    assert set().union(*groups) == set(PretrainConfig.model_fields)
    assert sum(len(group) for group in groups) == len(PretrainConfig.model_fields)  # each in exactly one


def test_a_finished_run_refuses_other_settings_and_overwrite_trains_it_afresh(tmp_path):
    out = tmp_path / "backbone"
    first = run_pretraining(pretrain_config(tmp_path, **QUICK), out, show_progress=False)
    lower = pretrain_config(tmp_path, **QUICK, **{"pretrain.lr_unet": 0.0005})
    with pytest.raises(PathsegError) as caught:
        run_pretraining(lower, out, show_progress=False)
    message = str(caught.value)
    assert "\n" not in message and str(out) in message and "--overwrite" in message and "lr_unet" in message
    longer = pretrain_config(tmp_path, **{**QUICK, "pretrain.steps": 6, "pretrain.first_stage_steps": 2,
                                          "pretrain.lr_unet": 0.0005})
    with pytest.raises(PathsegError, match="lr_unet"):  # nor is it extended with another learning rate
        run_pretraining(longer, out, show_progress=False)

    again = run_pretraining(lower, out, overwrite=True, show_progress=False)
    assert not again.already_done and again.resumed_from is None and again.record["resumed_from_steps"] == []
    assert again.record["settings_key"] != first.record["settings_key"]
    assert again.record["weights_digest"] != first.record["weights_digest"]
    assert len(history(out)["unet"]) == 2
    assert run_pretraining(lower, out, show_progress=False).already_done


class Stop(Exception):
    """A run stopped right after a checkpoint, as a kill there would stop it."""


def stop_after(monkeypatch, step: int) -> None:
    import pathseg.pretrain.trainer as trainer

    saving = trainer.save_checkpoint

    def save_then_stop(path, content):
        saving(path, content)
        if content["state"]["step"] == step:
            monkeypatch.setattr(trainer, "save_checkpoint", saving)
            raise Stop

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_stop)


def test_overwrite_redoes_a_finished_run_from_scratch_and_a_killed_redo_resumes(tmp_path, monkeypatch):
    out = tmp_path / "backbone"
    config = pretrain_config(tmp_path, **{**QUICK, "pretrain.steps": 8, "pretrain.checkpoint_every": 2})
    first = run_pretraining(config, out, show_progress=False)

    stop_after(monkeypatch, 4)
    with pytest.raises(Stop):
        run_pretraining(config, out, overwrite=True, show_progress=False)
    assert json.loads((out / PRETRAIN_RECORD).read_text()) == first.record  # the old backbone until the new one
    assert load_checkpoint(work_dir_for(out) / CHECKPOINT)["state"]["step"] == 4  # begun afresh, not from 8
    redone = run_pretraining(config, out, overwrite=True, show_progress=False)  # the same command: resumes
    assert redone.resumed_from == 4 and redone.record["resumed_from_steps"] == [4]
    assert redone.record["settings_key"] == first.record["settings_key"]
    assert run_pretraining(config, out, show_progress=False).already_done

    again = run_pretraining(config, out, overwrite=True, show_progress=False)  # finished: --overwrite redoes it
    assert not again.already_done and again.resumed_from is None and again.record["resumed_from_steps"] == []
    assert len(history(out)["unet"]) == 4


def test_a_stopped_run_resumes_with_a_lower_learning_rate_but_not_another_ema(tmp_path, monkeypatch):
    out = tmp_path / "backbone"
    settings = {**QUICK, "pretrain.steps": 8, "pretrain.checkpoint_every": 2}
    stop_after(monkeypatch, 6)
    with pytest.raises(Stop):
        run_pretraining(pretrain_config(tmp_path, **settings), out, show_progress=False)

    for name, value in (("ema_decay", 0.99), ("condition_dropout", 0.5), ("colour_jitter", 0.2)):
        with pytest.raises(PathsegError) as caught:
            run_pretraining(pretrain_config(tmp_path, **settings, **{f"pretrain.{name}": value}), out,
                            show_progress=False)
        assert "\n" not in str(caught.value) and name in str(caught.value) and "--overwrite" in str(caught.value)
    lower = pretrain_config(tmp_path, **settings, **{"pretrain.lr_unet": 0.0005})
    summary = run_pretraining(lower, out, show_progress=False)  # the NaN remedy: a lower learning rate resumes
    assert summary.resumed_from == 6
    assert summary.record["settings_changed"] == [{"step": 6, "lr_unet": [0.001, 0.0005]}]
    assert run_pretraining(lower, out, show_progress=False).already_done


def test_a_record_and_checkpoint_from_before_the_settings_key_still_extend(tmp_path):
    from pathseg.pretrain.identity import ADDED_LATER

    """Records and checkpoints once keyed only models, data, tiling, conditioning, seed and the phase-1 steps and
    crop: a finished run of them is still found (its record's config says what the rest was) and extended."""
    out = tmp_path / "backbone"
    config = pretrain_config(tmp_path, **{**QUICK, "pretrain.first_stage_steps": 2})
    run_pretraining(config, out, show_progress=False)
    record_path, checkpoint = out / PRETRAIN_RECORD, work_dir_for(out) / CHECKPOINT
    record = json.loads(record_path.read_text())
    saved = load_checkpoint(checkpoint)
    legacy = {k: v for k, v in saved["identity"].items() if k in LEGACY}
    record = {k: v for k, v in record.items() if k != "identity"}
    for name in ADDED_LATER:  # that version's config had none of the settings added since
        record["config"]["pretrain"].pop(name)
    record_path.write_text(json.dumps({**record, "settings_key": digest(legacy)}))
    save_checkpoint(checkpoint, {**saved, "identity": legacy, "identity_key": digest(legacy)})

    assert run_pretraining(config, out, show_progress=False).already_done
    with pytest.raises(PathsegError, match="lr_unet"):
        run_pretraining(pretrain_config(tmp_path, **{**QUICK, "pretrain.first_stage_steps": 2,
                                                     "pretrain.lr_unet": 0.0005}), out, show_progress=False)
    longer = pretrain_config(tmp_path, **{**QUICK, "pretrain.first_stage_steps": 2, "pretrain.steps": 6})
    assert run_pretraining(longer, out, show_progress=False).resumed_from == 4


def test_code_named_in_a_record_or_checkpoint_is_never_imported(tmp_path, monkeypatch):
    """pretrain builds its conditioning from the user's own config; what `pretrain.json` or a checkpoint's
    identity names is only compared, so a `python:` encoder there is never imported."""
    probe, marker = tmp_path / "modules", tmp_path / "imported"
    probe.mkdir()
    (probe / "pretrain_key_probe.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('imported')\ndef factory(weights):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(probe))
    spec = "python:pretrain_key_probe:factory"
    out = tmp_path / "backbone"
    config = pretrain_config(tmp_path, **QUICK)
    run_pretraining(config, out, show_progress=False)
    record = json.loads((out / PRETRAIN_RECORD).read_text())
    record["config"]["conditioning"].update(mode="ssl", encoder=spec)
    record["conditioning"] = {"mode": "ssl", "patch": {"encoder": spec, "weights_digest": None}}
    record.get("identity", {})["conditioning"] = record["conditioning"]
    record["settings_key"] = "0" * 64
    (out / PRETRAIN_RECORD).write_text(json.dumps(record))
    checkpoint = work_dir_for(out) / CHECKPOINT
    saved = load_checkpoint(checkpoint)
    saved["identity"]["conditioning"] = record["conditioning"]
    save_checkpoint(checkpoint, saved)

    with pytest.raises(PathsegError, match="--overwrite"):
        run_pretraining(config, out, show_progress=False)
    run_pretraining(config, out, overwrite=True, show_progress=False)
    assert not marker.exists() and "pretrain_key_probe" not in sys.modules
