"""Ollama routes (/api/...): HTTP only; the work is in serving.py."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response

from edge import ndjson
from edge.ollama.protocol import (
    ChatRequest,
    ChatResponse,
    EmbeddingsRequest,
    EmbeddingsResponse,
    EmbedRequest,
    EmbedResponse,
    GenerateRequest,
    GenerateResponse,
    ListResponse,
    ProcessResponse,
    ShowRequest,
    ShowResponse,
    VersionResponse,
)
from edge.ollama.serving import OllamaServing, render_error
from edge.routing import dialect_route

RUNNING = "Ollama is running"


class Running(PlainTextResponse):
    """What Ollama answers on `/`, where its clients check for a server; the charset in the media type, as
    Starlette sends it, so that the OpenAPI document names exactly what comes back."""

    media_type = "text/plain; charset=utf-8"


def build_router(serving: OllamaServing) -> APIRouter:
    router = APIRouter(tags=["Ollama"], route_class=dialect_route(render_error))

    @router.post(
        "/api/chat",
        summary="Chat (Ollama): NDJSON lines unless stream is false, the last one with done true",
        response_model=ChatResponse,
        responses=ndjson.responses(ChatResponse),
    )
    async def chat(body: ChatRequest, request: Request) -> ChatResponse | Response:
        return await serving.chat(body, request)

    @router.post(
        "/api/generate",
        summary="Generate (Ollama): NDJSON lines unless stream is false, the last one with done true",
        response_model=GenerateResponse,
        responses=ndjson.responses(GenerateResponse),
    )
    async def generate(body: GenerateRequest, request: Request) -> GenerateResponse | Response:
        return await serving.generate(body, request)

    @router.post("/api/embed", summary="Embeddings of a text or texts (Ollama)")
    async def embed(body: EmbedRequest, request: Request) -> EmbedResponse:
        return await serving.embed(body, request)

    @router.post("/api/embeddings", summary="Embedding of one prompt (Ollama's older route)")
    async def embeddings(body: EmbeddingsRequest, request: Request) -> EmbeddingsResponse:
        return await serving.embeddings(body, request)

    @router.get("/api/tags", summary="Text models the cluster serves (Ollama)")
    async def tags(request: Request) -> ListResponse:
        return await serving.tags(request)

    @router.post("/api/show", summary="A text model's template, context size and capabilities (Ollama)")
    async def show(body: ShowRequest, request: Request) -> ShowResponse:
        return await serving.show(body, request)

    @router.get("/api/ps", summary="Loaded models (Ollama): every served text model")
    async def ps(request: Request) -> ProcessResponse:
        return await serving.ps(request)

    @router.get("/api/version", summary="Velesio's version (Ollama)")
    async def version() -> VersionResponse:
        return await serving.version()

    for method in ("GET", "HEAD"):
        router.add_api_route(
            "/", running, methods=[method], operation_id=f"ollama_running_{method.lower()}",
            response_class=Running, responses={200: {"content": {Running.media_type: {"example": RUNNING}}}},
            summary="'Ollama is running': the check Ollama clients make; needs no token, like the probes",
        )  # fmt: skip

    return router


async def running() -> str:
    return RUNNING
