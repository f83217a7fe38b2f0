"""The inputs of a job's pipeline call (init image, mask, A1111's inpainting fills), the inpaint pipeline
that applies the latent fills, and the images a job sends (PNG with infotext, latent previews)."""

from __future__ import annotations

import importlib
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

from sd_worker.types import ImageJob

# Approximate RGB of SD 1.x latents: a linear map, for previews that cost no VAE decode.
_LATENT_RGB = torch.tensor(
    [[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]]
)
FILL, ORIGINAL, LATENT_NOISE, LATENT_NOTHING = 0, 1, 2, 3  # A1111's inpainting_fill numbers

LatentFill = Callable[[torch.Tensor], torch.Tensor]
_InpaintPipeline: Any = importlib.import_module("diffusers").StableDiffusionInpaintPipeline  # untyped


class FillInpaintPipeline(_InpaintPipeline):  # type: ignore[misc]
    """diffusers' inpainting, plus A1111's latent fills: `latent_fill` rewrites the encoded init image (under
    the mask) before noise is added to it, for the start of denoising and for the 4-channel UNet's blending
    of the unmasked area alike."""

    _latent_fill: LatentFill | None = None

    def __call__(self, *args: Any, latent_fill: LatentFill | None = None, **kwargs: Any) -> Any:
        self._latent_fill = latent_fill
        try:
            return super().__call__(*args, **kwargs)
        finally:
            self._latent_fill = None

    def prepare_latents(
        self,
        batch_size: int,
        num_channels_latents: int,
        height: int,
        width: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: Any,
        latents: torch.Tensor | None = None,
        image: torch.Tensor | None = None,
        timestep: Any = None,
        is_strength_max: bool = True,
        return_noise: bool = False,
        return_image_latents: bool = False,
    ) -> Any:
        uses_image = return_image_latents or (latents is None and not is_strength_max)
        if self._latent_fill is not None and image is not None and image.shape[1] != 4 and uses_image:
            # prepare_latents takes 4-channel images as latents already encoded.
            image = self._latent_fill(self._encode_vae_image(image.to(device, dtype), generator))
        return super().prepare_latents(
            batch_size,
            num_channels_latents,
            height,
            width,
            dtype,
            device,
            generator,
            latents,
            image=image,
            timestep=timestep,
            is_strength_max=is_strength_max,
            return_noise=return_noise,
            return_image_latents=return_image_latents,
        )


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


@dataclass
class Inputs:
    """A job's pipeline arguments; `overlay` pastes each result into the init image (inpainting); `fill`
    makes the latent fill for a batch's seeds (latent noise, latent nothing)."""

    kwargs: dict[str, Any]
    overlay: Overlay | None = None
    fill: Callable[[Sequence[int]], LatentFill] | None = None


def prepare_inputs(pipe: Any, job: ImageJob, inpainting_unet: bool) -> Inputs:
    """What the job's images become: txt2img and img2img on an inpainting UNet run as inpainting of the
    whole picture (A1111 does the same), and inpainting follows A1111's order: fit, blur, crop for "Only
    masked", fill, and the unmasked part of the init image pasted back over each result."""
    size = (job.width, job.height)
    whole = {"width": job.width, "height": job.height}
    if job.init_image is None:
        if not inpainting_unet:
            return Inputs(whole)
        grey = Image.new("RGB", size, (127, 127, 127))
        return Inputs({**whole, "image": grey, "mask_image": Image.new("L", size, 255), "strength": 1.0})
    original = fit_image(job.init_image, job.width, job.height, job.resize_mode)
    kwargs: dict[str, Any] = {"image": original, "strength": job.denoising_strength}
    if job.mask is None:
        if inpainting_unet:
            kwargs.update(whole, mask_image=Image.new("L", size, 255))
        return Inputs(kwargs)
    mask = prepare_mask(job.mask, job.width, job.height, job.resize_mode, job.mask_blur, job.mask_invert)
    image, work_mask, crop = original, mask, None
    if job.full_res:
        crop = pipe.mask_processor.get_crop_region(mask, job.width, job.height, pad=job.full_res_padding)
        image = image.crop(crop).resize(size, Image.Resampling.LANCZOS)
        work_mask = mask.crop(crop).resize(size, Image.Resampling.LANCZOS)
    if job.inpainting_fill == FILL:
        image = fill_from_surroundings(image, work_mask)
    kwargs.update(whole, image=image, mask_image=work_mask)

    def overlay(result: Image.Image) -> Image.Image:
        pasted: Image.Image = pipe.image_processor.apply_overlay(mask, original, result, crop)
        return pasted

    fill = None
    if job.inpainting_fill in (LATENT_NOISE, LATENT_NOTHING):
        fill = _latent_fill(work_mask, job.inpainting_fill)
    return Inputs(kwargs, overlay, fill)


def fill_from_surroundings(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's "fill": the masked area painted with the colours around it (blurs of the unmasked part,
    widest first)."""
    masked = Image.new("RGBa", image.size)
    masked.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    filled = Image.new("RGBA", image.size)
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = masked.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            filled.alpha_composite(blurred)
    return filled.convert("RGB")


def _latent_fill(mask: Image.Image, mode: int) -> Callable[[Sequence[int]], LatentFill]:
    """A1111's "latent noise" (each image's own seeded noise under the mask) and "latent nothing" (zeros
    under the mask), on the mask rounded to 0/1 at latent resolution."""

    def for_seeds(seeds: Sequence[int]) -> LatentFill:
        def fill(latents: torch.Tensor) -> torch.Tensor:
            height, width = latents.shape[-2:]
            small = np.asarray(mask.convert("L").resize((width, height)), dtype=np.float32) / 255
            repaint = torch.from_numpy(np.around(small)).to(latents)
            kept = latents.expand(len(seeds), *latents.shape[1:]) * (1 - repaint)
            if mode == LATENT_NOTHING:
                return kept
            noise = torch.stack(
                [torch.randn(latents.shape[1:], generator=torch.Generator().manual_seed(s)) for s in seeds]
            )
            return kept + noise.to(latents) * repaint

        return fill

    return for_seeds


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
