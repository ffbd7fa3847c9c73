"""Vision Transformers in timm's key layout, in plain torch, as frozen dense feature encoders.

Pathology foundation models (UNI: vit_large_patch16_224 with layer scale 1e-5; Phikon-like ViT-B; DINO ViTs)
ship as timm state dicts, but timm cannot be imported against the CPU torch these machines run. Names here
are timm's, so a file loads once containers, wrappers and the classifier are dropped; anything else that does
not fit is reported in one line instead of being silently skipped.

Checked against timm's vision_transformer.py: hyper-parameters; each arch's default pretrained cfg (mean =
std = 0.5, except vit_small_patch8_224 whose only cfg is DINO's, with ImageNet statistics); `pos_embed` covers
every prefix token (cls and registers) unless `no_embed_class` (set by all timm register models: patches only);
resample_abs_pos_embed resizes bicubic with antialias=True (its default since timm 0.8, used on the fly with
dynamic_img_size, as UNI runs, and when loading at another size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from pathseg.extract.ssl_encoders import IMAGENET_MEAN, IMAGENET_STD, weights_digest
from torch import nn
from torch.nn import functional as F

from pathseg.errors import PathsegError
from pathseg.loading.checkpoints import load_checkpoint
from pathseg.loading.data_files import read_safetensors

RANDOM = "random"
INCEPTION_MEAN = INCEPTION_STD = (0.5, 0.5, 0.5)  # timm's IMAGENET_INCEPTION_*: images to [-1, 1]
CONTAINERS = ("teacher", "state_dict", "model")  # DINO, Lightning / generic, timm train.py / MAE
WRAPPERS = ("module.", "model.", "backbone.", "encoder.")  # DDP, timm EMA/wrappers, DINO multi-crop, IJEPA-like
CLASSIFIER = ("head.", "head_drop", "fc_norm.")  # the ImageNet head: unused by a dense encoder
ANCHOR = "patch_embed.proj.weight"  # every ViT has it, so its prefix in a file is the wrapper prefix
SHOWN = 5


@dataclass(frozen=True)
class VitArch:
    """One timm ViT: the shapes needed to build it and the normalisation its default weights were trained with."""

    embed_dim: int
    depth: int
    heads: int
    patch: int
    img_size: int = 224
    mlp_ratio: float = 4.0
    init_values: float | None = None  # layer scale (ls1/ls2.gamma); None = none, as timm's `if init_values`
    reg_tokens: int = 0
    class_token: bool = True
    no_embed_class: bool = False  # True: pos_embed covers patches only (timm's register models, DINOv2)
    mean: tuple[float, float, float] = INCEPTION_MEAN
    std: tuple[float, float, float] = INCEPTION_STD


TIMM_VIT_ARCHS: dict[str, VitArch] = {
    "vit_tiny_patch16_224": VitArch(192, 12, 3, 16),
    "vit_small_patch16_224": VitArch(384, 12, 6, 16),
    "vit_base_patch16_224": VitArch(768, 12, 12, 16),
    "vit_large_patch16_224": VitArch(1024, 24, 16, 16),  # UNI: this with init_values=1e-5, ImageNet statistics
    "vit_small_patch8_224": VitArch(384, 12, 6, 8, mean=IMAGENET_MEAN, std=IMAGENET_STD),  # only cfg: DINO
    "vit_base_patch8_224": VitArch(768, 12, 12, 8),
}


def vit_arch(arch: str) -> VitArch:
    if arch not in TIMM_VIT_ARCHS:
        raise PathsegError(f"unknown timm ViT {arch!r}; known: {', '.join(TIMM_VIT_ARCHS)}")
    return TIMM_VIT_ARCHS[arch]


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, init_values: float | None) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, dim: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)


class TimmViT(nn.Module):
    """timm's VisionTransformer minus its head, answering token maps rather than a pooled vector.

    `grid` is the side of the position grid the weights were trained at (224 px / 16 = 14 by default; a file
    trained on 256 px tiles brings 16); `input_size` is the tile size that needs no position resampling.
    `pos_antialias` follows timm (True); False gives the older `resize_pos_embed` behaviour.
    """

    def __init__(self, arch: VitArch, grid: int | None = None, pos_antialias: bool = True) -> None:
        super().__init__()
        self.arch, self.pos_antialias = arch, pos_antialias
        self.grid = grid or arch.img_size // arch.patch
        self.input_size = self.grid * arch.patch
        self.num_prefix_tokens = int(arch.class_token) + arch.reg_tokens
        dim = arch.embed_dim
        self.patch_embed = PatchEmbed(dim, arch.patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if arch.class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, arch.reg_tokens, dim)) if arch.reg_tokens else None
        pos_prefix = 0 if arch.no_embed_class else self.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid**2 + pos_prefix, dim))
        self.blocks = nn.ModuleList(Block(dim, arch.heads, arch.mlp_ratio, arch.init_values)
                                    for _ in range(arch.depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self._init_random()

    def _init_random(self) -> None:
        """timm's default ('') init, so a `random` baseline is the network timm would train from."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for token in (self.cls_token, self.reg_token):
            if token is not None:
                nn.init.normal_(token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def position_embedding(self, rows: int, cols: int) -> torch.Tensor:
        """Bicubic resize of the patch part only, as timm's resample_abs_pos_embed (prefix positions are kept)."""
        if rows == cols == self.grid:
            return self.pos_embed
        prefix = 0 if self.arch.no_embed_class else self.num_prefix_tokens
        head, patches = self.pos_embed[:, :prefix], self.pos_embed[:, prefix:]
        dim = patches.shape[-1]
        patches = patches.float().reshape(1, self.grid, self.grid, dim).permute(0, 3, 1, 2)
        patches = F.interpolate(patches, size=(rows, cols), mode="bicubic", antialias=self.pos_antialias)
        patches = patches.permute(0, 2, 3, 1).reshape(1, rows * cols, dim).to(self.pos_embed.dtype)
        return torch.cat([head, patches], dim=1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens entering block 0: prefix tokens first, as timm orders them (cls, then registers)."""
        patch = self.arch.patch
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[-2] % patch or x.shape[-1] % patch:
            raise PathsegError(f"timm ViT input must be (B, 3, H, W) with H and W multiples of {patch}, "
                               f"got {tuple(x.shape)}")
        tokens = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        pos = self.position_embedding(x.shape[-2] // patch, x.shape[-1] // patch)
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if self.arch.no_embed_class:
            return torch.cat([*prefix, tokens + pos], dim=1)
        return torch.cat([*prefix, tokens], dim=1) + pos

    def token_maps(self, x: torch.Tensor, layers: list[int] | None = None) -> list[torch.Tensor]:
        """One (B, D, H/p, W/p) map per block index in `layers` (default [-1]); see `patch_token_maps`."""
        patch = self.arch.patch
        return patch_token_maps(self.embed(x), self.blocks, self.norm, layers, self.num_prefix_tokens,
                                (x.shape[-2] // patch, x.shape[-1] // patch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.token_maps(x)[0]


def patch_token_maps(tokens: torch.Tensor, blocks: nn.ModuleList, norm: nn.Module, layers: list[int] | None,
                     prefix: int, grid: tuple[int, int]) -> list[torch.Tensor]:
    """Patch tokens of the asked blocks (0-based, negative from the end) as (B, D, rows, cols) maps.

    The last block's tokens go through the final norm, so `-1` is timm's forward_features; earlier blocks are
    returned raw, as timm's forward_intermediates(norm=False) returns them (that call leaves even the last
    block raw; it is normed here because the final norm is part of what the encoder was trained to output).
    Blocks after the deepest asked one are not run.
    """
    depth = len(blocks)
    asked = [-1] if layers is None else list(layers)
    bad = [i for i in asked if not -depth <= i < depth]
    if bad or not asked:
        raise PathsegError(f"ViT block indices {bad or asked} out of range: this ViT has {depth} blocks "
                           f"(0..{depth - 1}, or -{depth}..-1 from the end)")
    take = [i % depth for i in asked]
    found: dict[int, torch.Tensor] = {}
    for index, block in enumerate(blocks[: max(take) + 1]):
        tokens = block(tokens)
        if index in take:
            found[index] = norm(tokens) if index == depth - 1 else tokens
    rows, cols = grid
    return [found[i][:, prefix:].transpose(1, 2).reshape(tokens.shape[0], -1, rows, cols) for i in take]


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:SHOWN])
    return f"{shown} (+{len(items) - SHOWN} more)" if len(items) > SHOWN else shown


def timm_state_dict(loaded: object, path: Path) -> dict[str, torch.Tensor]:
    """The ViT's tensors from the ways such files are saved: containers unwrapped, wrappers and head dropped."""
    state = loaded
    while isinstance(state, dict) and any(isinstance(state.get(k), dict) for k in CONTAINERS):
        state = next(state[k] for k in CONTAINERS if isinstance(state.get(k), dict))
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise PathsegError(f"{path} holds no ViT state dict; pass a timm ViT's weights (a state dict of tensors)")
    odd = [repr(k)[:60] for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if odd:
        raise PathsegError(f"{path}: {len(odd)} state dict entries are not named tensors ({_listing(odd)}); "
                           "pass a timm ViT's weights")
    if ANCHOR not in state:
        anchored = [k[: -len(ANCHOR)] for k in state if k.endswith("." + ANCHOR)]
        prefixes = [p for p in anchored if all(f"{part}." in WRAPPERS for part in p[:-1].split("."))]
        if len(prefixes) == 1:  # keys outside the wrapper (DINO's head beside `backbone.`) are not the ViT's
            state = {k[len(prefixes[0]):]: v for k, v in state.items() if k.startswith(prefixes[0])}
        else:
            while len(state) and (wrap := next((w for w in WRAPPERS if all(k.startswith(w) for k in state)), None)):
                state = {k[len(wrap):]: v for k, v in state.items()}
    return {k: v for k, v in state.items() if not k.startswith(CLASSIFIER)}


def _file_arch(state: dict[str, torch.Tensor], spec: VitArch, init_values: float | None) -> tuple[VitArch, int | None]:
    """The arch as the file has it: layer scale and registers if present, and its position grid and layout."""
    if init_values is None and "blocks.0.ls1.gamma" in state:
        init_values = 1e-5  # the value is overwritten by the file's gammas; only presence matters
    reg = state.get("reg_token")
    reg_tokens = reg.shape[1] if isinstance(reg, torch.Tensor) and reg.ndim == 3 else spec.reg_tokens
    spec = replace(spec, init_values=init_values if init_values is not None else spec.init_values,
                   reg_tokens=reg_tokens)
    pos = state.get("pos_embed")
    if isinstance(pos, torch.Tensor) and pos.ndim == 3:
        prefix = int(spec.class_token) + spec.reg_tokens
        for no_embed_class in (spec.no_embed_class, not spec.no_embed_class):
            patches = pos.shape[1] - (0 if no_embed_class else prefix)
            side = math.isqrt(max(patches, 0))
            if side and side * side == patches:
                return replace(spec, no_embed_class=no_embed_class), side
    return spec, None


def load_timm_vit(arch: str, weights: Path | str, *, init_values: float | None = None,
                  trust_checkpoint: bool = False, seed: int = 0) -> TimmViT:
    """A frozen timm ViT from a local file (read as data unless trusted), or seeded random weights (`random`).

    `init_values` matters for `random` (UNI-style layer scale); for a file, layer scale, registers and the
    position grid are taken from the file, and a given `init_values` insists that the file has layer scale.
    """
    spec = vit_arch(arch)
    if isinstance(weights, str) and weights == RANDOM:
        with torch.random.fork_rng(devices=[]):  # the caller's RNG stream is left as it was
            torch.manual_seed(seed)
            model = TimmViT(spec if init_values is None else replace(spec, init_values=init_values))
        return model.eval().requires_grad_(False)
    path = Path(weights)
    what = f"a timm {arch} state dict (.pth/.bin/.safetensors)"
    if not path.is_file():
        raise PathsegError(f"{path} does not exist; pass {what} or {RANDOM}")
    if path.suffix == ".safetensors":
        loaded = read_safetensors(path, f"pass {what}")
    else:
        loaded = load_checkpoint(path, what, trust=trust_checkpoint)
    state = timm_state_dict(loaded, path)
    file_spec, grid = _file_arch(state, spec, init_values)
    with torch.device("meta"):  # shapes only: the file provides every value (checked below)
        model = TimmViT(file_spec, grid=grid)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [f"{k} {list(v.shape)} ({arch} needs {list(expected[k])})"
                 for k, v in state.items() if k in expected and tuple(v.shape) != expected[k]]
    parts = [f"{len(keys)} {kind}: {_listing(keys)}"
             for kind, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if keys]
    if parts:
        raise PathsegError(f"{path} is not a timm {arch} checkpoint: {'; '.join(parts)}; check the arch name "
                           f"(known: {', '.join(TIMM_VIT_ARCHS)}) and init_values, or pass {what}")
    model.load_state_dict({k: v.float().contiguous() for k, v in state.items()}, assign=True)
    return model.eval().requires_grad_(False)


def weights_identity(arch: str, weights: Path | str) -> str:
    """What the store fingerprints: the arch and the file's bytes, so renamed copies of a file agree."""
    vit_arch(arch)
    if isinstance(weights, str) and weights == RANDOM:
        return f"timm:{arch}:{RANDOM}"
    if not Path(weights).is_file():
        raise PathsegError(f"{weights} does not exist; pass a timm {arch} weights file or {RANDOM}")
    return f"timm:{arch}:{weights_digest(Path(weights))}"
