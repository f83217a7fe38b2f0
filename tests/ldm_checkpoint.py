"""A diffusers StableDiffusionPipeline saved as one checkpoint in the original (LDM / A1111) key layout, the
way SD 1.x `.safetensors` / `.ckpt` files circulate: the exact inverse of the key mapping that diffusers'
single-file loader applies (`diffusers.loaders.single_file_utils`: convert_ldm_unet_checkpoint,
convert_ldm_vae_checkpoint, convert_ldm_clip_checkpoint), so that tests can make such files from the tiny
pipeline instead of downloading one."""

from __future__ import annotations

import re
from typing import Any, cast

import torch
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING as _MAPPING

DIFFUSERS_TO_LDM_MAPPING = cast(dict[str, dict[str, Any]], _MAPPING)  # diffusers -> LDM names

_RESNET = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
)
_VAE_ATTENTION = (
    ("group_norm", "norm"),
    ("to_q", "q"),
    ("to_k", "k"),
    ("to_v", "v"),
    ("to_out.0", "proj_out"),
)


def to_ldm(pipe: Any) -> dict[str, torch.Tensor]:
    """UNet, VAE and CLIP text encoder of `pipe`, in one state dict with SD 1.x key names."""
    state: dict[str, torch.Tensor] = {}
    for key, value in unet_to_ldm(pipe.unet).items():
        state["model.diffusion_model." + key] = value
    for key, value in vae_to_ldm(pipe.vae).items():
        state["first_stage_model." + key] = value
    for key, value in pipe.text_encoder.state_dict().items():
        # transformers >= 5.6 dropped CLIPTextModel's `text_model.` level; the files keep it.
        state["cond_stage_model.transformer.text_model." + key.removeprefix("text_model.")] = value
    return {key: value.detach().contiguous().clone() for key, value in state.items()}


def _resnet(rest: str) -> str:
    for new, old in _RESNET:
        if rest.startswith(new + "."):
            return old + rest[len(new) :]
    return rest


def unet_to_ldm(unet: Any) -> dict[str, torch.Tensor]:
    per_block = unet.config.layers_per_block + 1
    has_attention = {i: "CrossAttn" in name for i, name in enumerate(unet.config.up_block_types)}
    layers = {diffusers: ldm for diffusers, ldm in DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"].items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in unet.state_dict().items():
        out[_unet_key(key, per_block, has_attention, layers)] = value
    return out


def _unet_key(key: str, per_block: int, has_attention: dict[int, bool], layers: dict[str, str]) -> str:
    if key in layers:
        return layers[key]
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, part, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = 1 + block * per_block + layer
        return (
            f"input_blocks.{index}.0.{_resnet(rest)}"
            if part == "resnets"
            else f"input_blocks.{index}.1.{rest}"
        )
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{1 + int(m[1]) * per_block + per_block - 1}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, part, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = block * per_block + layer
        return (
            f"output_blocks.{index}.0.{_resnet(rest)}"
            if part == "resnets"
            else f"output_blocks.{index}.1.{rest}"
        )
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        block = int(m[1])
        place = 2 if has_attention[block] else 1
        return f"output_blocks.{block * per_block + per_block - 1}.{place}.conv.{m[2]}"
    raise ValueError(f"no SD 1.x name for UNet key {key}")


def vae_to_ldm(vae: Any) -> dict[str, torch.Tensor]:
    top = dict(DIFFUSERS_TO_LDM_MAPPING["vae"])
    blocks = len(vae.config.up_block_types)
    out: dict[str, torch.Tensor] = {}
    for key, value in vae.state_dict().items():
        name, tensor = _vae_key(key, blocks, top), value
        if ".mid.attn_1." in name and name.endswith("weight") and value.ndim == 2:
            tensor = value[:, :, None, None]  # LDM's attention projections are 1x1 convolutions
        out[name] = tensor
    return out


def _vae_key(key: str, blocks: int, top: dict[str, str]) -> str:
    if key in top:
        return top[key]
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        rest = m[3].replace("conv_shortcut", "nin_shortcut")
        return f"decoder.up.{blocks - 1 - int(m[1])}.block.{m[2]}.{rest}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        return f"decoder.up.{blocks - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
        rest = m[2]
        for new, old in _VAE_ATTENTION:
            if rest.startswith(new + "."):
                rest = old + rest[len(new) :]
                break
        return f"{m[1]}.mid.attn_1.{rest}"
    raise ValueError(f"no SD 1.x name for VAE key {key}")
