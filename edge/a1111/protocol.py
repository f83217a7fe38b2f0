"""Automatic1111 web UI API request bodies (the fields Velesio honours; the rest are accepted and logged)."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from edge.routing import INT32_MAX, Int64, WireModel


class Txt2ImgBody(WireModel):
    prompt: str = ""
    negative_prompt: str = ""
    seed: Int64 = -1
    sampler_name: str | None = None
    sampler_index: str | None = None
    scheduler: str | None = None
    batch_size: int = Field(1, ge=1, le=INT32_MAX)
    n_iter: int = Field(1, ge=1, le=INT32_MAX)
    steps: int = Field(20, ge=1, le=INT32_MAX)
    cfg_scale: float = 7.0
    width: int = Field(512, ge=8, le=INT32_MAX)
    height: int = Field(512, ge=8, le=INT32_MAX)
    override_settings: dict[str, Any] = Field(default_factory=dict)
    send_images: bool = True


class Img2ImgBody(Txt2ImgBody):
    init_images: list[str] = Field(min_length=1)
    mask: str | None = None
    denoising_strength: float = Field(0.75, ge=0, le=1)
    resize_mode: int = Field(0, ge=0, le=3)
    mask_blur: int = Field(4, ge=0, le=INT32_MAX)
    inpainting_fill: int = Field(1, ge=0, le=3)
    inpaint_full_res: bool = False
    inpaint_full_res_padding: int = Field(32, ge=0, le=INT32_MAX)
    inpainting_mask_invert: int = Field(0, ge=0, le=1)


class OptionsBody(WireModel):
    sd_model_checkpoint: str | None = None
