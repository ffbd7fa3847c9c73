"""Every file other than a trusted checkpoint is parsed as data: YAML through a safe loader, JSON, CSV; nothing in a
file is imported or called, and a module is imported only when the config names a `python:` encoder.

The last test reads pathseg's own source, so that a later `yaml.load`, `pickle.load`, unguarded `torch.load`,
`eval` or `import_module` shows up in review as a failing test rather than as a hole."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pathseg.errors import PathsegError
from pathseg.loading.data_files import escapes_folder, read_csv_rows, read_json_object, read_text, read_yaml
from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parents[2]
SMALL_LDM_YAML = Path(__file__).parents[1] / "fixtures" / "ldm" / "small_only_ssl.yaml"


def tag_payloads(sentinel: Path) -> list[str]:
    return [
        f"!!python/object/apply:os.system ['touch {sentinel}']",
        f"!!python/object/apply:builtins.exec [\"open('{sentinel}', 'w').close()\"]",
        f"!!python/object/new:subprocess.Popen [['touch', '{sentinel}']]",
        "!!python/name:os.system",
        "!!python/module:os",
    ]


def one_line(code: int, err: str, *expected: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]


@pytest.fixture
def here(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("payload", range(5))
def test_python_yaml_tags_are_refused_in_one_line_and_run_nothing(here, monkeypatch, capsys, payload):
    sentinel = here / "sentinel"
    tag = tag_payloads(sentinel)[payload]
    (here / "pipeline.yaml").write_text(f"dataset:\n  name: {tag}\n")
    one_line(*run_cli(monkeypatch, capsys, "extract", "--quiet")[::2], "pipeline.yaml", "YAML tags that build Python")
    one_line(*run_cli(monkeypatch, capsys, "cache", "ls", "--config", "pipeline.yaml")[::2], "pipeline.yaml")
    (here / "pipeline.yaml").unlink()
    one_line(*run_cli(monkeypatch, capsys, "extract", "--set", f"dataset.name={tag}", "--quiet")[::2],
             "dataset.name=", "YAML tags that build Python")
    mine = here / "mine"
    for folder in ("images", "masks"):
        (mine / folder).mkdir(parents=True)
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(mine / "images" / "a.png")
    Image.fromarray(np.zeros((40, 50), np.uint8)).save(mine / "masks" / "a.png")
    (mine / "classes.yaml").write_text(f"classes: {tag}\n")
    one_line(*run_cli(monkeypatch, capsys, "extract", "--dataset", "folder", "--data-root", str(mine),
                      "--quiet")[::2], "classes.yaml", "YAML tags that build Python")
    ldm = here / "project.yaml"
    ldm.write_text(SMALL_LDM_YAML.read_text().replace("target: torch.nn.Identity", f"target: {tag}"))
    (here / "model.ckpt").write_bytes(b"")
    one_line(*run_cli(monkeypatch, capsys, "convert-ldm", "--ckpt", "model.ckpt", "--config", str(ldm), "--out",
                      "converted")[::2], "project.yaml", "YAML tags that build Python")
    assert not sentinel.exists()


def test_text_tables_and_records_are_read_as_data_or_refused_in_one_line(tmp_path):
    path = tmp_path / "table.csv"
    path.write_bytes("\ufeffname,patient ID\r\ntrain_1,1\r\n".encode())  # a spreadsheet's BOM and CRLF are fine
    assert read_csv_rows(path, "fix it") == [["name", "patient ID"], ["train_1", "1"]]
    for content, expected in ((b"name,\x00id\n", "NUL bytes"), (b"caf\xe9,1\n", "not UTF-8 text")):
        path.write_bytes(content)
        with pytest.raises(PathsegError, match=expected):
            read_csv_rows(path, "fix it")
    record = tmp_path / "run.json"
    for content, expected in ((b'{"a": ', "not valid JSON"), (b"[1]", "JSON object"), (b"{" * 100_000, "deep|JSON")):
        record.write_bytes(content)
        with pytest.raises(PathsegError, match=expected):
            read_json_object(record, "refit it")
    with pytest.raises(PathsegError, match="cannot be read"):
        read_text(tmp_path, "pass a file")  # a folder where a file should be
    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * 5000 + "]" * 5000)
    with pytest.raises(PathsegError, match="nested too deep"):
        read_yaml(deep, "fix it")


@pytest.mark.parametrize("name", ["../x", "a/b", "a\\b", "..", ".", "", "tab\there"])
def test_names_that_would_leave_their_folder_are_caught(name):
    assert escapes_folder(name)


@pytest.mark.parametrize("name", ["train_1", "lame n°1 ✓", "a b", "x..y", ".hidden"])
def test_plain_names_pass(name):
    assert not escapes_folder(name)


def test_an_encoder_module_is_imported_only_when_the_config_says_python(tmp_path, monkeypatch):
    from pathseg.extract.backbone import SSLProjector
    from pathseg.extract.conditioning import build_conditioning

    from pathseg.config import ConditioningConfig

    sentinel = tmp_path / "imported"
    (tmp_path / "probe_encoder.py").write_text(
        f"open({str(sentinel)!r}, 'w').close()\n"
        "import torch\n\ndef build(weights):\n    return torch.nn.Linear(3, 384)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    projector = SSLProjector(384, 768, 8)
    for name in ("probe_encoder", "probe_encoder:build", "os.system"):
        with pytest.raises(PathsegError, match="unknown SSL encoder"):
            build_conditioning(ConditioningConfig(mode="ssl", encoder=name), projector)
    assert not sentinel.exists() and "probe_encoder" not in sys.modules
    config = ConditioningConfig(mode="ssl", encoder="python:probe_encoder:build")
    conditioning = build_conditioning(config, projector, allowed_code=config.code_specs())
    assert sentinel.exists() and conditioning.mode == "ssl"
    sys.modules.pop("probe_encoder", None)


SOURCES = ["pathseg", "extract", "train_head", "predict", "pretrain"]
FORBIDDEN = {
    r"\byaml\.(unsafe_load|full_load|load_all)\(|Loader=yaml\.(Loader|FullLoader|UnsafeLoader)": "unsafe YAML",
    r"\b(pickle|cPickle|dill|joblib|marshal|shelve)\.(load|loads|open)\(": "unpickling outside the checkpoint loader",
    r"allow_pickle\s*=\s*True": "numpy unpickling",
    r"(?<![\w.])(eval|exec)\(": "eval/exec",
}


def test_source_reads_files_only_through_the_safe_paths():
    problems = []
    for folder in SOURCES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            text = path.read_text()
            for pattern, what in FORBIDDEN.items():
                problems += [f"{relative}: {what}" for _ in re.finditer(pattern, text)]
            for call in re.finditer(r"torch\.load\(([^)]*)\)", text):
                if relative != "pathseg/loading/checkpoints.py" and "weights_only=True" not in call.group(1):
                    problems.append(f"{relative}: torch.load without weights_only=True; use load_checkpoint")
            if "import_module(" in text and relative != "extract/ssl_plugins.py":
                problems.append(f"{relative}: imports modules by name")
            if re.search(r"\byaml\.load\(", text) and "Loader=SettingsLoader" not in text:
                problems.append(f"{relative}: yaml.load without the safe SettingsLoader")
    assert not problems, "\n".join(problems)
