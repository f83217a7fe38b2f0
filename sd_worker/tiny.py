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


def build_tiny(cache_dir: Path, torch_dtype: Any) -> Any:
    """The tiny StableDiffusionPipeline, same weights on every call (fixed torch seed)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    diffusers: Any = importlib.import_module("diffusers")  # untyped

    tokenizer_dir = write_tokenizer(cache_dir / "tiny-tokenizer")
    tokenizer = CLIPTokenizer(
        str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt"), model_max_length=77
    )
    state = torch.random.get_rng_state()
    torch.manual_seed(TINY_SEED)
    try:
        unet = diffusers.UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=1,
            sample_size=8,
            in_channels=4,
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
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                hidden_size=32,
                intermediate_size=37,
                layer_norm_eps=1e-05,
                num_attention_heads=4,
                num_hidden_layers=2,
                vocab_size=len(tokenizer),
                max_position_embeddings=77,
            )
        )
    finally:
        torch.random.set_rng_state(state)
    scheduler = diffusers.EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
    )
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipe if torch_dtype == torch.float32 else pipe.to(dtype=torch_dtype)
