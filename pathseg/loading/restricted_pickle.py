"""PyTorch checkpoints read without running anything from them: tensors, containers and plain values only.

A `.ckpt`/`.pth` file is a pickle, and unpickling calls whatever the pickle names: `os.system` is as easy to
name as `collections.OrderedDict`. Lightning and DINO files also pickle hyper-parameters (argparse
`Namespace`, OmegaConf `DictConfig`, numpy scalars...), which torch's tensors-only loader refuses outright,
so those files would otherwise need full unpickling. Here the pickle is read by an `Unpickler` whose
`find_class` hands out only:

- tensor rebuilders (wrapped: storage, offset, sizes and strides inside the storage, nothing else; hooks and
  Python state are dropped), `torch.Size`, `torch.device` and dtypes;
- containers (`OrderedDict`, `set`, `frozenset`, `bytearray` of given bytes) and `complex`, plus `_codecs.encode`
  for the latin-1 bytes protocol 2 writes;
- for every other name, an inert `PickledGlobal` subclass. It is never imported and its target never
  called: "calling" it just records the pickled arguments and state as data, so a Namespace of
  hyper-parameters comes back as a placeholder beside a `state_dict` that loads normally.

BUILD (set an object's state) acts on an object without calling a global, so only objects this load made,
whose state is data, take it: placeholders and the `OrderedDict`s carrying a `state_dict`'s `_metadata`. On a
tensor, `Tensor.__setstate__` calls `set_()`, which grows the storage to any size the state names (16 bytes on
disk became 50M elements); on what `find_class` hands out (a function, a class), it would change that object
for the whole process. Hence the pure-Python `pickle._Unpickler`: the C one has no hook on BUILD.

Storages are read by this module, not by `torch.load`: from the zip records (`<archive>/data.pkl` and
`<archive>/data/<key>`, the format since torch 1.6, each record's CRC-32 checked by `zipfile`) or from the
legacy stream (magic number, protocol, system info, the pickle, the storage keys, then each storage as an
int64 element count and its bytes). So nothing in this path depends on torch's own unpicklers, which had
code-execution holes before torch 2.6. Storages never take more memory than the file holds bytes: zip records
must be stored, not compressed (a deflated record can inflate a thousandfold), and a legacy file's storages
together may not claim more than its size. `load_restricted(path, meta=True)` reads only the pickle, with
storages on the meta device, so a file can be judged before any loader allocates what it claims.
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

import torch


class UnreadableCheckpoint(Exception):
    """The file is not a checkpoint this module can read (the caller names the file and what to do)."""


class PickledGlobal:
    """Stands for a class or function named in a checkpoint: never imported, never called.

    What the pickle passed to it (constructor arguments, `__setstate__` state, dict or list items) is
    kept as plain data, so a caller can still see, say, the hyper-parameters a Namespace held.
    """

    pickled_name: ClassVar[str] = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> PickledGlobal:
        placeholder = object.__new__(cls)
        placeholder.__dict__.update(args=args, kwargs=kwargs, state=None, items={}, elements=[])
        return placeholder

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Arguments were recorded by `__new__`; nothing else happens."""

    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"] = state

    def __setitem__(self, key: Any, value: Any) -> None:  # SETITEMS on a pickled dict subclass
        self.__dict__["items"][key] = value

    def append(self, value: Any) -> None:  # APPENDS on a pickled list subclass
        self.__dict__["elements"].append(value)

    def extend(self, values: Any) -> None:
        self.__dict__["elements"].extend(values)

    def __call__(self, *args: Any, **kwargs: Any) -> PickledGlobal:
        """What `getattr(os, "system")(...)` would have called: another placeholder, recording the call."""
        return _placeholder_class("<call>", self.pickled_name)(self, *args, **kwargs)

    def __repr__(self) -> str:
        return f"<{self.pickled_name}: not loaded>"


class _StorageType:
    """What `torch FloatStorage` & co. name in a pickle: only their element type matters."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "UntypedStorage": torch.uint8,
    "ByteStorage": torch.uint8,
    "CharStorage": torch.int8,
    "ShortStorage": torch.int16,
    "IntStorage": torch.int32,
    "LongStorage": torch.int64,
    "HalfStorage": torch.float16,
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "BFloat16Storage": torch.bfloat16,
    "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128,
    "QInt8Storage": torch.qint8,
    "QUInt8Storage": torch.quint8,
    "QInt32Storage": torch.qint32,
    "QUInt4x2Storage": torch.quint4x2,
    "QUInt2x4Storage": torch.quint2x4,
}
_DTYPES: dict[str, torch.dtype] = {name: value for name, value in vars(torch).items() if isinstance(value, torch.dtype)}
_PYTHON2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple | list | torch.Size) or not all(type(v) is int for v in value):
        raise UnreadableCheckpoint(f"a tensor's {what} is not a tuple of integers")
    return tuple(value)


def _tensor(storage: Any, offset: Any, size: Any, stride: Any, *_ignored: Any) -> torch.Tensor:
    """`_rebuild_tensor(_v2)`: a view of a storage read from the file; requires_grad, hooks and metadata are
    dropped (a frozen backbone needs none of them, and hooks are callables).

    The view must lie inside its storage: torch would otherwise grow the storage to fit whatever sizes the
    file claims, so a damaged size field could ask for any amount of memory.
    """
    if not isinstance(storage, torch.storage.TypedStorage) or type(offset) is not int:
        raise UnreadableCheckpoint("a tensor does not point into one of the file's storages")
    size, stride = _int_tuple(size, "size"), _int_tuple(stride, "stride")
    if len(size) != len(stride) or offset < 0 or any(n < 0 for n in size + stride):
        raise UnreadableCheckpoint("a tensor has negative or mismatched sizes and strides")
    last = offset + sum((n - 1) * step for n, step in zip(size, stride, strict=True)) if all(size) else -1
    if last >= storage._size():  # _size: size() itself warns that TypedStorage is deprecated
        raise UnreadableCheckpoint("a tensor reaches past the end of its storage")
    return torch._utils._rebuild_tensor(storage, offset, size, stride)


def _parameter(data: Any, *_ignored: Any) -> torch.Tensor:
    """`_rebuild_parameter(_with_state)`: the tensor itself; Parameter-ness and Python state are not needed."""
    if not isinstance(data, torch.Tensor):
        raise UnreadableCheckpoint("a parameter holds no tensor")
    return data


def _from_type(function: Any, new_type: Any, args: Any, _state: Any) -> Any:
    """`_rebuild_from_type_v2`, for plain tensors that carried Python attributes: the tensor, attributes dropped."""
    if function in (_tensor, _parameter) and new_type in (_TENSOR, _PARAMETER) and isinstance(args, tuple):
        return function(*args)
    return _placeholder_class("torch._tensor", "_rebuild_from_type_v2")(function, new_type, args)


def _latin1_bytes(text: Any, encoding: Any = "latin1") -> bytes:
    """Protocol 2 writes `bytes` as `_codecs.encode(text, "latin1")`; no other codec is run."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnreadableCheckpoint("a bytes value is encoded in an unexpected way")
    return text.encode("latin1")


def _bytearray(source: Any = b"", encoding: Any = None) -> bytearray:
    """`bytearray(data)` as pickled; `bytearray(n)` would allocate n zero bytes, whatever n a file says."""
    if isinstance(source, str) and isinstance(encoding, str):
        return bytearray(source, encoding)
    if isinstance(source, bytes | bytearray):
        return bytearray(source)
    raise UnreadableCheckpoint("a bytearray is pickled in an unexpected way")


class _TypeMarker:
    """`torch.Tensor` / `torch.nn.Parameter` named as data (the type a tensor is rebuilt as), never called."""

    def __init__(self, name: str) -> None:
        self.name = name


_TENSOR, _PARAMETER = _TypeMarker("torch.Tensor"), _TypeMarker("torch.nn.Parameter")

_ALLOWED: dict[str, Any] = {
    "collections.OrderedDict": OrderedDict,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "builtins.bytearray": _bytearray,
    "builtins.complex": complex,
    "_codecs.encode": _latin1_bytes,
    "torch._utils._rebuild_tensor": _tensor,
    "torch._utils._rebuild_tensor_v2": _tensor,
    "torch._utils._rebuild_parameter": _parameter,
    "torch._utils._rebuild_parameter_with_state": _parameter,
    "torch._tensor._rebuild_from_type_v2": _from_type,
    "torch.nn.parameter.Parameter": _PARAMETER,
    "torch.Tensor": _TENSOR,
    "torch.Size": torch.Size,
    "torch.device": torch.device,
}


def _placeholder_class(module: str, name: str) -> type[PickledGlobal]:
    full = f"{module}.{name}"
    class_name = name if name.isidentifier() else "PickledGlobal"
    return type(class_name, (PickledGlobal,), {"pickled_name": full, "__module__": __name__})


class RestrictedUnpickler(pickle._Unpickler):
    """Unpickles tensors, containers and primitives; any other global becomes an inert `PickledGlobal`."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def load_build(self) -> None:
        """BUILD, for placeholder instances and `OrderedDict`s only (see the module docstring for why)."""
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, PickledGlobal):
            PickledGlobal.__setstate__(inst, state)  # the base class's: a placeholder class is no one's to patch
        elif type(inst) is OrderedDict and isinstance(state, dict) and all(type(k) is str for k in state):
            inst.__dict__.update(state)  # `_metadata`, as torch's own tensors-only loader allows
        else:
            what = "a tensor" if isinstance(inst, torch.Tensor) else f"a {type(inst).__name__}"
            what = f"the module-level {self._globals[id(inst)]}" if id(inst) in self._globals else what
            raise UnreadableCheckpoint(f"its pickle sets the state of {what} (BUILD), which pathseg refuses: that "
                                       "could grow a tensor past the file's bytes or change a shared object")

    dispatch[pickle.BUILD[0]] = load_build

    def __init__(self, file: BinaryIO, storage: Callable[[tuple], Any] | None = None) -> None:
        super().__init__(file, encoding="utf-8")
        self._storage = storage
        self._placeholders: dict[str, type[PickledGlobal]] = {}
        self._globals: dict[int, str] = {}  # id of what find_class handed out -> its pickled name, for messages

    def find_class(self, module: str, name: str) -> Any:
        module = _PYTHON2_MODULES.get(module, module)
        full = f"{module}.{name}"
        if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:  # torch.storage: an untyped storage
            return _StorageType(_STORAGE_DTYPES[name])  # a new object each time, not a shared one
        if module == "torch" and name in _DTYPES:
            found: Any = _DTYPES[name]
        elif full in _ALLOWED:
            found = _ALLOWED[full]
        else:
            found = self._placeholders.setdefault(full, _placeholder_class(module, name))
        self._globals[id(found)] = full
        return found

    def persistent_load(self, pid: Any) -> Any:
        if self._storage is None or not isinstance(pid, tuple) or not pid:
            raise UnreadableCheckpoint("the pickle refers to data outside itself that this file does not hold")
        return self._storage(pid)

    def placeholders(self) -> list[str]:
        """Names that were replaced by placeholders, for messages."""
        return sorted(self._placeholders)


def _typed(untyped: torch.UntypedStorage, dtype: torch.dtype) -> torch.storage.TypedStorage:
    return torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)


def _storage_id(pid: tuple, fields: int) -> tuple:
    """The `('storage', type, key, location, numel, ...)` persistent id, checked field by field."""
    if len(pid) != fields or pid[0] != "storage" or not isinstance(pid[1], _StorageType):
        kind = pid[0] if isinstance(pid[0], str) and pid[0].isidentifier() else type(pid[0]).__name__
        raise UnreadableCheckpoint(f"it refers to a {kind!r} record of {len(pid)} fields where a storage belongs")
    if not isinstance(pid[2], str) or type(pid[4]) is not int or pid[4] < 0:
        raise UnreadableCheckpoint("a storage's key or size is malformed")
    return pid


# ---- the zip format (torch >= 1.6) ------------------------------------------------------------------


def zip_prefix(archive: zipfile.ZipFile) -> str:
    """The one top-level folder that holds `data.pkl`; TorchScript archives (code, not weights) are refused."""
    pickles = [name for name in archive.namelist() if name.count("/") == 1 and name.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise UnreadableCheckpoint("a zip file, but not a PyTorch checkpoint (no single <archive>/data.pkl)")
    prefix = pickles[0][: -len("data.pkl")]
    names = set(archive.namelist())
    if f"{prefix}constants.pkl" in names or f"{prefix}code/" in {n[: len(prefix) + 5] for n in names}:
        raise UnreadableCheckpoint("a TorchScript archive (it holds code); pathseg loads only saved tensors")
    if f"{prefix}byteorder" in names and archive.read(f"{prefix}byteorder").strip() not in (b"little", b""):
        raise UnreadableCheckpoint("saved on a big-endian machine; re-save it on a little-endian one")
    if any(info.compress_type != zipfile.ZIP_STORED for info in archive.infolist()):
        raise UnreadableCheckpoint("it has compressed records, which torch.save never writes (a compressed record "
                                   "can hold far more than its bytes on disk); re-save it with torch.save")
    return prefix


def load_zip(path: Path, meta: bool = False) -> tuple[Any, list[str]]:
    """The object a zip-format checkpoint holds, and the names that became placeholders; with `meta`, no record
    but the pickle is read and the tensors are on the meta device."""
    with zipfile.ZipFile(path) as archive:
        prefix = zip_prefix(archive)
        storages: dict[str, torch.storage.TypedStorage] = {}

        def storage(pid: tuple) -> torch.storage.TypedStorage:
            _, kind, key, _location, numel = _storage_id(pid, 5)
            if key not in storages:
                record = f"{prefix}data/{key}"
                if record not in archive.NameToInfo:
                    raise UnreadableCheckpoint(f"storage {key!r} is missing from the archive")
                expected = numel * kind.dtype.itemsize
                if archive.getinfo(record).file_size != expected:
                    raise UnreadableCheckpoint(f"storage {key!r} holds {archive.getinfo(record).file_size} bytes, "
                                               f"its tensor needs {expected}")
                data = b"" if meta else archive.read(record)  # zipfile checks the record's CRC-32
                untyped = torch.UntypedStorage.from_buffer(data, dtype=torch.uint8) if data else torch.UntypedStorage(0)
                if meta:  # a size and no memory: the pickle is judged before any record is read
                    untyped = torch.UntypedStorage(expected, device="meta")
                storages[key] = _typed(untyped, kind.dtype)
            return storages[key]

        unpickler = RestrictedUnpickler(io.BytesIO(archive.read(f"{prefix}data.pkl")), storage)
        return unpickler.load(), unpickler.placeholders()


# ---- the legacy stream (torch.save(..., _use_new_zipfile_serialization=False)) --------------------------

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001


def load_legacy(path: Path, meta: bool = False) -> tuple[Any, list[str]]:
    """The object a legacy-format checkpoint holds; its storages follow the pickle, in the order of its keys.

    The pickle states each storage's size before any of its bytes are read, so the sizes are checked against
    the file's before anything is allocated: one by one, and in total (many storages each under the file's
    size would still add up to any amount). With `meta`, the storages are not read and stay on the meta device.
    """
    with path.open("rb") as handle:
        if handle.read(512)[257:262] == b"ustar":
            raise UnreadableCheckpoint("the tar format of torch < 0.4, which pathseg does not read; re-save it")
        handle.seek(0)
        if RestrictedUnpickler(handle).load() != LEGACY_MAGIC:
            raise UnreadableCheckpoint("not a PyTorch checkpoint (no zip archive, no legacy magic number)")
        if RestrictedUnpickler(handle).load() != LEGACY_PROTOCOL:
            raise UnreadableCheckpoint("an unknown legacy protocol version")
        system = RestrictedUnpickler(handle).load()
        if not isinstance(system, dict) or system.get("little_endian") is not True:
            raise UnreadableCheckpoint("saved on a big-endian machine; re-save it on a little-endian one")
        pending: dict[str, tuple[torch.storage.TypedStorage, int]] = {}
        file_size = path.stat().st_size
        claimed = 0

        def storage(pid: tuple) -> torch.storage.TypedStorage:
            nonlocal claimed
            _, kind, key, _location, numel, view = _storage_id(pid, 6)
            if view is not None:
                raise UnreadableCheckpoint("storage views of torch < 1.0, which pathseg does not read; re-save it")
            if key not in pending:
                nbytes = numel * kind.dtype.itemsize
                claimed += nbytes
                if claimed > file_size:  # checked before allocating: a flipped size must not take the memory
                    raise UnreadableCheckpoint(f"storage {key!r} brings its storages to {claimed} bytes, more "
                                               "than the whole file")
                untyped = torch.UntypedStorage(nbytes, device="meta" if meta else "cpu")
                pending[key] = (_typed(untyped, kind.dtype), numel)
            elif pending[key][1] != numel:
                raise UnreadableCheckpoint(f"storage {key!r} is given two sizes")
            return pending[key][0]

        unpickler = RestrictedUnpickler(handle, storage)
        result = unpickler.load()
        keys = RestrictedUnpickler(handle).load()
        if not isinstance(keys, list) or sorted(map(str, keys)) != sorted(pending):
            raise UnreadableCheckpoint("its storage table does not match its tensors")
        if meta:
            return result, unpickler.placeholders()
        for key in keys:
            typed, numel = pending[key]
            size = handle.read(8)
            if len(size) != 8 or struct.unpack("<q", size)[0] != numel:
                raise UnreadableCheckpoint(f"storage {key!r} is cut short or mis-sized")
            data = handle.read(numel * typed.dtype.itemsize)
            if len(data) != numel * typed.dtype.itemsize:
                raise UnreadableCheckpoint(f"storage {key!r} is cut short (truncated file?)")
            if data:
                typed._untyped_storage.copy_(torch.UntypedStorage.from_buffer(data, dtype=torch.uint8))
        return result, unpickler.placeholders()


def load_restricted(path: Path, meta: bool = False) -> tuple[Any, list[str]]:
    """Either format, read as data. Raises `UnreadableCheckpoint` (or the reader's own error) on a bad file.

    `meta` reads only the pickle (tensors on the meta device, no memory for them): what torch's own loader
    would be handed can be refused before it allocates storages at the sizes the pickle claims.
    """
    return load_zip(path, meta) if zipfile.is_zipfile(path) else load_legacy(path, meta)
