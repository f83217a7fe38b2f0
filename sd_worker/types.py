"""Domain types of the image worker, with their protobuf translations; validation happens in `from_pb`."""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field

from PIL import Image, ImageOps, UnidentifiedImageError

from mesh.errors import InvalidArgument
from sd_worker.samplers import DEFAULT_SAMPLER, DEFAULT_SCHEDULER, check_sampler, check_scheduler
from velesio.v1 import common_pb2, events_pb2, workers_pb2

_LORA_TAG = re.compile(r"<lora:([^:>]+)(?::([^>]*))?>")
FILLS = {  # protobuf -> A1111's inpainting_fill numbers
    common_pb2.INPAINTING_FILL_UNSPECIFIED: 1,
    common_pb2.INPAINTING_FILL_FILL: 0,
    common_pb2.INPAINTING_FILL_ORIGINAL: 1,
    common_pb2.INPAINTING_FILL_LATENT_NOISE: 2,
    common_pb2.INPAINTING_FILL_LATENT_NOTHING: 3,
}
RESIZE_MODES = {
    common_pb2.RESIZE_MODE_UNSPECIFIED: 0,
    common_pb2.RESIZE_MODE_JUST_RESIZE: 0,
    common_pb2.RESIZE_MODE_CROP_AND_RESIZE: 1,
    common_pb2.RESIZE_MODE_RESIZE_AND_FILL: 2,
}


@dataclass(frozen=True)
class Limits:
    max_size: int
    max_steps: int
    max_batch: int


@dataclass(frozen=True)
class Lora:
    name: str
    weight: float


@dataclass(frozen=True)
class ImageJob:
    job_id: str
    prompt: str  # without <lora:...> tags
    negative_prompt: str
    sampler: str
    scheduler: str
    steps: int
    cfg_scale: float
    width: int
    height: int
    seed: int  # -1: random
    batch_size: int
    n_iter: int
    init_image: Image.Image | None = None
    mask: Image.Image | None = None
    denoising_strength: float = 0.75
    resize_mode: int = 0  # A1111's numbering: 0 just resize, 1 crop and resize, 2 resize and fill
    mask_blur: int = 4
    mask_invert: bool = False
    inpainting_fill: int = 1  # A1111's numbering: 0 fill, 1 original, 2 latent noise, 3 latent nothing
    full_res: bool = False  # "Only masked": inpaint the masked region at full size, then paste it back
    full_res_padding: int = 32
    preview_every: int = 0
    loras: tuple[Lora, ...] = field(default_factory=tuple)
    written_prompt: str = ""  # as the caller wrote it, <lora:...> tags included (infotext keeps them)
    model: str = ""  # "": the worker's default model
    vae: str = ""  # "" or "Automatic": the worker's VAE

    @property
    def mode(self) -> str:
        if self.init_image is None:
            return "txt2img"
        return "img2img" if self.mask is None else "inpaint"

    @classmethod
    def from_pb(cls, request: workers_pb2.ImageWorkerGenerateRequest, limits: Limits) -> ImageJob:
        p = request.params
        width, height = _size(p, limits)
        steps = p.steps if p.HasField("steps") else 20
        if not 1 <= steps <= limits.max_steps:
            raise InvalidArgument(f"must be 1 to {limits.max_steps}, got {steps}", field="steps")
        batch_size = _count(p.batch_size if p.HasField("batch_size") else 1, "batch_size", limits)
        n_iter = _count(p.n_iter if p.HasField("n_iter") else 1, "n_iter", limits)
        strength = p.denoising_strength if p.HasField("denoising_strength") else 0.75
        if not 0.0 < strength <= 1.0:
            raise InvalidArgument(f"must be over 0 and at most 1, got {strength}", field="denoising_strength")
        mask_blur = p.mask_blur if p.HasField("mask_blur") else 4
        if mask_blur < 0:
            raise InvalidArgument("must not be negative", field="mask_blur")
        init, mask = _inputs(p)
        if p.inpainting_fill not in FILLS:
            raise InvalidArgument(f"unknown value {p.inpainting_fill}", field="inpainting_fill")
        padding = p.inpaint_full_res_padding if p.HasField("inpaint_full_res_padding") else 32
        if padding < 0:
            raise InvalidArgument("must not be negative", field="inpaint_full_res_padding")
        if init is not None and int(steps * strength) < 1:
            raise InvalidArgument(
                f"{steps} steps at denoising strength {strength:g} leave no step to run", field="steps"
            )
        prompt, loras = strip_lora_tags(p.prompt)
        loras += tuple(Lora(r.name, r.weight if r.HasField("weight") else 1.0) for r in p.loras)
        sampler = check_sampler(p.sampler or DEFAULT_SAMPLER)
        return cls(
            job_id=request.job_id,
            prompt=prompt,
            negative_prompt=p.negative_prompt,
            sampler=sampler,
            scheduler=check_scheduler(sampler, p.scheduler or DEFAULT_SCHEDULER),
            steps=steps,
            cfg_scale=p.cfg_scale if p.HasField("cfg_scale") else 7.0,
            width=width,
            height=height,
            seed=p.seed if p.HasField("seed") else -1,
            batch_size=batch_size,
            n_iter=n_iter,
            init_image=init,
            mask=mask,
            denoising_strength=strength,
            resize_mode=RESIZE_MODES.get(p.resize_mode, 0),
            mask_blur=mask_blur,
            mask_invert=p.inpainting_mask_invert,
            inpainting_fill=FILLS[p.inpainting_fill],
            full_res=p.inpaint_full_res,
            full_res_padding=padding,
            preview_every=max(0, p.preview_every),
            loras=loras,
            written_prompt=p.prompt,
            model=request.model,
            vae=p.vae,
        )


def _size(p: common_pb2.ImageParams, limits: Limits) -> tuple[int, int]:
    width = p.width if p.HasField("width") else 512
    height = p.height if p.HasField("height") else 512
    for name, size in (("width", width), ("height", height)):
        if size <= 0 or size % 8:
            raise InvalidArgument(f"{size} is not a positive multiple of 8", field=name)
        if size > limits.max_size:
            raise InvalidArgument(f"{size} is over this worker's limit of {limits.max_size}", field=name)
    return width, height


def _count(count: int, name: str, limits: Limits) -> int:
    if not 1 <= count <= limits.max_batch:
        raise InvalidArgument(f"must be 1 to {limits.max_batch}, got {count}", field=name)
    return count


def _inputs(p: common_pb2.ImageParams) -> tuple[Image.Image | None, Image.Image | None]:
    """The init image and mask, decoded and checked against each other."""
    if len(p.init_images) > 1:
        raise InvalidArgument("one init image per job is supported", field="init_images")
    init = _image(p.init_images[0], "init_images").convert("RGB") if p.init_images else None
    if not p.mask:
        return init, None
    if init is None:
        raise InvalidArgument("a mask needs an init image", field="mask")
    mask = _image(p.mask, "mask").convert("L")
    if mask.size != init.size:
        raise InvalidArgument(
            f"mask is {mask.size[0]}x{mask.size[1]}, init image {init.size[0]}x{init.size[1]}", field="mask"
        )
    return init, mask


def strip_lora_tags(prompt: str) -> tuple[str, tuple[Lora, ...]]:
    loras: list[Lora] = []
    for name, weight in _LORA_TAG.findall(prompt):
        try:
            loras.append(Lora(name, float(weight) if weight else 1.0))
        except ValueError:
            raise InvalidArgument(f"bad weight in <lora:{name}:{weight}>", field="prompt") from None
    return _LORA_TAG.sub("", prompt).strip(), tuple(loras)


def _image(data: bytes, field: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InvalidArgument(f"not a PNG, JPEG or WebP image ({exc})", field=field) from None
    return ImageOps.exif_transpose(image)


@dataclass(frozen=True)
class Progress:
    step: int
    total_steps: int
    iteration: int
    total_iterations: int
    eta_seconds: float
    preview_png: bytes = b""

    def to_pb(self) -> workers_pb2.ImageWorkerGenerateResponse:
        return workers_pb2.ImageWorkerGenerateResponse(
            progress=events_pb2.ImageProgress(
                step=self.step,
                total_steps=self.total_steps,
                iteration=self.iteration,
                total_iterations=self.total_iterations,
                eta_seconds=self.eta_seconds,
                preview_png=self.preview_png,
            )
        )


@dataclass(frozen=True)
class ImageOut:
    png: bytes
    seed: int
    infotext: str
    index: int
    width: int
    height: int

    def to_pb(self) -> workers_pb2.ImageWorkerGenerateResponse:
        return workers_pb2.ImageWorkerGenerateResponse(
            image=events_pb2.ImageResult(
                png=self.png,
                seed=self.seed,
                infotext=self.infotext,
                index=self.index,
                width=self.width,
                height=self.height,
            )
        )


@dataclass(frozen=True)
class Done:
    info_json: str
    denoise_ms: float
    images: int
    skipped_images: int

    def to_pb(self) -> workers_pb2.ImageWorkerGenerateResponse:
        seconds = self.denoise_ms / 1000
        return workers_pb2.ImageWorkerGenerateResponse(
            done=events_pb2.JobDone(
                finish_reason=common_pb2.FINISH_REASON_STOP,
                timings=common_pb2.Timings(
                    predicted_ms=self.denoise_ms,
                    predicted_per_second=self.images / seconds if seconds > 0 else 0.0,
                ),
                info_json=self.info_json,
                skipped_images=self.skipped_images,
            )
        )


@dataclass(frozen=True)
class ModelCard:
    id: str
    description: str
    filename: str
    hash: str
    test_only: bool

    def to_pb(self) -> common_pb2.ModelInfo:
        return common_pb2.ModelInfo(
            id=self.id,
            kind=common_pb2.JOB_KIND_IMAGE,
            description=self.description,
            test_only=self.test_only,
            filename=self.filename,
            hash=self.hash,
            capabilities=["txt2img", "img2img", "inpaint"],
        )
