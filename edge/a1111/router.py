"""Automatic1111 API routes (/sdapi/v1/...): HTTP only; the work is in serving.py."""

from __future__ import annotations

from fastapi import APIRouter, Request

from edge.a1111.protocol import (
    Empty,
    ImageResult,
    Img2ImgBody,
    Lora,
    Options,
    OptionsBody,
    Progress,
    Sampler,
    Scheduler,
    SdModel,
    Txt2ImgBody,
)
from edge.a1111.serving import A1111Serving, render_error
from edge.routing import dialect_route


def build_router(serving: A1111Serving) -> APIRouter:
    router = APIRouter(prefix="/sdapi/v1", tags=["Automatic1111"], route_class=dialect_route(render_error))

    @router.post("/txt2img", summary="Text to image")
    async def txt2img(body: Txt2ImgBody, request: Request) -> ImageResult:
        return await serving.txt2img(body, request)

    @router.post("/img2img", summary="Image to image; inpainting when a mask is given")
    async def img2img(body: Img2ImgBody, request: Request) -> ImageResult:
        return await serving.img2img(body, request)

    @router.get("/progress", summary="Progress of the caller's newest image job")
    async def progress(request: Request, skip_current_image: bool = False) -> Progress:
        return await serving.progress(request, skip_current_image)

    @router.post("/interrupt", summary="Stop the caller's newest image job")
    async def interrupt(request: Request) -> Empty:
        return await serving.interrupt(request)

    @router.post("/skip", summary="Skip the image the caller's newest job is making")
    async def skip(request: Request) -> Empty:
        return await serving.skip(request)

    @router.get("/sd-models", summary="Image models")
    async def sd_models(request: Request) -> list[SdModel]:
        return await serving.sd_models(request)

    @router.get("/samplers", summary="Sampler names")
    async def samplers(request: Request) -> list[Sampler]:
        return await serving.samplers(request)

    @router.get("/schedulers", summary="Scheduler names")
    async def schedulers(request: Request) -> list[Scheduler]:
        return await serving.schedulers(request)

    @router.get("/loras", summary="LoRA names")
    async def loras(request: Request) -> list[Lora]:
        return await serving.loras(request)

    @router.get("/options", summary="Options (sd_model_checkpoint)")
    async def get_options(request: Request) -> Options:
        return await serving.get_options(request)

    @router.post(
        "/options",
        summary="Set sd_model_checkpoint for the later requests of the caller's tenant, on every replica",
    )
    async def set_options(body: OptionsBody, request: Request) -> Empty:
        return await serving.set_options(body, request)

    return router
