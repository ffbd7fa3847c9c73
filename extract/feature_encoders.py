"""Frozen encoders as dense feature extractors (`extract.encoders`): the comparison PathSegDiff's claim needs.

The LDM is conditioned on an SSL encoder, and a user could run that encoder, or a pathology foundation model,
with the same light head instead. To compare them under one head, an encoder's patch tokens are stored as a
map (B, D, grid, grid), like a decoder block, as `enc:<name>` (its output, after the final norm) and
`enc:<name>@<k>` (block k's raw tokens, for `extract.encoder_layers`).

Names: `hipt_vit_s16` (the paper's conditioning encoder), `timm:<arch>` (a ViT in timm's key layout, read by
plain-torch code, since timm cannot be imported against the CPU torch these machines run), or a `python:`
plugin whose module has `token_maps(x, layers)` (or whose forward returns a (B, D, h, w) map). Each encoder
resizes tiles to its own input size and normalises with its own statistics. Weights are a local file, or the
word `random`, which every record and report carries as `random: true`.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import torch
from pathseg.extract import hipt
from pathseg.extract.ssl_encoders import IMAGENET_MEAN, IMAGENET_STD, weights_digest
from pathseg.extract.ssl_plugins import SPEC as PLUGIN_SPEC
from pathseg.extract.ssl_plugins import is_plugin_spec, load_plugin_encoder
from pathseg.extract.timm_vit import TIMM_VIT_ARCHS, load_timm_vit
from torch import nn
from torch.nn import functional as F

from pathseg.config import ExtractConfig
from pathseg.errors import PathsegError
from pathseg.store.names import encoder_block, safe_name
from pathseg.store.schema import ENCODER_NAME

TIMM_PREFIX = "timm:"
RANDOM = "random"


@dataclass
class FeatureEncoder:
    """An encoder, how it wants its input, and what the store records about it (`identity`)."""

    name: str
    module: nn.Module
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    identity: dict

    @property
    def random(self) -> bool:
        return bool(self.identity.get("random"))

    def blocks(self, layers: list[int]) -> list[str]:
        """The store's block names for this encoder: its output, then each asked layer."""
        return [encoder_block(self.name), *(encoder_block(self.name, k) for k in layers)]

    def prepare(self, images01: torch.Tensor) -> torch.Tensor:
        """Tiles in [0, 1] resized and normalised as the encoder wants them (as SSLEncoder.embed does)."""
        x = images01
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False,
                              antialias=True)
        return (x - x.new_tensor(self.mean).view(1, 3, 1, 1)) / x.new_tensor(self.std).view(1, 3, 1, 1)

    def maps(self, images01: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
        """(B, 3, T, T) tiles in [0, 1] -> one (B, D, h, w) map per block of `blocks(layers)`."""
        x = self.prepare(images01)
        if hasattr(self.module, "token_maps"):
            return list(self.module.token_maps(x, [-1, *layers]))
        if layers:
            raise PathsegError(f"encoder {self.name} has no token_maps(x, layers); extract.encoder_layers needs one")
        out = self.module(x)
        if not isinstance(out, torch.Tensor) or out.ndim != 4:
            raise PathsegError(f"encoder {self.name} returned {getattr(out, 'shape', type(out).__name__)}, not a "
                               "(B, D, h, w) map; give its module token_maps(x, layers) or a forward returning one")
        return [out]


def encoder_weights(config: ExtractConfig, name: str) -> str:
    """The weights setting of one listed encoder: a path, or `random`; none at all is a clear error."""
    weights = config.encoder_weights.get(name)
    if weights is None or not str(weights).strip():
        raise PathsegError(f"encoder {name} has no weights: set extract.encoder_weights.{name} to a local file, or "
                           f"to {RANDOM} for seeded random weights; pathseg downloads nothing")
    weights = str(weights).strip()
    if weights != RANDOM and not Path(weights).is_file():
        raise PathsegError(f"extract.encoder_weights.{name}: {weights} does not exist; give a local weights file "
                           f"or {RANDOM}")
    return weights


NORMALISATIONS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}


def build_feature_encoder(name: str, weights: str, *, trust_checkpoint: bool = False, seed: int = 0,
                          allowed_code: Collection[str] = (), normalisation: str | None = None) -> FeatureEncoder:
    """`allowed_code`: the `python:` names the user wrote themselves; a name read from a store is never imported.
    `normalisation` (extract.encoder_normalisation): imagenet or half, where the weights were not trained with the
    architecture's default (UNI on vit_large_patch16_224); it is part of the identity, as it changes every value."""
    encoder = _build(name.strip(), weights, trust_checkpoint, seed, allowed_code)
    if normalisation is not None:
        encoder.mean, encoder.std = NORMALISATIONS[normalisation]
        encoder.identity["normalisation"] = normalisation
    return encoder


def check_encoder_settings(config: ExtractConfig) -> None:
    """Every listed encoder's name, weights and layers, checked before the diffusion pass (hours on a big store)
    rather than after it; each message names the setting at fault."""
    arrays: dict[str, str] = {}
    for name in dict.fromkeys(n.strip() for n in config.encoders):
        if not ENCODER_NAME.match(encoder_block(name)):
            raise PathsegError(f"extract.encoders: {name!r} may hold only ASCII letters, digits and _ . : @ + -, "
                               "so that its store array and record agree on every file system")
        depth = _depth(name)
        weights = encoder_weights(config, name)
        if is_plugin_spec(name) and weights == RANDOM:
            raise PathsegError(f"extract.encoder_weights.{name}: a python: encoder makes its own weights; give its "
                               "weights file")
        bad = [k for k in config.encoder_layers if depth is not None and not -depth <= k < depth]
        if bad:
            raise PathsegError(f"extract.encoder_layers: {bad} out of range for {name}, which has {depth} blocks "
                               f"(0..{depth - 1}, or -{depth}..-1 from the end)")
        key = safe_name(name).lower()  # one array per name, also on case-insensitive file systems
        if key in arrays:
            raise PathsegError(f"extract.encoders: {arrays[key]} and {name} would share one store array; list one")
        arrays[key] = name


def unknown_encoder(name: str) -> PathsegError:
    known = ", ".join([hipt.NAME, *(TIMM_PREFIX + arch for arch in TIMM_VIT_ARCHS), "python:module:factory"])
    return PathsegError(f"extract.encoders: unknown encoder {name!r}; known: {known}")


def _depth(name: str) -> int | None:
    """Blocks of a named encoder (None for a python: plugin, known once imported); unknown names fail here."""
    if name == hipt.NAME:
        return hipt.DEPTH
    if name.startswith(TIMM_PREFIX) and name[len(TIMM_PREFIX):] in TIMM_VIT_ARCHS:
        return TIMM_VIT_ARCHS[name[len(TIMM_PREFIX):]].depth
    if is_plugin_spec(name) and PLUGIN_SPEC.match(name):
        return None
    raise unknown_encoder(name)


def planned_identity(config: ExtractConfig, name: str, seed: int) -> dict | None:
    """The identity `build_feature_encoder` will record, without building it (None for python: plugins, whose
    identity holds their code)."""
    if is_plugin_spec(name):
        return None
    identity = _weights_identity(encoder_weights(config, name), seed)
    if config.encoder_normalisation.get(name) is not None:
        identity["normalisation"] = config.encoder_normalisation[name]
    return {"encoder": name, **identity}


def _weights_identity(weights: str, seed: int) -> dict:
    is_random = weights == RANDOM
    return {"random": is_random, "weights_digest": None if is_random else weights_digest(Path(weights)),
            **({"seed": seed} if is_random else {})}


def _build(name: str, weights: str, trust_checkpoint: bool, seed: int,
           allowed_code: Collection[str]) -> FeatureEncoder:
    is_random = weights == RANDOM
    identity = {"encoder": name, **_weights_identity(weights, seed)}
    if name.startswith(TIMM_PREFIX):
        arch = name[len(TIMM_PREFIX):]
        module = load_timm_vit(arch, weights, trust_checkpoint=trust_checkpoint, seed=seed)
        spec = TIMM_VIT_ARCHS[arch]
        size = int(getattr(module, "input_size", spec.img_size))
        return FeatureEncoder(name, module.eval().requires_grad_(False), size, tuple(spec.mean), tuple(spec.std),
                              identity)
    if name == hipt.NAME:
        if is_random:
            generator_state = torch.random.fork_rng(devices=[])
            with generator_state:
                torch.manual_seed(seed)
                module = hipt.HIPTViT(grid=hipt.INPUT_SIZE // hipt.PATCH)
        else:
            module = hipt.load_hipt_vit_s16(weights, trust_checkpoint=trust_checkpoint)
        return FeatureEncoder(name, module.eval().requires_grad_(False), hipt.INPUT_SIZE, hipt.HIPT_MEAN,
                              hipt.HIPT_STD, identity)
    if is_plugin_spec(name):
        if name not in allowed_code:
            raise PathsegError(f"encoder {name!r} names code to import, and it did not come from your own config or "
                               "command line; list it in extract.encoders yourself if you trust it")
        if is_random:
            raise PathsegError(f"extract.encoder_weights.{name}: a python: encoder makes its own weights; give its "
                               "weights file")
        identity = {k: v for k, v in identity.items() if k != "seed"}
        loaded = load_plugin_encoder(name, Path(weights))
        identity["code"] = loaded.identity
        return FeatureEncoder(name, loaded.module.eval().requires_grad_(False), loaded.input_size,
                              tuple(loaded.mean), tuple(loaded.std), identity)
    raise unknown_encoder(name)


def configured_encoders(config: ExtractConfig, *, trust_checkpoint: bool = False, seed: int = 0,
                        allowed_code: Collection[str] = ()) -> list[FeatureEncoder]:
    return [build_feature_encoder(name, encoder_weights(config, name), trust_checkpoint=trust_checkpoint, seed=seed,
                                  allowed_code=allowed_code, normalisation=config.encoder_normalisation.get(name))
            for name in dict.fromkeys(n.strip() for n in config.encoders)]
