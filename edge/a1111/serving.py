"""Automatic1111 JSON <-> velesio.v1 gRPC: txt2img, img2img, progress, interrupt, skip, models, options."""

from __future__ import annotations

import base64
import binascii
import time
from typing import Any

import grpc
from fastapi import Request

from edge.a1111.protocol import (
    Empty,
    ErrorResponse,
    ImageResult,
    Img2ImgBody,
    Lora,
    Options,
    OptionsBody,
    Progress,
    ProgressState,
    Sampler,
    Scheduler,
    SdModel,
    Txt2ImgBody,
)
from edge.broker import BrokerClient, forwarded_metadata
from edge.errors import ApiError, bad_request
from edge.jobs import JobStream
from edge.routing import renderer
from velesio.v1 import common_pb2, inference_pb2

INPAINTING_FILL = [
    common_pb2.INPAINTING_FILL_FILL,
    common_pb2.INPAINTING_FILL_ORIGINAL,
    common_pb2.INPAINTING_FILL_LATENT_NOISE,
    common_pb2.INPAINTING_FILL_LATENT_NOTHING,
]
RESIZE_MODES = [
    common_pb2.RESIZE_MODE_JUST_RESIZE,
    common_pb2.RESIZE_MODE_CROP_AND_RESIZE,
    common_pb2.RESIZE_MODE_RESIZE_AND_FILL,
    common_pb2.RESIZE_MODE_RESIZE_AND_FILL,  # A1111's "latent upscale" has no pixel-space equivalent here
]
RUNNING = (common_pb2.JOB_STATE_QUEUED, common_pb2.JOB_STATE_RUNNING)


def decode_image(data: str, field: str) -> bytes:
    """A1111 clients send base64, sometimes as a data: URL."""
    payload = data.split(",", 1)[1] if data.startswith("data:") else data
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{field}: not valid base64", field) from None


def model_id(title: str) -> str:
    """'name.safetensors [hash]' (A1111's title) -> 'name'."""
    name = title.split(" [", 1)[0].strip()
    for suffix in (".safetensors", ".ckpt"):
        name = name.removesuffix(suffix)
    return name


class A1111Serving:
    def __init__(self, broker: BrokerClient) -> None:
        self.broker = broker

    def _params(self, body: Txt2ImgBody) -> common_pb2.ImageParams:
        params = common_pb2.ImageParams(
            prompt=body.prompt,
            negative_prompt=body.negative_prompt,
            sampler=body.sampler_name or body.sampler_index or "",
            scheduler=body.scheduler or "",
            steps=body.steps,
            cfg_scale=body.cfg_scale,
            width=body.width,
            height=body.height,
            seed=body.seed,
            batch_size=body.batch_size,
            n_iter=body.n_iter,
        )
        if params.scheduler.lower() == "automatic":
            params.scheduler = "Automatic"
        return params

    @staticmethod
    def _model(body: Txt2ImgBody) -> str:
        """The request's own checkpoint; without one, the broker takes the tenant's (set with /options)."""
        title = body.override_settings.get("sd_model_checkpoint")
        return model_id(str(title)) if title else ""

    async def _run(self, body: Txt2ImgBody, params: common_pb2.ImageParams, request: Request) -> ImageResult:
        call = self.broker.stub.GenerateImage(
            inference_pb2.GenerateImageRequest(model=self._model(body), params=params),
            metadata=forwarded_metadata(request),
        )
        stream = await JobStream(call).start()
        images, info = [], "{}"
        async for event in stream.events():
            if event.HasField("image"):
                images.append(base64.b64encode(event.image.png).decode())
            elif event.HasField("done"):
                info = event.done.info_json or "{}"
        parameters = body.model_dump(exclude={"init_images", "mask"}) | {"init_images": None, "mask": None}
        return ImageResult(images=images if body.send_images else [], parameters=parameters, info=info)

    async def txt2img(self, body: Txt2ImgBody, request: Request) -> ImageResult:
        return await self._run(body, self._params(body), request)

    async def img2img(self, body: Img2ImgBody, request: Request) -> ImageResult:
        params = self._params(body)
        params.init_images.extend(
            decode_image(d, f"init_images[{i}]") for i, d in enumerate(body.init_images)
        )
        params.denoising_strength = body.denoising_strength
        params.resize_mode = RESIZE_MODES[body.resize_mode]
        if body.mask:
            params.mask = decode_image(body.mask, "mask")
            params.mask_blur = body.mask_blur
            params.inpainting_fill = INPAINTING_FILL[body.inpainting_fill]
            params.inpaint_full_res = body.inpaint_full_res
            params.inpaint_full_res_padding = body.inpaint_full_res_padding
            params.inpainting_mask_invert = bool(body.inpainting_mask_invert)
        return await self._run(body, params, request)

    async def _newest(self, request: Request) -> inference_pb2.Job | None:
        reply = await self.broker.stub.ListJobs(
            inference_pb2.ListJobsRequest(kind=common_pb2.JOB_KIND_IMAGE, limit=1),
            metadata=forwarded_metadata(request),
        )
        return reply.jobs[0] if reply.jobs else None

    async def progress(self, request: Request, skip_current_image: bool) -> Progress:
        job = await self._newest(request)
        if job is None or job.state not in RUNNING:
            interrupted = job is not None and job.state == common_pb2.JOB_STATE_CANCELLED
            return Progress(progress=0.0, eta_relative=0.0, state=ProgressState(interrupted=interrupted))
        step = job.progress
        total = max(step.total_steps * max(step.total_iterations, 1), 1)
        done_steps = step.iteration * step.total_steps + step.step
        state = ProgressState(
            job=f"task({job.job_id})",
            job_count=step.total_iterations,
            job_timestamp=time.strftime("%Y%m%d%H%M%S", time.gmtime(job.created_at.seconds)),
            job_no=step.iteration,
            sampling_step=step.step,
            sampling_steps=step.total_steps,
        )
        preview = (
            base64.b64encode(step.preview_png).decode()
            if step.preview_png and not skip_current_image
            else None
        )
        return Progress(
            progress=min(done_steps / total, 1.0),
            eta_relative=step.eta_seconds,
            state=state,
            current_image=preview,
        )

    async def interrupt(self, request: Request) -> Empty:
        job = await self._newest(request)
        if job is not None and job.state in RUNNING:
            await self.broker.stub.CancelJob(
                inference_pb2.CancelJobRequest(job_id=job.job_id), metadata=forwarded_metadata(request)
            )
        return Empty()

    async def skip(self, request: Request) -> Empty:
        job = await self._newest(request)
        if job is not None and job.state == common_pb2.JOB_STATE_RUNNING:
            await self.broker.stub.SkipImage(
                inference_pb2.SkipImageRequest(job_id=job.job_id), metadata=forwarded_metadata(request)
            )
        return Empty()

    async def _image_models(self, request: Request) -> list[common_pb2.ModelInfo]:
        reply = await self.broker.stub.ListModels(
            inference_pb2.ListModelsRequest(kind=common_pb2.JOB_KIND_IMAGE),
            metadata=forwarded_metadata(request),
        )
        return list(reply.models)

    async def sd_models(self, request: Request) -> list[SdModel]:
        return [
            SdModel(
                title=f"{m.id} [{m.hash}]" if m.hash else m.id,
                model_name=m.id,
                hash=m.hash or None,
                filename=m.filename,
            )
            for m in await self._image_models(request)
        ]

    async def samplers(self, request: Request) -> list[Sampler]:
        names = sorted({s for m in await self._image_models(request) for s in m.samplers})
        return [Sampler(name=name) for name in names]

    async def schedulers(self, request: Request) -> list[Scheduler]:
        names = sorted({s for m in await self._image_models(request) for s in m.schedulers})
        return [Scheduler(name=n.lower(), label=n) for n in names]

    async def loras(self, request: Request) -> list[Lora]:
        names = sorted({lora for m in await self._image_models(request) for lora in m.loras})
        return [Lora(name=n, alias=n, path=n) for n in names]

    async def get_options(self, request: Request) -> Options:
        """The checkpoint the caller's tenant gets: the one it chose with POST /options (kept by the broker
        in Redis, so every edge replica answers the same), else the cluster's default."""
        metadata = forwarded_metadata(request)
        reply = await self.broker.stub.GetDefaultModels(
            inference_pb2.GetDefaultModelsRequest(kind=common_pb2.JOB_KIND_IMAGE), metadata=metadata
        )
        chosen = reply.defaults[0].model
        models = await self._image_models(request)
        digest = next((m.hash for m in models if m.id == chosen), "")
        return Options(sd_model_checkpoint=chosen, sd_checkpoint_hash=digest)

    async def set_options(self, body: OptionsBody, request: Request) -> Empty:
        """Sets (or with "" or null, clears) the checkpoint of the caller's tenant's later requests."""
        metadata = forwarded_metadata(request)
        if "sd_model_checkpoint" not in body.model_fields_set:  # nothing to set; the token is still checked
            await self.broker.stub.WhoAmI(inference_pb2.WhoAmIRequest(), metadata=metadata)
            return Empty()
        wanted = model_id(body.sd_model_checkpoint) if body.sd_model_checkpoint else ""
        choice = inference_pb2.SetDefaultModelRequest(kind=common_pb2.JOB_KIND_IMAGE, model=wanted)
        try:
            await self.broker.stub.SetDefaultModel(choice, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            error = ApiError.from_rpc(exc)
            if error.status == 404:
                error.param = "sd_model_checkpoint"
            raise error from None
        return Empty()


def error_body(exc: ApiError) -> dict[str, Any]:
    """The shape A1111's FastAPI app gives its errors."""
    return ErrorResponse(error=exc.code.name, detail=exc.message, body="", errors=exc.message).model_dump()


render_error = renderer(error_body)
