"""Built-in random-weight pipelines, generated locally (no hub, nothing on disk but a small tokenizer).

`tiny` is a small SD 1.x pipeline that runs every code path in a second (tests, `velesio up` without a
model). `sd15-random` has the full Stable Diffusion 1.5 architecture (UNet 860M parameters, CLIP ViT-L/14
text encoder, VAE), so that it costs what SD 1.5 costs: for benchmarks on a GPU. Both draw noise.
"""

from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sd_worker.tiny import TINY_SEED, assemble, build_tiny, tokenizer

SD15_UNET: dict[str, Any] = {
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "in_channels": 4,
    "out_channels": 4,
    "sample_size": 64,
}
SD15_VAE: dict[str, Any] = {
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
    "in_channels": 3,
    "out_channels": 3,
    "sample_size": 512,
}
# CLIP ViT-L/14's text tower, as SD 1.5 ships it (its vocabulary size included, so the embedding costs
# what it costs there; the local tokenizer uses only the first ids of it).
SD15_TEXT_ENCODER: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "max_position_embeddings": 77,
    "vocab_size": 49408,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
    "layer_norm_eps": 1e-05,
}


@dataclass(frozen=True)
class Preset:
    name: str
    description: str

    def hash(self, device: torch.device) -> str:
        """A name for these weights: they follow from the preset, its seed and where they were drawn."""
        where = "cpu" if self.name == "tiny" else device.type
        return hashlib.sha256(f"{self.name}:{TINY_SEED}:{where}".encode()).hexdigest()[:10]


PRESETS = {
    "tiny": Preset("tiny", "built-in tiny SD 1.x pipeline with random weights: noise images, for tests only"),
    "sd15-random": Preset(
        "sd15-random",
        "built-in Stable Diffusion 1.5 architecture (UNet 860M, CLIP ViT-L/14 text encoder, VAE) with "
        "random weights: noise images, for benchmarks only",
    ),
}


def build_preset(name: str, cache_dir: Path, device: torch.device, dtype: torch.dtype) -> Any:
    """The preset's StableDiffusionPipeline on `device` in `dtype`."""
    if name == "tiny":
        return place(build_tiny(cache_dir), device, dtype)
    return build_sd15_random(cache_dir, device, dtype)


def place(pipe: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Moves and casts the pipeline's models. (torch's own `Module.to`: diffusers' override warns about
    fp32 modules on every cast, even when the model has none.)"""
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        torch.nn.Module.to(module, device=device, dtype=dtype)
    return pipe


def build_sd15_random(cache_dir: Path, device: torch.device, dtype: torch.dtype) -> Any:
    """SD 1.5's modules with their default random initialisation, drawn on `device` itself (a GPU fills
    a billion parameters in a moment; a CPU takes a while), then cast to `dtype`."""
    from transformers import CLIPTextConfig, CLIPTextModel

    diffusers: Any = importlib.import_module("diffusers")  # untyped
    words = tokenizer(cache_dir)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.device(device):
        torch.manual_seed(TINY_SEED)
        unet = diffusers.UNet2DConditionModel(**SD15_UNET)
        vae = diffusers.AutoencoderKL(**SD15_VAE)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                **SD15_TEXT_ENCODER,
                bos_token_id=words.bos_token_id,
                eos_token_id=words.eos_token_id,
                pad_token_id=words.pad_token_id,
            )
        )
    return place(assemble(vae, text_encoder, words, unet), device, dtype)
