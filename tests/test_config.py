from pathlib import Path

import pytest
import yaml

from pathseg.config import PipelineConfig, load_config, parse_override
from pathseg.errors import PathsegError

ROOT = Path(__file__).resolve().parents[1]


def _keys(tree: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in tree.items():
        keys.add(prefix + key)
        if isinstance(value, dict):
            keys |= _keys(value, f"{prefix}{key}.")
    return keys


def test_pipeline_yaml_lists_every_setting_with_the_defaults():
    written = yaml.safe_load((ROOT / "pipeline.yaml").read_text())
    defaults = PipelineConfig().model_dump(mode="json")
    assert _keys(written) == _keys(defaults)
    assert load_config(ROOT / "pipeline.yaml") == PipelineConfig()


def test_unknown_key_fails_naming_it(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("extract:\n  timestep: [50]\n")
    with pytest.raises(PathsegError, match=r"extract\.timestep.*unknown key"):
        load_config(path)


def test_mistyped_value_fails(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("train:\n  epochs: many\n")
    with pytest.raises(PathsegError, match=r"train\.epochs"):
        load_config(path)


def test_timestep_out_of_range_fails():
    with pytest.raises(PathsegError, match="outside the schedule"):
        load_config(None, {"extract.timesteps": [50, 1000]})


def test_tile_size_must_be_multiple_of_32():
    with pytest.raises(PathsegError, match="multiple of 32"):
        load_config(None, {"tiling.tile_size": 100})


def test_overrides_keep_yaml_types():
    assert parse_override("extract.timesteps=[10, 20]") == ("extract.timesteps", [10, 20])
    config = load_config(None, dict([parse_override("train.lr=0.01"), parse_override("dataset.name=glas")]))
    assert config.train.lr == 0.01 and config.dataset.name == "glas"


def test_bad_yaml_is_one_clear_error(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("extract: [unclosed\n")
    with pytest.raises(PathsegError, match="not valid YAML"):
        load_config(path)


def test_autocast_off_reads_as_the_documented_word_in_yaml_and_on_the_command_line(tmp_path):
    word = "off"
    path = tmp_path / "p.yaml"
    path.write_text(f"extract:\n  autocast: {word}\n")
    assert load_config(path).extract.autocast == "off"
    key, value = parse_override(f"extract.autocast={word}")
    assert load_config(None, {key: value}).extract.autocast == "off"


def test_yaml_1_1_words_stay_words_and_booleans_still_parse(tmp_path):
    path = tmp_path / "p.yaml"
    # ON and NO are written like TCGA tissue source site codes; yes/no stay valid for boolean settings
    path.write_text("conditioning:\n  mode: null\ndataset:\n  bcss:\n    test_institutions: [ON, NO]\n"
                    "    val_institutions: [BH]\ntrain:\n  augment: no\nextract:\n  compile: yes\n")
    config = load_config(path)
    assert config.conditioning.mode == "null"
    assert config.dataset.bcss.test_institutions == ["ON", "NO"]
    assert config.train.augment is False and config.extract.compile is True
    key, value = parse_override("conditioning.mode=null")
    assert load_config(None, {key: value}).conditioning.mode == "null"
