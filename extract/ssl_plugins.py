"""User-supplied SSL encoders, named `python:package.module:factory` in `conditioning.encoder`.

A lab with its own patch encoder (UNI, CONCH, a fine-tuned DINO...) should not have to edit pathseg to
condition on it: the factory is imported, called with `conditioning.encoder_weights` (a Path or None),
and returns either an `SSLEncoder` (full control over input size and normalisation) or an `nn.Module`
mapping (B, 3, H, W) normalised images to (B, D) embeddings. A bare module may declare `input_size`
(default 224), `mean` and `std` (default ImageNet) as attributes. Its identity, which goes into the
feature store's fingerprint, covers the spec, the weights file and the factory module's source, so
editing the plugin never silently reuses features computed by its old version.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import re
from pathlib import Path

from pathseg.extract.ssl_encoders import IMAGENET_MEAN, IMAGENET_STD, SSLEncoder, weights_digest
from torch import nn

from pathseg.config import CODE_PREFIX
from pathseg.errors import PathsegError

PREFIX = CODE_PREFIX
SPEC = re.compile(r"^python:([A-Za-z_][\w.]*):([A-Za-z_]\w*)$")
DEFAULT_INPUT_SIZE = 224


def is_plugin_spec(name: str) -> bool:
    return name.startswith(PREFIX)


def load_plugin_encoder(spec: str, weights: Path | None) -> SSLEncoder:
    """Import `package.module`, call `factory(weights)`, and wrap what it returns as an `SSLEncoder`."""
    match = SPEC.match(spec.strip())
    if not match:
        raise PathsegError(
            f"SSL encoder {spec!r} is not a plugin spec; write conditioning.encoder as python:package.module:factory"
        )
    module_name, factory_name = match[1], match[2]
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise PathsegError(
            f"SSL encoder {spec!r}: cannot import {module_name} ({error}); install it or add it to PYTHONPATH"
        ) from None
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise PathsegError(f"SSL encoder {spec!r}: {module_name} has no callable {factory_name}")
    built = factory(weights)
    if isinstance(built, SSLEncoder):
        encoder = built
    elif isinstance(built, nn.Module):
        encoder = SSLEncoder(
            built,
            input_size=int(getattr(built, "input_size", DEFAULT_INPUT_SIZE)),
            mean=tuple(getattr(built, "mean", IMAGENET_MEAN)),
            std=tuple(getattr(built, "std", IMAGENET_STD)),
        )
    else:
        raise PathsegError(
            f"SSL encoder {spec!r}: {factory_name} returned {type(built).__name__}; it must return an nn.Module "
            "mapping images to embeddings, or an SSLEncoder"
        )
    if not encoder.identity:
        encoder.identity = _identity(spec, weights, module)
    return encoder


def _identity(spec: str, weights: Path | None, module: object) -> str:
    weights_part = weights_digest(Path(weights)) if weights is not None else "no-weights"
    try:
        source = inspect.getsource(module)  # type: ignore[arg-type]
        code_part = hashlib.sha256(source.encode()).hexdigest()[:16]
    except (OSError, TypeError):
        code_part = str(getattr(module, "__version__", "unknown"))
    return f"{spec}:{weights_part}:code={code_part}"
