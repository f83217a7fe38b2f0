"""Loading one model into memory: a preset, a diffusers folder or a single-file checkpoint (offline, with a
local config folder), an optional VAE in place of its own, and the txt2img, img2img and inpaint pipelines
that share its modules."""

from __future__ import annotations

import importlib
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from mesh.errors import StartupError
from sd_worker.lora import LoraLibrary
from sd_worker.pipelines import FillInpaintPipeline
from sd_worker.presets import build_preset, place
from sd_worker.types import ModelCard

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
_UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"  # [320, in_channels, 3, 3] in SD 1.x checkpoints
_LOAD_ERRORS = (
    OSError,
    ValueError,
    RuntimeError,
    TypeError,
    KeyError,
    pickle.UnpicklingError,
    SafetensorError,
)


class ModelLoadError(StartupError):
    pass


@dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from: `kind` "preset", "folder" or "file"; `location` the preset name or path."""

    id: str
    kind: str
    location: str

    @property
    def path(self) -> Path:
        return Path(self.location)


@dataclass(frozen=True)
class LoadOptions:
    device: torch.device
    dtype: torch.dtype
    cache_dir: Path
    checkpoint_config: Path | None = None  # diffusers config folder for single-file checkpoints
    vae: Path | None = None  # VAE in place of each model's own
    lora_dir: Path | None = None


@dataclass
class LoadedModel:
    card: ModelCard
    pipes: dict[str, Any]  # mode ("txt2img", "img2img", "inpaint") -> diffusers pipeline
    device: torch.device
    dtype: torch.dtype
    scheduler_config: Any
    lora: LoraLibrary
    inpainting: bool  # a 9-channel inpainting UNet: every mode runs the inpaint pipeline

    @property
    def base(self) -> Any:
        return self.pipes["txt2img"]

    @property
    def nbytes(self) -> int:
        """Memory its weights take (parameters and buffers of the UNet, VAE and text encoder)."""
        base = self.base
        total = 0
        for module in (base.unet, base.vae, base.text_encoder):
            for tensor in (*module.parameters(), *module.buffers()):
                total += tensor.numel() * tensor.element_size()
        return total


def pick_device(name: str) -> tuple[torch.device, torch.dtype]:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda"), torch.float16
    return torch.device("cpu"), torch.float32


def load_model(spec: ModelSpec, card: ModelCard, options: LoadOptions) -> LoadedModel:
    """The model's pipelines on the options' device; ModelLoadError when it does not load (a bad file, too
    little GPU memory, a device torch was not built for)."""
    try:
        return _load_model(spec, card, options)
    except ModelLoadError:
        raise
    except (*_LOAD_ERRORS, AssertionError) as exc:  # torch asserts on a device it was not built for
        raise ModelLoadError(f"{spec.location}: {exc}") from exc


def _load_model(spec: ModelSpec, card: ModelCard, options: LoadOptions) -> LoadedModel:
    diffusers: Any = importlib.import_module("diffusers")  # untyped

    if spec.kind == "preset":
        base = build_preset(spec.location, options.cache_dir, options.device, options.dtype)
        log.warning("model %s has random weights: noise images (%s)", card.id, card.description)
    else:
        try:
            base = _load_file(spec.path, options) if spec.kind == "file" else _load_folder(spec.path, options)
        except _LOAD_ERRORS as exc:
            raise ModelLoadError(f"{spec.location}: {exc}") from exc
    if options.vae is not None:
        base.vae = load_vae(options.vae, base.vae)
    # Attention runs on torch's SDPA kernels: diffusers' default processor on torch 2 (AttnProcessor2_0).
    base = place(base, options.device, options.dtype)
    inpainting = base.unet.config.in_channels == 9
    components = base.components
    inpaint = FillInpaintPipeline(**components, requires_safety_checker=False)
    if inpainting:
        pipes = {"txt2img": inpaint, "img2img": inpaint, "inpaint": inpaint}
    else:
        img2img = diffusers.StableDiffusionImg2ImgPipeline(**components, requires_safety_checker=False)
        pipes = {"txt2img": base, "img2img": img2img, "inpaint": inpaint}
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    attention = {type(p).__name__ for p in base.unet.attn_processors.values()}
    log.info(
        "loaded %s on %s %s%s (attention: %s)",
        card.id, options.device, str(options.dtype).removeprefix("torch."),
        ", inpainting UNet" if inpainting else "", ", ".join(sorted(attention)),
    )  # fmt: skip
    lora = LoraLibrary(options.lora_dir, base.unet, base.text_encoder)
    return LoadedModel(card, pipes, options.device, options.dtype, base.scheduler.config, lora, inpainting)


def _load_folder(path: Path, options: LoadOptions) -> Any:
    diffusers: Any = importlib.import_module("diffusers")  # untyped
    return diffusers.StableDiffusionPipeline.from_pretrained(
        str(path),
        dtype=options.dtype,
        safety_checker=None,
        requires_safety_checker=False,
        local_files_only=True,
    )


def _load_file(path: Path, options: LoadOptions) -> Any:
    """A single-file SD 1.x checkpoint in the original (LDM / A1111) key layout, laid out by the local
    config folder: nothing is looked up on a hub. An inpainting checkpoint (9 UNet input channels) loads
    with a config folder of the plain model too."""
    diffusers: Any = importlib.import_module("diffusers")  # untyped
    config = options.checkpoint_config
    if config is None:
        raise ModelLoadError(f"{path}: a single-file checkpoint needs --checkpoint-config (a config folder)")
    in_channels = _unet_in_channels(path)
    # No torch_dtype: diffusers would cast with a warning per model; load_model casts once, quietly.
    common = {"config": str(config), "local_files_only": True}
    extra: dict[str, Any] = {}
    unet_config = diffusers.UNet2DConditionModel.load_config(str(config), subfolder="unet")
    if unet_config["in_channels"] != in_channels:
        extra["unet"] = diffusers.UNet2DConditionModel.from_single_file(
            str(path), subfolder="unet", in_channels=in_channels, **common
        )
    return diffusers.StableDiffusionPipeline.from_single_file(
        str(path), safety_checker=None, requires_safety_checker=False, **common, **extra
    )


def _unet_in_channels(path: Path) -> int:
    """The UNet's input channels (4, or 9 for inpainting), read without loading the whole checkpoint."""
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            if _UNET_IN not in f.keys():  # noqa: SIM118 - safe_open is no mapping
                raise ModelLoadError(f"{path}: not an SD 1.x checkpoint (no {_UNET_IN})")
            return int(f.get_slice(_UNET_IN).get_shape()[1])
    state: Any = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
    while isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict) or _UNET_IN not in state:
        raise ModelLoadError(f"{path}: not an SD 1.x checkpoint (no {_UNET_IN})")
    return int(state[_UNET_IN].shape[1])


def load_vae(path: Path, own: Any) -> Any:
    """The AutoencoderKL at `path` (a diffusers folder, or one file in A1111 or diffusers key names);
    a file takes the architecture of the model's own VAE. ModelLoadError when it does not fit."""
    diffusers: Any = importlib.import_module("diffusers")  # untyped
    utils = _single_file_utils()
    if not path.exists():
        raise ModelLoadError(f"VAE {path}: no such file or folder")
    try:
        if path.is_dir():
            vae = diffusers.AutoencoderKL.from_pretrained(str(path), local_files_only=True)
        else:
            state = utils.load_single_file_checkpoint(str(path), local_files_only=True)
            vae = diffusers.AutoencoderKL.from_config(own.config)
            if not set(state) <= set(vae.state_dict()):
                state = utils.convert_ldm_vae_checkpoint(state, vae.config)
            vae.load_state_dict(state, strict=True)
    except _LOAD_ERRORS as exc:
        raise ModelLoadError(f"VAE {path}: {exc}") from exc
    log.info("VAE %s in place of the model's own", path.name)
    return vae


def _single_file_utils() -> Any:
    return importlib.import_module("diffusers.loaders.single_file_utils")  # untyped
