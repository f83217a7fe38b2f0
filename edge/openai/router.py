"""OpenAI routes: HTTP only; the work is in serving.py."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from edge import sse
from edge.openai.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    EmbeddingList,
    EmbeddingRequest,
    ImageGenerationRequest,
    ImagesResponse,
    ModelList,
)
from edge.openai.serving import OpenAIServing, render_error
from edge.routing import dialect_route


def build_router(serving: OpenAIServing) -> APIRouter:
    router = APIRouter(tags=["OpenAI"], route_class=dialect_route(render_error))

    @router.post(
        "/v1/chat/completions",
        summary="Chat completion (OpenAI); SSE of chat.completion.chunk objects when stream is true",
        response_model=ChatCompletion,
        responses=sse.RESPONSES,
    )
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> ChatCompletion | Response:
        return await serving.chat(body, request)

    @router.post(
        "/v1/completions",
        summary="Text completion (OpenAI); SSE of text_completion chunks when stream is true",
        response_model=Completion,
        responses=sse.RESPONSES,
    )
    async def completions(body: CompletionRequest, request: Request) -> Completion | Response:
        return await serving.complete(body, request)

    @router.get("/v1/models", summary="Models the cluster serves now (OpenAI)")
    async def models(request: Request) -> ModelList:
        return await serving.models(request)

    @router.post("/v1/embeddings", summary="Embeddings of a text, texts or token ids (OpenAI)")
    async def embeddings(body: EmbeddingRequest, request: Request) -> EmbeddingList:
        return await serving.embeddings(body, request)

    @router.post("/v1/images/generations", summary="Image generation (OpenAI), b64_json only")
    async def images(body: ImageGenerationRequest, request: Request) -> ImagesResponse:
        return await serving.images(body, request)

    return router
