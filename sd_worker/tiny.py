"""The built-in `tiny` preset: a small random-weight SD 1.x pipeline generated locally (no hub).

It exercises every code path (text encoder, UNet, VAE, schedulers) in a second, and draws noise.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

TINY_SEED = 0
_SPECIALS = ("<|startoftext|>", "<|endoftext|>")
_WORDS = ("a", "the", "cat", "dog", "red", "blue", "tree", "house", "sky", "photo", "of", "and")


def _byte_chars() -> list[str]:
    """GPT-2's reversible byte -> printable character table, which CLIP's BPE uses."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def write_tokenizer(folder: Path) -> Path:
    """A small CLIP BPE vocabulary: every byte, every byte ending a word, and a few merged words."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = _byte_chars()
    vocab: list[str] = [*chars, *(c + "</w>" for c in chars)]
    merges: list[str] = []
    for word in _WORDS:
        pieces = [*word[:-1], word[-1] + "</w>"]
        while len(pieces) > 1:
            left, right = pieces[0], pieces[1]
            merges.append(f"{left} {right}")
            merged = left + right
            if merged not in vocab:
                vocab.append(merged)
            pieces = [merged, *pieces[2:]]
    vocab.extend(_SPECIALS)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    unique = list(dict.fromkeys(merges))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(unique) + "\n")
    return folder


def tokenizer(cache_dir: Path) -> Any:
    """A CLIPTokenizer over the small local vocabulary (written under `cache_dir` once)."""
    from transformers import CLIPTokenizer

    folder = write_tokenizer(cache_dir / "tiny-tokenizer")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def scheduler() -> Any:
    """SD 1.x's noise schedule (what the presets' samplers are made from)."""
    diffusers: Any = importlib.import_module("diffusers")  # untyped
    return diffusers.EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
    )


def build_tiny(cache_dir: Path, in_channels: int = 4) -> Any:
    """The tiny StableDiffusionPipeline (float32, CPU), same weights on every call (fixed torch seed).
    `in_channels=9` makes the UNet an inpainting one (latents, mask and masked-image latents in), as SD
    inpainting models are."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    diffusers: Any = importlib.import_module("diffusers")  # untyped

    words = tokenizer(cache_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        unet = diffusers.UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=1,
            sample_size=8,
            in_channels=in_channels,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=4,
            norm_num_groups=16,
        )
        vae = diffusers.AutoencoderKL(
            block_out_channels=(16, 16, 32, 32),  # four blocks: 8x downsampling, as in SD
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            norm_num_groups=16,
            sample_size=32,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                bos_token_id=words.bos_token_id,
                eos_token_id=words.eos_token_id,
                pad_token_id=words.pad_token_id,
                hidden_size=32,
                intermediate_size=37,
                layer_norm_eps=1e-05,
                num_attention_heads=4,
                num_hidden_layers=2,
                vocab_size=len(words),
                max_position_embeddings=77,
            )
        )
    return assemble(vae, text_encoder, words, unet)


def assemble(vae: Any, text_encoder: Any, tokenizer: Any, unet: Any) -> Any:
    """A Stable Diffusion pipeline of these modules (no safety checker), with the presets' scheduler."""
    diffusers: Any = importlib.import_module("diffusers")  # untyped
    return diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
