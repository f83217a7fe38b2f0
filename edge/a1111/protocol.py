"""Automatic1111 web UI API bodies: the requests (the fields Velesio honours; others are accepted and logged)
and the replies, as its FastAPI app gives them."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from edge.wire import INT32_MAX, Int64, Reply, WireModel


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


# -- replies -----------------------------------------------------------------------------------------------


class ImageResult(Reply):
    images: list[str] = Field(description="base64 PNGs, with A1111 infotext in their `parameters` chunk")
    parameters: dict[str, Any] = Field(description="the request as understood, without its images")
    info: str = Field(description="a JSON string: seeds, sampler, model and the infotexts")


class ProgressState(Reply):
    skipped: bool = False
    interrupted: bool = False
    job: str = ""
    job_count: int = 0
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0


class Progress(Reply):
    progress: float = Field(ge=0, le=1)
    eta_relative: float
    state: ProgressState
    current_image: str | None = Field(None, description="base64 PNG preview, when the worker makes them")
    textinfo: str | None = None


class SdModel(Reply):
    title: str
    model_name: str
    hash: str | None
    sha256: str | None = None
    filename: str
    config: str | None = None


class Sampler(Reply):
    name: str
    aliases: list[str] = Field(default_factory=list)
    options: dict[str, Any] = Field(default_factory=dict)


class Scheduler(Reply):
    name: str
    label: str
    aliases: list[str] | None = None
    default_rho: float = -1
    need_inner_model: bool = False


class Lora(Reply):
    name: str
    alias: str
    path: str
    metadata: dict[str, Any] = Field(default_factory=dict)


class Options(Reply):
    sd_model_checkpoint: str
    sd_checkpoint_hash: str


class Empty(Reply):
    """`{}`: what A1111 answers when there is nothing to say."""


class ErrorResponse(Reply):
    error: str
    detail: str
    body: str
    errors: str
