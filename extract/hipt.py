"""HIPT's ViT-S/16 (DINO, 256 px tiles at 20x): the patch encoder whose CLS token conditions the paper's LDM.

Written in plain torch so no timm/HIPT code is needed, and loaded from a local copy of HIPT's
`vit256_small_dino.pth` (its weights cannot be downloaded from here). The module's parameter names are
the original ones, so the file loads once its DINO wrappers (`teacher`, `module.`, `backbone.`) are
stripped, and any other mismatch is reported key by key.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from pathseg.extract.ssl_encoders import SSL_ENCODERS, SSLEncoder, weights_digest
from pathseg.extract.timm_vit import patch_token_maps
from torch import nn
from torch.nn import functional as F

from pathseg.errors import PathsegError
from pathseg.loading.checkpoints import load_checkpoint

NAME = "hipt_vit_s16"
# HIPT's eval_transforms normalise with mean = std = 0.5 (images to [-1, 1]), not ImageNet statistics.
HIPT_MEAN = (0.5, 0.5, 0.5)
HIPT_STD = (0.5, 0.5, 0.5)
INPUT_SIZE = 256
EMBED_DIM, DEPTH, HEADS, PATCH, MLP_RATIO = 384, 12, 6, 16, 4
WRAPPERS = ("module.", "backbone.")  # DistributedDataParallel and DINO's multi-crop wrapper
IGNORED = ("head.",)  # the DINO projection head: training only
SHOWN = 5


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
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


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, dim * mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, dim: int, patch: int) -> None:
        super().__init__()
        self.patch_size = patch
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class HIPTViT(nn.Module):
    """DINO ViT returning the final-norm CLS token.

    `grid` is the side of the position-embedding grid the weights were trained with (HIPT builds its
    ViT-256 with the default 224 px, 14 x 14, and interpolates to 16 x 16 for 256 px tiles).
    """

    def __init__(self, grid: int = 14, dim: int = EMBED_DIM, depth: int = DEPTH, heads: int = HEADS,
                 patch: int = PATCH, mlp_ratio: int = MLP_RATIO) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(dim, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def position_embedding(self, rows: int, cols: int) -> torch.Tensor:
        """Bicubic resize of the patch position grid, with DINO's +0.1 scale-factor nudge so results match."""
        grid = int(math.sqrt(self.pos_embed.shape[1] - 1))
        if rows == cols == grid:
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        dim = patch_pos.shape[-1]
        patch_pos = F.interpolate(
            patch_pos.reshape(1, grid, grid, dim).permute(0, 3, 1, 2),
            scale_factor=((rows + 0.1) / grid, (cols + 0.1) / grid),
            mode="bicubic",
        )
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat([cls_pos, patch_pos], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patch = self.patch_embed.patch_size
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1)
        tokens = tokens + self.position_embedding(x.shape[-2] // patch, x.shape[-1] // patch)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)[:, 0]

    def token_maps(self, x: torch.Tensor, layers: list[int] | None = None) -> list[torch.Tensor]:
        """HIPT as a dense encoder, with TimmViT.token_maps' contract (DINO's key layout is timm's): one
        (B, 384, H/16, W/16) map per block index, the last normed, earlier ones raw; positions resized DINO's way."""
        return self.embed_and_maps(x, layers)[1]

    def embed_and_maps(self, x: torch.Tensor,
                       layers: list[int] | None = None) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """`forward`'s CLS embedding and `token_maps` from one pass, so extraction that conditions on HIPT and
        stores its maps runs the ViT once per tile (the embedding is None unless the last block is asked)."""
        patch = self.patch_embed.patch_size
        rows, cols = x.shape[-2] // patch, x.shape[-1] // patch
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), self.patch_embed(x)], dim=1)
        tokens = tokens + self.position_embedding(rows, cols)
        normed: list[torch.Tensor] = []

        def final_norm(last: torch.Tensor) -> torch.Tensor:
            normed.append(self.norm(last))
            return normed[-1]

        maps = patch_token_maps(tokens, self.blocks, final_norm, layers, 1, (rows, cols))
        return (normed[0][:, 0] if normed else None), maps


def hipt_state_dict(loaded: object, path: Path) -> dict[str, torch.Tensor]:
    """The ViT's weights from a DINO/HIPT file: the teacher (as HIPT's get_vit256 takes it), wrappers stripped."""
    state = loaded
    if isinstance(state, dict):
        for key in ("teacher", "state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise PathsegError(f"{path} holds no ViT state dict; pass HIPT's vit256_small_dino.pth")
    odd = [repr(k)[:60] for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if odd:
        raise PathsegError(f"{path}: {len(odd)} state dict entries are not named tensors ({_listing(odd)}); "
                           "pass HIPT's vit256_small_dino.pth")
    cleaned = {}
    for key, value in state.items():
        while key.startswith(WRAPPERS):
            key = key.split(".", 1)[1]
        if not key.startswith(IGNORED):
            cleaned[key] = value
    return cleaned


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:SHOWN])
    return f"{shown} (+{len(items) - SHOWN} more)" if len(items) > SHOWN else shown


def load_hipt_vit_s16(path: Path | str, *, trust_checkpoint: bool = False) -> HIPTViT:
    """HIPT's ViT-S/16 from a local file, read as data (DINO's pickled `args` become placeholders) unless
    trusted; missing, unexpected or mis-shaped keys fail in one line."""
    path = Path(path)
    loaded = load_checkpoint(path, "HIPT's vit256_small_dino.pth (conditioning.encoder_weights)",
                             trust=trust_checkpoint)
    state = hipt_state_dict(loaded, path)
    positions = state.get("pos_embed")
    grid = math.isqrt(positions.shape[1] - 1) if isinstance(positions, torch.Tensor) and positions.ndim == 3 else 14
    model = HIPTViT(grid=grid)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [f"{k} {list(v.shape)} (ViT-S/16 needs {list(expected[k])})"
                 for k, v in state.items() if k in expected and tuple(v.shape) != expected[k]]
    parts = [f"{len(keys)} {kind}: {_listing(keys)}"
             for kind, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if keys]
    if parts:
        raise PathsegError(f"{path} is not a HIPT ViT-S/16 (DINO) checkpoint: {'; '.join(parts)}; "
                           "pass HIPT's vit256_small_dino.pth")
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval().requires_grad_(False)


@SSL_ENCODERS.register(NAME)
def hipt_vit_s16(weights: Path | None, *, trust_checkpoint: bool = False) -> SSLEncoder:
    """The paper's 20x patch encoder: 256 px tiles, HIPT's own normalisation, the 384-d CLS embedding."""
    if weights is None:
        raise PathsegError(
            f"SSL encoder {NAME} needs its weights: set conditioning.encoder_weights to a local copy of HIPT's "
            "vit256_small_dino.pth (mahmoodlab/HIPT); pathseg downloads nothing"
        )
    module = load_hipt_vit_s16(weights, trust_checkpoint=trust_checkpoint)
    return SSLEncoder(module, input_size=INPUT_SIZE, mean=HIPT_MEAN, std=HIPT_STD,
                      identity=f"{NAME}:{weights_digest(Path(weights))}")
