"""Checkpoint files (`.ckpt`, `.pth`, `.pt`) loaded as data: the tensors come back, code in the file never runs.

Users load checkpoints from file-sharing links, and a PyTorch checkpoint is a pickle that may name any
callable. Every checkpoint pathseg reads (`convert-ldm`, `--backbone FILE.ckpt`, SSL encoder weights) comes
through `load_checkpoint`:

1. zip records are checked against their CRC-32 first: torch does not check them, so a flipped bit in a
   downloaded file would otherwise load as silently different weights;
2. tensors only (`torch.load(weights_only=True)`), on torch >= 2.6, the first release whose tensors-only
   loader has no known way to run code (CVE-2025-32434);
3. what that refuses (Lightning and DINO files also pickle hyper-parameters: argparse `Namespace`,
   OmegaConf...), and everything on older torch, is read by `restricted_pickle`: tensors, containers and
   primitives are rebuilt, every other global becomes an inert placeholder, so the `state_dict` still loads;
4. full unpickling only when the user opted in (`--trust-checkpoint` or `backbone.trust_checkpoint: true`),
   announced on stderr each time, because it runs whatever the file carries.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import torch

from pathseg.errors import PathsegError
from pathseg.progress import say
from pathseg.restricted_pickle import UnreadableCheckpoint, load_restricted, zip_prefix

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
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # refused (hyper-parameters) or unreadable: the restricted reader reads it or says why
            pass
    try:
        loaded, _placeholders = load_restricted(path)
    except UnreadableCheckpoint as error:
        raise PathsegError(f"{path} is not a readable PyTorch file: {' '.join(str(error).split())}; "
                           f"pass {what}") from None
    except Exception as error:  # any failure to decode an untrusted file is the file's fault
        raise PathsegError(f"{path} is not a readable PyTorch file ({_first_line(error)}); the file is "
                           f"damaged or not a checkpoint: download it again, or pass {what}") from None
    return loaded


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
