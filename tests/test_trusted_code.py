"""Code named in a file someone else made is never imported: run records, stores, backbone and pretrain records.

A `python:` SSL encoder is imported only when the user named it in their own config or command line
(extract, pretrain), or vouched for a run with `predict --trust-run`. The canary module below records its
own import in a file, so each test can tell that nothing ran.
"""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from pathseg.config import ConditioningConfig
from pathseg.errors import PathsegError
from tests.conftest import run_cli

CANARY = "pathseg_canary_encoder"


@pytest.fixture
def canary(tmp_path, monkeypatch):
    """An importable plugin whose import leaves a file behind; a valid encoder if it is ever built."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    sentinel = tmp_path / "canary-imported"
    (folder / f"{CANARY}.py").write_text(
        f"open({str(sentinel)!r}, 'w').close()\n"
        "import torch\n\n"
        "def build(weights):\n"
        "    return torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 384))\n")
    monkeypatch.syspath_prepend(str(folder))
    yield sentinel
    sys.modules.pop(CANARY, None)


def hostile_copy(run_dir, tmp_path, **conditioning) -> object:
    """The run as someone could send it: the same head, its record edited to name code."""
    copy = tmp_path / "sent-run"
    shutil.copytree(run_dir, copy)
    record = json.loads((copy / "run.json").read_text())
    record["config"]["conditioning"] = {"mode": "ssl", **conditioning}
    (copy / "run.json").write_text(json.dumps(record))
    return copy


def one_line(code: int, err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def an_image(store_path, tmp_path):
    from PIL import Image

    from pathseg.store import FeatureStore

    image = tmp_path / "in.png"
    Image.fromarray(FeatureStore.open(store_path).image_rgb(0)).save(image)
    return image


def test_predict_refuses_a_run_that_names_os_remove_and_deletes_nothing(fitted_run, extracted_small, tmp_path,
                                                                       monkeypatch, capsys):
    """The review's case: `python:os:remove` with a file as its weights deleted that file on predict."""
    _, run_dir = fitted_run
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    sent = hostile_copy(run_dir, tmp_path, encoder="python:os:remove", encoder_weights=str(victim))
    image = an_image(extracted_small[1], tmp_path)
    code, _, err = run_cli(monkeypatch, capsys, "predict", str(sent), str(image), "--out", str(tmp_path / "out"),
                           "--quiet")
    line = one_line(code, err)
    assert "python:os:remove" in line and "--trust-run" in line and str(sent) in line
    assert victim.read_text() == "keep me"


def test_predict_imports_nothing_a_run_names_unless_trusted(fitted_run, extracted_small, canary, tmp_path,
                                                           monkeypatch, capsys):
    from pathseg.predict.predictor import Predictor

    _, run_dir = fitted_run
    sent = hostile_copy(run_dir, tmp_path, encoder=f"python:{CANARY}:build")
    image = an_image(extracted_small[1], tmp_path)
    code, _, err = run_cli(monkeypatch, capsys, "predict", str(sent), str(image), "--out", str(tmp_path / "out"),
                           "--quiet")
    assert "--trust-run" in one_line(code, err)
    assert not canary.exists() and CANARY not in sys.modules
    with pytest.raises(PathsegError, match="--trust-run"):
        Predictor(sent)
    assert not canary.exists()

    predictor = Predictor(sent, trust_run=True)  # the user's explicit word: now it may be imported
    assert canary.exists() and predictor.extractor.conditioning.mode == "ssl"


def test_evaluate_and_ablate_on_a_hostile_run_import_nothing(fitted_run, canary, tmp_path, monkeypatch, capsys):
    """Stage 2 never builds the backbone, so a run record naming code is inert there: scored, nothing imported."""
    _, run_dir = fitted_run
    sent = hostile_copy(run_dir, tmp_path, encoder=f"python:{CANARY}:build")
    code, out, err = run_cli(monkeypatch, capsys, "evaluate", str(sent), "--quiet")
    assert code == 0, err
    assert not canary.exists() and CANARY not in sys.modules


def test_store_attrs_naming_code_are_never_imported(extracted_small, canary, tmp_path, monkeypatch, capsys):
    """A store whose attrs were edited to name code: `cache info`, `cache verify` and `--store` read it as data."""
    import zarr

    _, store_path = extracted_small
    copy = tmp_path / "sent.zarr"
    shutil.copytree(store_path, copy)
    group = zarr.open_group(str(copy), mode="r+")
    attrs = dict(group.attrs)
    attrs["config"]["conditioning"] = {"mode": "ssl", "encoder": f"python:{CANARY}:build"}
    group.attrs.put(attrs)
    for args in (("cache", "info", str(copy)), ("cache", "verify", str(copy))):
        run_cli(monkeypatch, capsys, *args)
    assert not canary.exists() and CANARY not in sys.modules


def test_conditioning_imports_only_code_the_caller_vouches_for(canary):
    """The one place that imports an encoder refuses any `python:` name it was not told the user wrote."""
    from pathseg.extract.backbone import SSLProjector
    from pathseg.extract.conditioning import build_conditioning

    spec = f"python:{CANARY}:build"
    config = ConditioningConfig(mode="ssl", encoder=spec)
    with pytest.raises(PathsegError, match="your own config"):
        build_conditioning(config, SSLProjector())
    with pytest.raises(PathsegError, match="your own config"):
        build_conditioning(config, SSLProjector(), allowed_code={"python:os:remove"})
    assert not canary.exists()
    assert build_conditioning(config, SSLProjector(), allowed_code=config.code_specs()).mode == "ssl"
    assert canary.exists()


def test_code_specs_are_the_python_names_only():
    config = ConditioningConfig(mode="ssl", encoder="hipt_vit_s16", region_encoder=" python:a.b:c")
    assert config.code_specs() == frozenset({"python:a.b:c"})
    assert ConditioningConfig().code_specs() == frozenset()
