"""Checkpoints are data: a pickle that would run code next to real tensors gives its tensors, and the code never runs.

Each hostile file carries a payload that would create a sentinel file if anything called it (`os.system`,
`exec`, `eval`, `subprocess.call`, `getattr(Path, "touch")`, `functools.partial`), saved by `torch.save`
next to tensors in the real key layouts (an original LDM `.ckpt`, HIPT's DINO `.pth`). Without the opt-in
the sentinel never appears; with `--trust-checkpoint` the file is unpickled in full, after a warning.
"""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

from pathseg.config import load_config
from pathseg.errors import PathsegError
from pathseg.loading import checkpoints as checkpoint_loading
from pathseg.loading.checkpoints import load_checkpoint
from pathseg.loading.restricted_pickle import PickledGlobal
from pathseg.store import FeatureStore, store_path_for
from pathseg.store.integrity import store_info
from tests.conftest import run_cli

SMALL_YAML = Path(__file__).parents[1] / "fixtures" / "ldm" / "small_only_ssl.yaml"
SYNTHETIC = ["--set", "dataset.synthetic.train=1", "--set", "dataset.synthetic.val=0", "--set",
             "dataset.synthetic.test=0", "--set", "dataset.synthetic.height=64", "--set", "dataset.synthetic.width=80",
             "--set", "tiling.tile_size=64", "--set", "tiling.stride=64", "--timesteps", "50", "--quiet"]


def payloads(sentinel: Path) -> dict[str, tuple]:
    """(callable, args) pairs that create `sentinel` when called, as an attacker's __reduce__ returns them."""
    write = f"open({str(sentinel)!r}, 'w').close()"
    return {
        "os.system": (os.system, (f"touch '{sentinel}'",)),
        "exec": (exec, (write,)),
        "eval": (eval, (write,)),
        "subprocess.call": (subprocess.call, (["touch", str(sentinel)],)),
        "getattr(Path, touch)": (Path.touch, (sentinel,)),
        "functools.partial": (functools.partial(exec, write), ()),
    }


class Hostile:
    """Pickles as a call of `payload` (what `__reduce__` returns is what unpickling calls)."""

    def __init__(self, payload: tuple) -> None:
        self.payload = payload

    def __reduce__(self):
        return self.payload


def hostile(sentinel: Path, kind: str = "exec") -> Hostile:
    return Hostile(payloads(sentinel)[kind])


@pytest.fixture(params=[True, False], ids=["torch-tensors-only-first", "restricted-reader-only"])
def weights_only_gate(request, monkeypatch):
    """Both paths: torch >= 2.6 tries torch's tensors-only loader first; older torch has the restricted reader only."""
    monkeypatch.setattr(checkpoint_loading, "TORCH_WEIGHTS_ONLY_IS_SAFE", request.param)
    return request.param


# ---------------------------------------------------------------------------------------------------------
# The loader
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("payload", list(payloads(Path("x"))))
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_hostile_pickle_gives_its_tensors_and_runs_nothing(tmp_path, weights_only_gate, payload, legacy):
    sentinel = tmp_path / "sentinel"
    weights = {"layer.weight": torch.randn(3, 4), "layer.bias": torch.arange(3.0)}
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": weights, "hyper_parameters": argparse.Namespace(lr=1e-4, name="run"),
                "callbacks": {"hostile": hostile(sentinel, payload)}}, path,
               _use_new_zipfile_serialization=not legacy)
    loaded = load_checkpoint(path, "a checkpoint")
    assert not sentinel.exists()
    for key, tensor in weights.items():
        assert torch.equal(loaded["state_dict"][key], tensor)
    namespace = loaded["hyper_parameters"]
    assert isinstance(namespace, PickledGlobal) and namespace.pickled_name == "argparse.Namespace"
    assert namespace.state == {"lr": 1e-4, "name": "run"}  # kept as data, for whoever wants to read it
    assert isinstance(loaded["callbacks"]["hostile"], PickledGlobal)


def test_plain_files_load_exactly(tmp_path, weights_only_gate):
    base = torch.arange(12.0).reshape(3, 4)
    state = {"a": base, "view": base[1:, 2:], "half": torch.ones(2, dtype=torch.float16),
             "bf16": torch.full((2,), 3.0, dtype=torch.bfloat16), "long": torch.tensor([1, 2]), "empty": torch.empty(0),
             "param": torch.nn.Parameter(torch.ones(2)), "nested": {"bytes": b"ab", "set": {1, 2}, "tuple": (1, "x")}}
    for legacy in (False, True):
        path = tmp_path / f"plain-{legacy}.pt"
        torch.save(state, path, _use_new_zipfile_serialization=not legacy)
        loaded = load_checkpoint(path, "a checkpoint")
        for key in ("a", "view", "half", "bf16", "long", "empty", "param"):
            assert torch.equal(loaded[key], state[key]) and loaded[key].dtype == state[key].dtype, key
        assert loaded["nested"] == state["nested"]


def test_trusted_file_is_unpickled_in_full_with_a_warning(tmp_path, capsys):
    sentinel = tmp_path / "sentinel"
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=1), "x": hostile(sentinel)}, path)
    loaded = load_checkpoint(path, "a checkpoint", trust=True)
    assert sentinel.exists()  # the opt-in means exactly this: the file's code ran
    assert isinstance(loaded["args"], argparse.Namespace)
    err = capsys.readouterr().err
    assert "warning" in err and str(path) in err and "runs any code" in err and len(err.strip().splitlines()) == 1


def one_line(call) -> str:
    with pytest.raises(PathsegError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_damaged_and_foreign_files_fail_in_one_line(tmp_path, weights_only_gate):
    path = tmp_path / "model.pt"
    torch.save({"w": torch.arange(1000.0)}, path)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("data/0"))
    flipped = tmp_path / "flipped.pt"  # one bit of tensor data: torch would load it silently, the CRC-32 says no
    data[info.header_offset + 30 + len(info.filename) + len(info.extra) + 100] ^= 0x10
    flipped.write_bytes(data)
    assert "flipped.pt is damaged" in one_line(lambda: load_checkpoint(flipped, "a checkpoint"))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:700])
    assert "truncated.pt" in one_line(lambda: load_checkpoint(truncated, "a checkpoint"))
    for name, content in (("junk.pt", b"not a checkpoint at all"), ("empty.pt", b"")):
        (tmp_path / name).write_bytes(content)
        assert "is not a readable PyTorch file" in one_line(lambda n=name: load_checkpoint(tmp_path / n, "weights"))
    assert "does not exist" in one_line(lambda: load_checkpoint(tmp_path / "nope.pt", "weights"))


def test_torchscript_archives_are_refused_not_run(tmp_path, weights_only_gate):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)
    assert "TorchScript" in one_line(lambda: load_checkpoint(path, "a checkpoint"))


def test_trust_is_a_permission_not_part_of_the_store_key_nor_taken_from_a_run_record(tmp_path):
    from pathseg.predict.predictor import run_config
    from pathseg.train_head.runs import Run

    plain = load_config(None, {"cache_dir": str(tmp_path)})
    trusting = load_config(None, {"cache_dir": str(tmp_path), "backbone.trust_checkpoint": True})
    assert store_path_for(plain) == store_path_for(trusting)
    record = {"config": trusting.model_dump(mode="json"), "store_compute_precision": "float32"}
    assert run_config(Run(tmp_path, record), None, None).backbone.trust_checkpoint is False
    assert run_config(Run(tmp_path, record), None, None, trust_checkpoint=True).backbone.trust_checkpoint is True


# ---------------------------------------------------------------------------------------------------------
# The three entry points, through the command line
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ldm_state():
    from tests.extract.test_ldm_checkpoint import build_reference

    return build_reference().state_dict()


def hostile_ldm_ckpt(path: Path, state: dict, sentinel: Path, kind: str) -> Path:
    """An original-format Lightning checkpoint: state_dict, Lightning's extras, and a payload among them."""
    torch.save({"state_dict": state, "epoch": 3, "global_step": 1200, "pytorch-lightning_version": "1.4.2",
                "hyper_parameters": argparse.Namespace(base_learning_rate=1e-4), "callbacks": hostile(sentinel, kind),
                "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-4}]}]}, path)
    return path


def test_convert_ldm_reads_a_hostile_ckpt_as_data(tmp_path, monkeypatch, capsys, ldm_state):
    monkeypatch.chdir(tmp_path)
    sentinel = tmp_path / "sentinel"
    ckpt = hostile_ldm_ckpt(tmp_path / "brca.ckpt", ldm_state, sentinel, "os.system")
    code, _, err = run_cli(monkeypatch, capsys, "convert-ldm", "--ckpt", str(ckpt), "--config", str(SMALL_YAML),
                           "--out", "converted")
    assert code == 0, err
    assert not sentinel.exists()
    assert (tmp_path / "converted" / "conversion_report.json").is_file()
    assert "warning" not in err
    # the opt-in: full unpickling, announced; the payload runs, which is what the user accepted
    code, _, err = run_cli(monkeypatch, capsys, "convert-ldm", "--ckpt", str(ckpt), "--config", str(SMALL_YAML),
                           "--out", "trusted", "--trust-checkpoint")
    assert code == 0, err
    assert sentinel.exists() and "warning:" in err and "--trust-checkpoint" in err


def test_extract_with_a_hostile_ckpt_backbone_runs_nothing(tmp_path, monkeypatch, capsys, ldm_state):
    monkeypatch.chdir(tmp_path)
    sentinel = tmp_path / "sentinel"
    ckpt = hostile_ldm_ckpt(tmp_path / "brca.ckpt", ldm_state, sentinel, "exec")
    code, _, err = run_cli(monkeypatch, capsys, "extract", "--backbone", str(ckpt), "--backbone-config",
                           str(SMALL_YAML), "--blocks", "mid", *SYNTHETIC)
    assert code == 0, err
    assert not sentinel.exists()
    (store,) = (tmp_path / "cache").glob("*.zarr")
    assert store_info(FeatureStore.open(store))["complete"]


def test_ssl_encoder_weights_from_a_hostile_pth_run_nothing(tmp_path, monkeypatch, capsys):
    from tests.extract.test_hipt import RefViT, dino_checkpoint

    monkeypatch.chdir(tmp_path)
    sentinel = tmp_path / "sentinel"
    torch.manual_seed(0)
    weights = tmp_path / "vit256_small_dino.pth"
    torch.save({**dino_checkpoint(RefViT(), ""), "args": argparse.Namespace(arch="vit_small"),
                "dino_loss": hostile(sentinel, "subprocess.call")}, weights)
    code, _, err = run_cli(monkeypatch, capsys, "extract", "--blocks", "up1", *SYNTHETIC,
                           "--set", "conditioning.mode=ssl", "--set", "conditioning.encoder=hipt_vit_s16",
                           "--set", f"conditioning.encoder_weights={weights}")
    assert code == 0, err
    assert not sentinel.exists()
    (store,) = (tmp_path / "cache").glob("*.zarr")
    assert FeatureStore.open(store).attrs["identity"]["conditioning"]["mode"] == "ssl"


def test_a_checkpoint_that_is_not_one_fails_in_one_line_on_the_command_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights.pth").write_bytes(b"\x80\x02}q\x00.garbage")
    code, _, err = run_cli(monkeypatch, capsys, "extract", "--blocks", "up1", *SYNTHETIC,
                           "--set", "conditioning.mode=ssl", "--set", "conditioning.encoder=hipt_vit_s16",
                           "--set", "conditioning.encoder_weights=weights.pth")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "weights.pth" in lines[0] and "Traceback" not in err, err


def test_a_tensor_must_lie_inside_its_storage():
    """torch would grow a storage to fit whatever sizes a file claims; the restricted reader refuses instead."""
    from pathseg.loading.restricted_pickle import UnreadableCheckpoint, _tensor

    storage = torch.storage.TypedStorage(wrap_storage=torch.UntypedStorage(16), dtype=torch.float32, _internal=True)
    assert _tensor(storage, 1, (3,), (1,)).shape == (3,) and _tensor(storage, 0, (2, 2), (2, 1)).shape == (2, 2)
    assert _tensor(storage, 0, (0, 5), (5, 1)).numel() == 0
    for offset, size, stride in ((0, (100,), (1,)), (3, (2,), (1,)), (0, (2,), (-1,)), (-1, (1,), (1,)),
                                 (0, (2, 2), (1,)), (0, ("2",), (1,))):
        with pytest.raises(UnreadableCheckpoint):
            _tensor(storage, offset, size, stride)
