"""The original LDM's parameter names, mapped to diffusers': key prefixes of each component, and the renaming
of UNet and VQ keys. Pure string functions, apart from the conversion that checks shapes and values.
"""

from __future__ import annotations

import re

UNET_PREFIX = "model.diffusion_model."


FIRST_STAGE_PREFIX = "first_stage_model."


COND_PREFIX = "cond_stage_model."


COMPONENT_PREFIXES = {"unet": UNET_PREFIX, "first_stage": FIRST_STAGE_PREFIX, "projector": COND_PREFIX}


_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}


_VQ_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _resnet(rest: str, names: dict[str, str]) -> str:
    head, _, tail = rest.partition(".")
    return f"{names.get(head, head)}.{tail}"


def ldm_unet_key(key: str, layers: int, attention_up: list[bool]) -> str:
    """openaimodel's name for a diffusers UNet2DConditionModel parameter (input/middle/output_blocks numbering)."""
    per = layers + 1
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    module, _, leaf = key.rpartition(".")
    if module in fixed:
        return f"{fixed[module]}.{leaf}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"input_blocks.{1 + int(m[1]) * per + int(m[2])}.0.{_resnet(m[3], _RESNET)}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
        return f"input_blocks.{1 + int(m[1]) * per + int(m[2])}.1.{m[3]}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * per}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2], _RESNET)}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"output_blocks.{int(m[1]) * per + int(m[2])}.0.{_resnet(m[3], _RESNET)}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
        return f"output_blocks.{int(m[1]) * per + int(m[2])}.1.{m[3]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        i = int(m[1])
        return f"output_blocks.{i * per + layers}.{2 if attention_up[i] else 1}.conv.{m[2]}"
    raise RuntimeError(f"pathseg has no original LDM name for diffusers UNet parameter {key!r}")


def ldm_vq_key(key: str, levels: int) -> str:
    """The taming/LDM autoencoder's name for a diffusers VQModel parameter."""
    if key.startswith(("quant_conv.", "post_quant_conv.", "quantize.")):
        return key
    part, _, rest = key.partition(".")
    module, _, leaf = rest.rpartition(".")
    if module in ("conv_in", "conv_out"):
        return key
    if module == "conv_norm_out":
        return f"{part}.norm_out.{leaf}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest):
        return f"{part}.down.{m[1]}.block.{m[2]}.{_resnet(m[3], {'conv_shortcut': 'nin_shortcut'})}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", rest):
        return f"{part}.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest):
        level = levels - 1 - int(m[1])
        return f"{part}.up.{level}.block.{m[2]}.{_resnet(m[3], {'conv_shortcut': 'nin_shortcut'})}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", rest):
        return f"{part}.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(.+)", rest):
        return f"{part}.mid.block_{int(m[1]) + 1}.{_resnet(m[2], {'conv_shortcut': 'nin_shortcut'})}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)\.(weight|bias)", rest):
        if m[1] in _VQ_ATTENTION:
            return f"{part}.mid.attn_1.{_VQ_ATTENTION[m[1]]}.{m[2]}"
    raise RuntimeError(f"pathseg has no original LDM name for diffusers VQModel parameter {key!r}")
