"""SSL encoders: an embedding model and the input it wants, and the registry of encoders known by name.

Apart from `conditioning.py` so that the built-in encoders (`hipt.py`) and plugins (`ssl_plugins.py`) can
register and wrap encoders without importing the conditioning that uses them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from pathseg.registry import Registry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class SSLEncoder:
    """An embedding model and the input it expects; `identity` goes into the store's fingerprint."""

    module: nn.Module
    input_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    identity: str = ""

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Embeddings of (B, 3, H, W) images in [0, 1], resized and normalised as the encoder was trained."""
        if images.shape[-1] != self.input_size or images.shape[-2] != self.input_size:
            images = F.interpolate(
                images, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False, antialias=True
            )
        mean = images.new_tensor(self.mean).view(1, 3, 1, 1)
        std = images.new_tensor(self.std).view(1, 3, 1, 1)
        return self.module((images - mean) / std)


# factory(weights, trust_checkpoint=False): weights is a local file or None; trust_checkpoint lets it unpickle in full.
SSL_ENCODERS: Registry[Callable[..., SSLEncoder]] = Registry("SSL encoder")


def weights_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
