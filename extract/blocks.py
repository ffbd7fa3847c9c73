"""Names of the UNet decoder layers that features can be taken from, and hooks that capture them.

`up{i}.{j}` is diffusers' `up_blocks[i]`, layer j (resnet, then its attention when the block has one,
before any upsampler); `up{i}` is the whole block's output (after its upsampler); `mid` is the
middle block. Papers name layers by the original LDM `output_blocks[k]`; that module ends with the
upsampler on a block's last layer, so `output_blocks.k` maps to `up{i}` there and to `up{i}.{j}`
elsewhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from pathseg.errors import PathsegError

LAYER = re.compile(r"^up(\d+)\.(\d+)$")
BLOCK = re.compile(r"^up(\d+)$")
ALIAS = re.compile(r"^output_blocks(?:\.|\[)(\d+)\]?$")


@dataclass(frozen=True)
class BlockInfo:
    name: str
    channels: int
    downsample: int  # spatial size = latent size // downsample
    order: int  # position in the forward pass, so capture can stop after the last block needed


@dataclass(frozen=True)
class UNetLayout:
    """What block names depend on; readable from a config file, so names resolve without building a model."""

    block_out_channels: tuple[int, ...]
    layers: int  # layers per decoder block (encoder's layers_per_block + 1)

    @classmethod
    def of(cls, unet: UNet2DConditionModel | dict) -> UNetLayout:
        config = unet if isinstance(unet, dict) else unet.config
        per_block = config["layers_per_block"]
        if not isinstance(per_block, int):
            per_block = per_block[0]
        return cls(tuple(config["block_out_channels"]), per_block + 1)


def block_table(unet: UNet2DConditionModel | dict | UNetLayout) -> dict[str, BlockInfo]:
    """Every extractable block, in forward order. The last decoder block is the only one without an upsampler."""
    layout = unet if isinstance(unet, UNetLayout) else UNetLayout.of(unet)
    channels = list(layout.block_out_channels)
    levels = len(channels)
    table = {"mid": BlockInfo("mid", channels[-1], 2 ** (levels - 1), 0)}
    order = 1
    for i in range(levels):
        width = channels[levels - 1 - i]
        scale = 2 ** (levels - 1 - i)
        for j in range(layout.layers):
            table[f"up{i}.{j}"] = BlockInfo(f"up{i}.{j}", width, scale, order)
            order += 1
        upsampled = scale // 2 if i < levels - 1 else scale
        table[f"up{i}"] = BlockInfo(f"up{i}", width, upsampled, order)
        order += 1
    return table


def canonical_block(name: str, unet: UNet2DConditionModel | dict | UNetLayout) -> str:
    """The canonical name for a block or an alias; an unknown name lists the valid ones."""
    layout = unet if isinstance(unet, UNetLayout) else UNetLayout.of(unet)
    table = block_table(layout)
    levels = len(layout.block_out_channels)
    text = name.strip().replace(" ", "")
    alias = ALIAS.match(text)
    if alias:
        i, j = divmod(int(alias.group(1)), layout.layers)
        if i < levels:
            text = f"up{i}" if (j == layout.layers - 1 and i < levels - 1) else f"up{i}.{j}"
    elif text in ("middle_block", "mid_block"):
        text = "mid"
    if text not in table:
        valid = ", ".join(table)
        last = levels * layout.layers - 1
        raise PathsegError(f"unknown block {name!r}; valid blocks are: {valid} (or output_blocks.K, K = 0..{last})")
    return text


def block_module(unet: UNet2DConditionModel, name: str) -> nn.Module:
    if name == "mid":
        return unet.mid_block
    block = BLOCK.match(name)
    if block:
        return unet.up_blocks[int(block.group(1))]
    layer = LAYER.match(name)
    if not layer:
        raise PathsegError(f"unknown block {name!r}")
    up_block = unet.up_blocks[int(layer.group(1))]
    j = int(layer.group(2))
    attentions = getattr(up_block, "attentions", None)
    return attentions[j] if attentions is not None else up_block.resnets[j]


class _Enough(Exception):
    """Raised from the last hook needed: the rest of the UNet would compute features nobody stores."""


def _tensor(output: object) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple):
        return output[0]
    return output.sample  # Transformer2DModelOutput


class FeatureCapture:
    """The outputs of chosen blocks, from forward hooks registered once and kept until `close`.

    Hooks stay for the capture's life, so a `torch.compile`d UNet sees the same modules on every call and
    compiles once (hooks added and removed per call made it recompile each time). Without compile the last
    hook needed stops the forward pass by raising; under compile that exception would break the graph, so
    the pass runs to the end instead (for the default blocks, whose last is the decoder's last layer, that is
    only the output convolution).
    """

    def __init__(self, unet: UNet2DConditionModel, names: list[str], stop_early: bool | None = None) -> None:
        table = block_table(unet)
        self.unet = unet
        self.names = list(dict.fromkeys(canonical_block(n, unet) for n in names))
        self.last = max(self.names, key=lambda n: table[n].order)
        self.stop_early = not is_compiled(unet) if stop_early is None else stop_early
        self._captured: dict[str, torch.Tensor] = {}
        self._active = False  # hooks of another capture on the same UNet stay silent while this one runs
        self._handles = [block_module(unet, name).register_forward_hook(self._hook_for(name)) for name in self.names]

    def _hook_for(self, name: str):
        def hook(_module: nn.Module, _inputs: object, output: object) -> None:
            if not self._active:
                return
            self._captured[name] = _tensor(output)
            if self.stop_early and name == self.last:
                raise _Enough

        return hook

    def __call__(
        self, latents: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        if not self._handles:
            raise RuntimeError("this FeatureCapture was closed")
        self._captured, self._active = {}, True
        try:
            self.unet(latents, timesteps, encoder_hidden_states=context, return_dict=False)
        except _Enough:
            pass
        finally:
            self._active = False
        captured, self._captured = self._captured, {}
        missing = [n for n in self.names if n not in captured]
        if missing:
            raise RuntimeError(f"blocks {missing} were never reached in the UNet's forward pass")
        return {n: captured[n] for n in self.names}

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> FeatureCapture:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def is_compiled(module: nn.Module) -> bool:
    return hasattr(module, "_orig_mod")  # torch.compile's OptimizedModule wraps the original module
