"""Bad encoder settings fail in one line naming the setting, before the diffusion pass computes anything."""

from __future__ import annotations

import pytest
from pathseg.extract.runner import run_extraction

from pathseg.errors import PathsegError
from tests.conftest import small_config

VIT = "timm:vit_tiny_patch16_224"


@pytest.mark.parametrize(("settings", "expected"), [
    ({"extract.encoders": ["foo"], "extract.encoder_weights.foo": "random"}, "extract.encoders: unknown encoder 'foo'"),
    ({"extract.encoders": ["foo"]}, "extract.encoders: unknown encoder 'foo'"),  # the name before its weights
    ({"extract.encoders": ["timm:vit_huge_patch14_224"]}, "unknown encoder 'timm:vit_huge_patch14_224'"),
    ({"extract.encoders": [VIT], f"extract.encoder_weights.{VIT}": "random", "extract.encoder_layers": [40]},
     "extract.encoder_layers: [40] out of range for timm:vit_tiny_patch16_224, which has 12 blocks"),
    ({"extract.encoders": ["python:modé:f"], "extract.encoder_weights.python:modé:f": "w.bin"}, "only ASCII"),
    ({"extract.encoders": ["python:Mod:f", "python:mod:f"], "extract.encoder_weights.python:Mod:f": "w.bin",
      "extract.encoder_weights.python:mod:f": "w.bin"}, "would share one store array"),
    ({"extract.encoders": ["python:mod:f"], "extract.encoder_weights.python:mod:f": "random"},
     "extract.encoder_weights.python:mod:f: a python: encoder makes its own weights"),
])
def test_bad_encoder_settings_fail_before_any_work(tmp_path, monkeypatch, settings, expected):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w.bin").write_bytes(b"weights")
    config = small_config(tmp_path, **settings)
    with pytest.raises(PathsegError) as caught:
        run_extraction(config, show_progress=False)
    assert expected in str(caught.value) and "\n" not in str(caught.value)
    assert not list(tmp_path.glob("cache/*.zarr"))  # no store was made (a lock file aside)


def test_another_normalisation_for_a_stored_encoder_is_named_before_the_pass(encoded_store, monkeypatch):
    config, path = encoded_store
    other = config.model_copy(deep=True)
    other.extract.encoder_normalisation = {VIT: "imagenet"}
    other.extract.timesteps = [50, 150, 250]  # new diffusion work, which must not start

    def no_pass(*args, **kwargs):
        raise AssertionError("the diffusion pass ran before the encoder settings were checked")

    monkeypatch.setattr("pathseg.extract.runner.extract_shards", no_pass)
    with pytest.raises(PathsegError, match=r"other settings \(normalisation None -> 'imagenet'"):
        run_extraction(other, show_progress=False, store_path=path)


@pytest.fixture
def encoded_store(tmp_path):
    config = small_config(tmp_path, **{"extract.encoders": [VIT], f"extract.encoder_weights.{VIT}": "random",
                                       "extract.timesteps": [50], "extract.blocks": ["up1"],
                                       "dataset.synthetic.train": 2, "dataset.synthetic.val": 1,
                                       "dataset.synthetic.test": 1, "dataset.synthetic.height": 128,
                                       "dataset.synthetic.width": 128, "tiling.stride": 128})
    return config, run_extraction(config, show_progress=False).store
