"""Loading a model once and deriving the txt2img, img2img and inpaint pipelines from the same modules."""

from __future__ import annotations

import hashlib
import importlib
import io
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageFilter, ImageOps

from mesh.worker import StartupError
from sd_worker.types import ImageJob, ModelCard

log = logging.getLogger(__name__)

# Approximate RGB of SD 1.x latents: a linear map, for previews that cost no VAE decode.
_LATENT_RGB = torch.tensor(
    [[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]]
)


class ModelLoadError(StartupError):
    pass


@dataclass
class LoadedModel:
    card: ModelCard
    pipes: dict[str, Any]  # mode ("txt2img", "img2img", "inpaint") -> diffusers pipeline
    device: torch.device
    dtype: torch.dtype
    scheduler_config: Any = field(default=None)

    @property
    def vae(self) -> Any:
        return self.pipes["txt2img"].vae


def pick_device(name: str) -> tuple[torch.device, torch.dtype]:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda"), torch.float16
    return torch.device("cpu"), torch.float32


def load_model(model: str, model_id: str, cache_dir: Path | None, device_name: str) -> LoadedModel:
    """The pipelines for `model` ('tiny' or a diffusers folder), on the chosen device; ModelLoadError."""
    diffusers: Any = importlib.import_module("diffusers")  # untyped

    device, dtype = pick_device(device_name)
    if model == "tiny":
        from sd_worker.tiny import build_tiny

        folder = cache_dir or Path(tempfile.gettempdir()) / "velesio-sd"
        base = build_tiny(folder, dtype)
        card = ModelCard(
            id=model_id or "tiny",
            description="built-in tiny SD 1.x pipeline with random weights: noise images, for tests only",
            filename="tiny",
            hash=_params_hash(base.unet),
            test_only=True,
        )
        log.warning("model %s has random weights: noise images (test only)", card.id)
    else:
        path = Path(model).expanduser()
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(f"{model}: not a diffusers folder (no model_index.json), and not 'tiny'")
        try:
            base = diffusers.StableDiffusionPipeline.from_pretrained(
                str(path),
                dtype=dtype,
                safety_checker=None,
                requires_safety_checker=False,
                local_files_only=True,
            )
        except (OSError, ValueError, RuntimeError, TypeError) as exc:
            raise ModelLoadError(f"{model}: {exc}") from exc
        card = ModelCard(
            id=model_id or path.name.lower(),
            description=f"diffusers folder {path}",
            filename=str(path),
            hash=_file_hash(path),
            test_only=False,
        )
    base = base.to(device)  # attention runs on torch's SDPA kernels (diffusers' default on torch 2)
    components = base.components
    pipes = {
        "txt2img": base,
        "img2img": diffusers.StableDiffusionImg2ImgPipeline(**components, requires_safety_checker=False),
        "inpaint": diffusers.StableDiffusionInpaintPipeline(**components, requires_safety_checker=False),
    }
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    return LoadedModel(card, pipes, device, dtype, base.scheduler.config)


def _params_hash(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for tensor in module.state_dict().values():
        digest.update(tensor.detach().cpu().float().numpy().tobytes())
    return digest.hexdigest()[:10]


def _file_hash(folder: Path) -> str:
    """A1111's short model hash (sha256 of 64 KiB at 1 MiB) of the UNet weights file."""
    files = sorted((folder / "unet").glob("diffusion_pytorch_model*")) if (folder / "unet").is_dir() else []
    if not files:
        return ""
    with files[0].open("rb") as f:
        f.seek(0x100000)
        chunk = f.read(0x10000)
        if not chunk:
            f.seek(0)
            chunk = f.read()
    return hashlib.sha256(chunk).hexdigest()[:8]


def fit_image(image: Image.Image, width: int, height: int, resize_mode: int) -> Image.Image:
    """A1111's resize modes: 0 stretch, 1 cover and crop, 2 fit inside and fill the border by stretching."""
    size = (width, height)
    if image.size == size:
        return image
    if resize_mode == 1:
        return ImageOps.fit(image, size, Image.Resampling.LANCZOS)
    stretched = image.resize(size, Image.Resampling.LANCZOS)
    if resize_mode == 2:
        inner = ImageOps.contain(image, size, Image.Resampling.LANCZOS)
        stretched.paste(inner, ((width - inner.width) // 2, (height - inner.height) // 2))
    return stretched


def prepare_mask(
    mask: Image.Image, width: int, height: int, resize_mode: int, blur: int, invert: bool
) -> Any:
    mask = fit_image(mask, width, height, resize_mode)
    if invert:
        mask = ImageOps.invert(mask)
    if blur > 0:
        mask = mask.filter(ImageFilter.GaussianBlur(blur))
    return mask


Overlay = Callable[[Image.Image], Image.Image]


def prepare_inputs(pipe: Any, job: ImageJob) -> tuple[dict[str, Any], Overlay | None]:
    """The pipeline's keyword arguments for the job's images, and for "Only masked" inpainting the step
    that pastes each result back into the init image."""
    if job.init_image is None:
        return {"width": job.width, "height": job.height}, None
    image = fit_image(job.init_image, job.width, job.height, job.resize_mode)
    kwargs: dict[str, Any] = {"image": image, "strength": job.denoising_strength}
    if job.mask is None:
        return kwargs, None
    mask = prepare_mask(job.mask, job.width, job.height, job.resize_mode, job.mask_blur, job.mask_invert)
    if job.inpainting_fill == 0:
        # A1111's "fill": the masked area starts from the image's own colours, heavily blurred.
        image = Image.composite(
            image.filter(ImageFilter.GaussianBlur(max(job.width, job.height) / 8)), image, mask
        )
    kwargs.update(image=image, mask_image=mask, width=job.width, height=job.height)
    if not job.full_res:
        return kwargs, None
    crop = pipe.mask_processor.get_crop_region(mask, job.width, job.height, pad=job.full_res_padding)
    size = (job.width, job.height)
    kwargs.update(
        image=image.crop(crop).resize(size, Image.Resampling.LANCZOS),
        mask_image=mask.crop(crop).resize(size, Image.Resampling.LANCZOS),
    )

    def overlay(result: Image.Image) -> Image.Image:
        pasted: Image.Image = pipe.image_processor.apply_overlay(mask, image, result, crop)
        return pasted

    return kwargs, overlay


def preview_png(latents: torch.Tensor) -> bytes:
    """A latent-resolution PNG of the first image of the batch, approximated without the VAE."""
    rgb = torch.einsum("chw,cr->hwr", latents[0].float().cpu(), _LATENT_RGB)
    pixels = ((rgb + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, format="PNG")
    return out.getvalue()


def encode_png(image: Image.Image, infotext: str) -> bytes:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", infotext)
    out = io.BytesIO()
    image.save(out, format="PNG", pnginfo=info)
    return out.getvalue()
