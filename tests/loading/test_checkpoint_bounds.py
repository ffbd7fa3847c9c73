"""A checkpoint's tensors hold no more memory than the file holds bytes, and its pickle changes nothing global.

The attack (issue 21): a pickle rebuilds a tensor over a 16-byte storage, then a BUILD opcode hands the tensor
the 4-tuple state `(storage, 0, (50_000_000,), (1,))`; `Tensor.__setstate__` calls `set_()`, which grows the
storage to 200 MB. A few hundred bytes on disk can so ask for any amount of memory. The legacy format has a
plainer form: its pickle states each storage's size, and torch allocates that before reading anything.
Each refusal below must come from the check that runs before the allocation (the message says which).
"""

from __future__ import annotations

import argparse
import io
import pickle
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from pathseg.errors import PathsegError
from pathseg.loading import checkpoints as checkpoint_loading
from pathseg.loading import restricted_pickle
from pathseg.loading.checkpoints import load_checkpoint
from pathseg.loading.restricted_pickle import PickledGlobal

HUGE = 50_000_000  # elements: 200 MB of float32 over a 16-byte storage


@pytest.fixture(params=[True, False], ids=["torch-tensors-only-first", "restricted-reader-only"])
def weights_only_gate(request, monkeypatch):
    """Both paths: torch >= 2.6 tries torch's tensors-only loader first; older torch has the restricted reader only."""
    monkeypatch.setattr(checkpoint_loading, "TORCH_WEIGHTS_ONLY_IS_SAFE", request.param)
    return request.param


# ---- crafting files as an attacker would --------------------------------------------------------------


class StorageRef:
    """Pickled as the persistent id of storage `key` claiming `numel` float32 elements."""

    def __init__(self, key: str, numel: int) -> None:
        self.key, self.numel = key, numel


class RebuiltTensor:
    """Pickled as `_rebuild_tensor_v2` over a `StorageRef`; with `build_state`, followed by BUILD of that state."""

    def __init__(self, ref: StorageRef, build_state: tuple | None = None) -> None:
        self.ref, self.build_state = ref, build_state

    def __reduce__(self):
        args = (self.ref, 0, (self.ref.numel,), (1,), False, OrderedDict())
        if self.build_state is None:
            return torch._utils._rebuild_tensor_v2, args
        return torch._utils._rebuild_tensor_v2, args, self.build_state


def grown(numel: int = HUGE, key: str = "0") -> RebuiltTensor:
    """A 4-element tensor that BUILD then `set_()`s to `numel` elements over the same storage."""
    ref = StorageRef(key, 4)
    return RebuiltTensor(ref, (ref, 0, (numel,), (1,)))


def pickled(obj, legacy: bool) -> bytes:
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer, protocol=2)

    def persistent_id(value):
        if not isinstance(value, StorageRef):
            return None
        return ("storage", torch.FloatStorage, value.key, "cpu", value.numel) + ((None,) if legacy else ())

    pickler.persistent_id = persistent_id
    pickler.dump(obj)
    return buffer.getvalue()


def zip_checkpoint(path: Path, pkl: bytes, records: dict[str, bytes], compress: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pkl)
        archive.writestr("archive/byteorder", "little")
        for key, data in records.items():
            archive.writestr(f"archive/data/{key}", data, compress_type=compress)
        archive.writestr("archive/version", "3\n")
    return path


def legacy_checkpoint(path: Path, pkl: bytes, records: dict[str, bytes]) -> Path:
    """torch's pre-1.6 stream: magic, protocol, system info, the pickle, the storage keys, each storage's bytes."""
    with path.open("wb") as handle:
        for header in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True,
                                                      "type_sizes": {"short": 2, "int": 4, "long": 4}}):
            pickle.dump(header, handle, protocol=2)
        handle.write(pkl)
        pickle.dump(list(records), handle, protocol=2)
        for data in records.values():
            handle.write(struct.pack("<q", len(data) // 4) + data)
    return path


def checkpoint(path: Path, obj, legacy: bool, records: dict[str, bytes] | None = None) -> Path:
    records = {"0": bytes(16)} if records is None else records
    write = legacy_checkpoint if legacy else zip_checkpoint
    return write(path, pickled(obj, legacy), records)


def refusal(path: Path) -> str:
    with pytest.raises(PathsegError) as caught:
        load_checkpoint(path, "a checkpoint")
    message = str(caught.value)
    assert "\n" not in message and str(path) in message, message
    return message


# ---- the attack -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_a_build_that_grows_a_tensor_is_refused_before_the_storage_grows(tmp_path, weights_only_gate, legacy):
    path = checkpoint(tmp_path / "grown.pt", {"w": grown()}, legacy)
    assert path.stat().st_size < 1000
    # the BUILD refusal, not an error after set_() has already resized the storage to 200 MB
    assert "BUILD" in refusal(path)
    with pytest.raises(restricted_pickle.UnreadableCheckpoint, match="BUILD"):
        restricted_pickle.load_restricted(path)


def test_torch_tensors_only_loader_takes_the_attack_and_the_check_after_loading_refuses_it(tmp_path):
    """What torch 2.13's `weights_only=True` does with it, recorded: zip storages cannot be resized, so the zip
    form fails there, but a legacy file whose storage table leaves the grown storage out loads as 50M elements
    from 339 bytes; so does one whose pickle just claims 50M elements for a storage the file does not hold."""
    zipped = checkpoint(tmp_path / "grown.pt", {"w": grown()}, legacy=False)
    with pytest.raises(RuntimeError, match="not resizable"):
        torch.load(zipped, weights_only=True)
    claimed = {"w": RebuiltTensor(StorageRef("0", HUGE))}
    for name, obj in (("grown-unlisted.pt", {"w": grown()}), ("claimed.pt", claimed)):
        path = checkpoint(tmp_path / name, obj, legacy=True, records={})
        loaded = torch.load(path, weights_only=True)
        assert loaded["w"].numel() == HUGE and path.stat().st_size < 400
        with pytest.raises(PathsegError, match="more memory than the file holds") as caught:
            checkpoint_loading.check_tensors_fit(loaded, path, "a checkpoint")
        assert str(path) in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("obj", [{"w": grown()}, {"w": RebuiltTensor(StorageRef("0", HUGE))}], ids=["build", "claim"])
def test_a_legacy_file_without_the_storages_it_claims_is_refused_before_torch_allocates(tmp_path, weights_only_gate,
                                                                                          obj):
    path = checkpoint(tmp_path / "unlisted.pt", obj, legacy=True, records={})
    assert any(words in refusal(path) for words in ("BUILD", "more than the whole file"))


def test_many_storages_each_within_the_file_size_are_refused_together(tmp_path, weights_only_gate):
    """Each claim alone fits a legacy file's size; together they would still ask for file size times their count."""
    refs = [RebuiltTensor(StorageRef(str(n), 50)) for n in range(64)]
    path = checkpoint(tmp_path / "many.pt", refs, legacy=True, records={})
    assert "more than the whole file" in refusal(path)


def test_compressed_storage_records_are_refused(tmp_path, weights_only_gate):
    """torch.save stores records uncompressed; a deflated record turns 39 KB on disk into a 40 MB storage."""
    path = zip_checkpoint(tmp_path / "deflated.pt", pickled({"w": RebuiltTensor(StorageRef("0", 10_000_000))}, False),
                          {"0": bytes(40_000_000)}, compress=zipfile.ZIP_DEFLATED)
    assert path.stat().st_size < 100_000
    assert "compressed" in refusal(path)


def test_the_check_after_loading_refuses_storages_beyond_the_records(tmp_path):
    path = checkpoint(tmp_path / "small.pt", {"w": RebuiltTensor(StorageRef("0", 4))}, legacy=False)
    checkpoint_loading.check_tensors_fit(load_checkpoint(path, "a checkpoint"), path, "a checkpoint")
    for loaded in ({"w": torch.zeros(5)}, [torch.zeros(4), torch.zeros(4)], {"deep": ({"x": [torch.zeros(8)]},)}):
        with pytest.raises(PathsegError, match="more memory than the file holds"):
            checkpoint_loading.check_tensors_fit(loaded, path, "a checkpoint")
    shared = torch.zeros(4)
    checkpoint_loading.check_tensors_fit({"a": shared, "b": shared[1:], "c": shared.view(2, 2)}, path, "a checkpoint")


# ---- BUILD on anything but the reader's own placeholders --------------------------------------------------


def build_on_global(module: str, name: str, state) -> bytes:
    """`{"x": <module.name>}` whose value is first given `state` by BUILD: the global itself, not an instance."""
    return (b"\x80\x02}X\x01\x00\x00\x00x" + pickle.GLOBAL + f"{module}\n{name}\n".encode()
            + pickle.dumps(state, protocol=2)[2:-1] + pickle.BUILD + pickle.SETITEM + pickle.STOP)


@pytest.mark.parametrize(("module", "name", "state"), [
    ("torch", "Tensor", {"name": "pwned"}),
    ("torch._utils", "_rebuild_tensor", (None, {"pwned": True})),
    ("torch._utils", "_rebuild_tensor", {"pwned": True}),
    ("collections", "OrderedDict", (None, {"pwned": True})),
    ("argparse", "Namespace", (None, {"pwned": True})),
])
def test_build_on_a_module_level_object_is_refused_and_changes_nothing(tmp_path, weights_only_gate, module, name,
                                                                         state):
    path = zip_checkpoint(tmp_path / "global.pt", build_on_global(module, name, state), {})
    assert "BUILD" in refusal(path)
    assert restricted_pickle._TENSOR.name == "torch.Tensor"
    assert not hasattr(restricted_pickle._tensor, "pwned") and not hasattr(OrderedDict, "pwned")


# ---- what real files carry still loads ---------------------------------------------------------------------


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.norm = torch.nn.BatchNorm2d(4)
        self.head = torch.nn.Linear(4, 2)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("lightning", [False, True], ids=["state_dict", "with-hyper-parameters"])
def test_ordinary_checkpoints_load_identically(tmp_path, weights_only_gate, legacy, lightning):
    """`state_dict()` pickles its `_metadata` through BUILD on an OrderedDict, and a Namespace placeholder takes
    its state through BUILD too: both still load, as `torch.load` gives them (the hyper-parameters force the
    restricted reader on either path)."""
    torch.manual_seed(0)
    state = Net().state_dict()
    saved = {"state_dict": state, "epoch": 3, "optimizer_states": [{"param_groups": [{"lr": 1e-4}]}]}
    if lightning:
        saved["hyper_parameters"] = argparse.Namespace(lr=1e-4)
    path = tmp_path / "model.ckpt"
    torch.save(saved, path, _use_new_zipfile_serialization=not legacy)
    loaded = load_checkpoint(path, "a checkpoint")
    reference = torch.load(path, map_location="cpu", weights_only=False)
    assert loaded["state_dict"].keys() == state.keys() and loaded["epoch"] == 3
    for key, tensor in state.items():
        assert torch.equal(loaded["state_dict"][key], tensor) and loaded["state_dict"][key].dtype == tensor.dtype
    assert loaded["state_dict"]._metadata == reference["state_dict"]._metadata
    assert loaded["optimizer_states"] == reference["optimizer_states"]
    if lightning:
        assert isinstance(loaded["hyper_parameters"], PickledGlobal)
        assert loaded["hyper_parameters"].state == {"lr": 1e-4}
    Net().load_state_dict(loaded["state_dict"])


def test_sparse_quantized_and_raw_storage_values_still_load_through_torch(tmp_path, monkeypatch):
    """The restricted reader's pass over the pickle (before torch's loader) knows every storage type torch.save
    writes, and the check after loading looks into sparse tensors' indices and values."""
    monkeypatch.setattr(checkpoint_loading, "TORCH_WEIGHTS_ONLY_IS_SAFE", True)
    saved = {"coo": torch.eye(3).to_sparse(), "csr": torch.eye(3).to_sparse_csr(),
             "q": torch.quantize_per_tensor(torch.ones(4), 0.1, 0, torch.qint8),
             "raw": torch.arange(4.0).untyped_storage()}
    path = tmp_path / "odd.pt"
    torch.save(saved, path)
    loaded = load_checkpoint(path, "a checkpoint")
    assert torch.equal(loaded["coo"].to_dense(), torch.eye(3)) and torch.equal(loaded["csr"].to_dense(), torch.eye(3))
    assert torch.equal(loaded["q"].dequantize(), saved["q"].dequantize()) and loaded["raw"].nbytes() == 16
