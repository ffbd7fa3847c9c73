"""Checkpoint files (`.ckpt`, `.pth`, `.pt`) loaded as data: the tensors come back, code in the file never runs.

Users load checkpoints from file-sharing links, and a PyTorch checkpoint is a pickle that may name any
callable. Every checkpoint pathseg reads (`convert-ldm`, `--backbone FILE.ckpt`, SSL encoder weights) comes
through `load_checkpoint`:

1. zip records are checked against their CRC-32 first: torch does not check them, so a flipped bit in a
   downloaded file would otherwise load as silently different weights;
2. tensors only (`torch.load(weights_only=True)`), on torch >= 2.6, the first release whose tensors-only
   loader has no known way to run code (CVE-2025-32434). It can still be made to allocate: it sizes a legacy
   file's storages from what the pickle claims, and applies a pickled BUILD to a tensor by `set_()`, which
   grows the storage (a 339-byte file loads as a 50M-element tensor). So the pickle is first read by the
   restricted reader without its data (`meta=True`), which refuses both, and torch sees only files it passed;
3. what that refuses (Lightning and DINO files also pickle hyper-parameters: argparse `Namespace`,
   OmegaConf...), and everything on older torch, is read by `restricted_pickle`: tensors, containers and
   primitives are rebuilt, every other global becomes an inert placeholder, so the `state_dict` still loads;
4. full unpickling only when the user opted in (`--trust-checkpoint` or `backbone.trust_checkpoint: true`),
   announced on stderr each time, because it runs whatever the file carries.

Whatever either reader returns is then checked against the file (`check_tensors_fit`): every tensor inside
its storage, and no storage larger than the bytes the file holds for it. Both readers should already ensure
this; the check is what makes it a property of pathseg rather than of every torch release to come.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path
from types import FunctionType, ModuleType
from typing import Any

import torch

from pathseg.errors import PathsegError
from pathseg.loading.restricted_pickle import UnreadableCheckpoint, load_restricted, zip_prefix
from pathseg.progress import say

TRUST_HINT = "--trust-checkpoint (or backbone.trust_checkpoint: true)"


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


# torch < 2.6: weights_only=True could still run code (CVE-2025-32434); the restricted reader is used alone.
TORCH_WEIGHTS_ONLY_IS_SAFE = _torch_version() >= (2, 6)


def load_checkpoint(path: Path | str, what: str, *, trust: bool = False) -> Any:
    """The object a checkpoint holds, on the CPU; `what` names the file's role in error lines.

    Without `trust`, classes and functions the file names are never imported or called (see the module
    docstring); a file that cannot be read that way fails in one line. With `trust`, the file is unpickled in
    full, after a warning.
    """
    path = Path(path)
    if not path.is_file():
        raise PathsegError(f"{path} does not exist; pass {what}")
    verify_zip_records(path, what)
    if trust:
        return _load_trusted(path)
    if TORCH_WEIGHTS_ONLY_IS_SAFE:
        _read_restricted(path, what, meta=True)  # before torch allocates anything the pickle claims
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # refused (hyper-parameters) or unreadable: the restricted reader reads it or says why
            pass
        else:
            check_tensors_fit(loaded, path, what)
            return loaded
    loaded = _read_restricted(path, what)
    check_tensors_fit(loaded, path, what)
    return loaded


def _read_restricted(path: Path, what: str, meta: bool = False) -> Any:
    try:
        return load_restricted(path, meta)[0]
    except UnreadableCheckpoint as error:
        raise PathsegError(f"{path} is not a readable PyTorch file: {' '.join(str(error).split())}; "
                           f"pass {what}") from None
    except Exception as error:  # any failure to decode an untrusted file is the file's fault
        raise PathsegError(f"{path} is not a readable PyTorch file ({_first_line(error)}); the file is "
                           f"damaged or not a checkpoint: download it again, or pass {what}") from None


def check_tensors_fit(loaded: Any, path: Path, what: str) -> None:
    """Every tensor in `loaded` lies inside its storage, and its storages fit in the bytes `path` holds.

    A zip file holds one stored record per storage, so the storages must match distinct records at least as
    large (largest to largest); a legacy file's records cannot be told apart without reading it again, so its
    storages together must fit in its size. A tensor that fails either was grown after it was read (or the
    file lied about a size), and would hand later code memory the file never held.
    """
    storages: dict[int, int] = {}
    for found in _reachable(loaded):
        if isinstance(found, torch.UntypedStorage):
            storages[found._cdata] = found.nbytes()
            continue
        for part in _dense_parts(found, path, what):
            storage = part.untyped_storage()
            storages[storage._cdata] = storage.nbytes()
            extent = part.storage_offset() + sum((n - 1) * step for n, step in zip(part.shape, part.stride(),
                                                                                   strict=True))
            if part.numel() and (part.storage_offset() < 0 or min(part.stride(), default=0) < 0
                                 or (extent + 1) * part.element_size() > storage.nbytes()):
                raise PathsegError(f"{path} holds a tensor that reaches past its own storage, which asks for more "
                                   f"memory than the file holds: the file is damaged or crafted; pass {what}")
    held = _bytes_held(path, what)
    wanted = sorted((size for size in storages.values() if size), reverse=True)
    fits = sum(wanted) <= held if isinstance(held, int) else (
        len(wanted) <= len(held) and all(a <= b for a, b in zip(wanted, sorted(held, reverse=True), strict=False)))
    if not fits:
        raise PathsegError(f"{path} holds tensors with storages of {sum(wanted)} bytes, more memory than the file "
                           f"holds for them: the file is damaged or crafted to exhaust memory; pass {what}")


def _bytes_held(path: Path, what: str) -> int | list[int]:
    """A zip file's stored storage records, one size each; a legacy file, its size."""
    if not zipfile.is_zipfile(path):
        return path.stat().st_size
    with zipfile.ZipFile(path) as archive:
        try:
            prefix = zip_prefix(archive)  # which also refuses compressed records: stored sizes are sizes on disk
        except UnreadableCheckpoint as error:
            raise PathsegError(f"{path} is not a readable PyTorch file: {error}; pass {what}") from None
        return [info.file_size for info in archive.infolist()
                if info.filename.startswith(f"{prefix}data/") and not info.is_dir()]


def _reachable(root: Any) -> Iterator[torch.Tensor | torch.UntypedStorage]:
    """Every tensor and storage reachable from `root` through containers and instance attributes (placeholders
    keep what the pickle gave them there; a tensor hidden in an `OrderedDict`'s attributes is still in memory)."""
    seen: set[int] = set()
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, type | FunctionType | ModuleType):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor | torch.UntypedStorage):
            yield obj
        elif isinstance(obj, torch.storage.TypedStorage):
            yield obj._untyped_storage
        elif isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, list | tuple | set | frozenset):
            stack.extend(obj)
        attributes = getattr(obj, "__dict__", None)
        if isinstance(attributes, dict):
            stack.extend(attributes.values())


def _dense_parts(tensor: torch.Tensor, path: Path, what: str) -> list[torch.Tensor]:
    """The strided tensors that hold a tensor's memory: itself, or a sparse tensor's indices and values."""
    if tensor.layout == torch.strided:
        return [tensor]
    if tensor.layout == torch.sparse_coo:
        return [tensor._indices(), tensor._values()]
    if tensor.layout in (torch.sparse_csr, torch.sparse_bsr):
        return [tensor.crow_indices(), tensor.col_indices(), tensor.values()]
    if tensor.layout in (torch.sparse_csc, torch.sparse_bsc):
        return [tensor.ccol_indices(), tensor.row_indices(), tensor.values()]
    raise PathsegError(f"{path} holds a tensor of layout {tensor.layout}, which pathseg does not load; pass {what}")


def verify_zip_records(path: Path, what: str) -> None:
    """A zip-format checkpoint's layout (one archive with data.pkl, no TorchScript code) and every record's CRC-32,
    read once before torch sees the file; legacy files have no checksums."""
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            zip_prefix(archive)
            for info in archive.infolist():
                with archive.open(info) as record:
                    while record.read(1 << 24):
                        pass
    except UnreadableCheckpoint as error:
        raise PathsegError(f"{path} is not a readable PyTorch file: {error}; pass {what}") from None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as error:
        raise PathsegError(f"{path} is damaged ({_first_line(error)}); download or copy it again") from None


def _load_trusted(path: Path) -> Any:
    say(f"warning: {path}: unpickling in full because of {TRUST_HINT}; this runs any code the file carries, "
        "so do it only for files from people you trust")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (ModuleNotFoundError, AttributeError) as missing:
        raise PathsegError(
            f"{path}: unpickling needs code that is not installed ({missing}); leave out {TRUST_HINT} to read "
            "just its tensors"
        ) from None
    except Exception as error:  # as in load_checkpoint: a file that does not unpickle
        raise PathsegError(f"{path} is not a readable PyTorch file ({_first_line(error)})") from None


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
