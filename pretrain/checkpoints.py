"""Checkpoints that survive kill -9 and load without unpickling code.

A checkpoint holds only tensors, numbers, strings, lists and dicts (weights, optimiser and EMA states,
RNG states as byte tensors, loss histories as lists of floats), so it loads as data
through `pathseg.loading.checkpoints`: a checkpoint file from elsewhere cannot run code. It is written to a
temporary file beside the old one, flushed to disk, then renamed over it, so the file on disk is
always one whole checkpoint, the last good one.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pathseg.errors import PathsegError
from pathseg.loading.checkpoints import load_checkpoint as read_checkpoint

CHECKPOINT = "checkpoint.pt"
FORMAT = 1
PHASES = ("first_stage", "unet")


@dataclass
class RunState:
    """Where a pretraining is: the numbers that, with the weights, make a resumed run continue exactly."""

    step: int = 0  # optimiser steps done, both phases together
    history: dict[str, list[float]] = field(default_factory=lambda: {phase: [] for phase in PHASES})
    seconds: dict[str, float] = field(default_factory=lambda: {phase: 0.0 for phase in PHASES})
    latent_scale: float = 1.0
    resumed_from: list[int] = field(default_factory=list)
    # {"step": s, setting: [before, after]}: the recovery settings a resume at step s changed
    changes: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "history": {k: [float(v) for v in values] for k, values in self.history.items()},
            "seconds": dict(self.seconds),
            "latent_scale": float(self.latent_scale),
            "resumed_from": list(self.resumed_from),
            "changes": [dict(change) for change in self.changes],
        }

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> RunState:
        return cls(int(value["step"]), {k: list(v) for k, v in value["history"].items()}, dict(value["seconds"]),
                   float(value["latent_scale"]), list(value["resumed_from"]),
                   [dict(change) for change in value.get("changes", [])])  # none in older checkpoints


def rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


def _on_cpu(value: Any) -> Any:
    """Everything to the CPU, so a checkpoint made on a GPU resumes anywhere."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _on_cpu(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_on_cpu(v) for v in value)
    return value


def save_checkpoint(path: Path, content: dict[str, Any]) -> None:
    """Temporary file + fsync + os.replace: a kill at any moment leaves the previous checkpoint whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as out:
            torch.save(_on_cpu({"format": FORMAT, **content}), out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Tensors and plain data only, through pathseg's checkpoint reader (tensors-only `torch.load` where that
    is safe, the restricted unpickler on older torch); anything else is refused, never unpickled."""
    try:
        content = read_checkpoint(path, "a checkpoint written by pathseg pretrain")
    except PathsegError as error:
        raise PathsegError(
            f"{path}: not a readable pretraining checkpoint ({str(error).splitlines()[0][:160]}); delete it to "
            "start afresh, or rerun with --overwrite"
        ) from None
    if _foreign(content):
        raise PathsegError(
            f"{path}: not a readable pretraining checkpoint (it holds objects other than tensors and plain data, "
            "which are never unpickled); delete it to start afresh, or rerun with --overwrite"
        )
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        raise PathsegError(f"{path}: checkpoint format is not {FORMAT}; delete it or rerun with --overwrite")
    return content


def _foreign(value: Any) -> bool:
    """True if anything in the checkpoint is not a tensor or plain data (the restricted reader's placeholders)."""
    if isinstance(value, dict):
        return any(_foreign(k) or _foreign(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_foreign(v) for v in value)
    return not isinstance(value, torch.Tensor | str | int | float | bool | bytes | type(None))


def remove_stale_temporaries(directory: Path) -> None:
    """Half-written checkpoints of a run killed while saving."""
    for stale in Path(directory).glob(f".{CHECKPOINT}.*"):
        stale.unlink(missing_ok=True)
