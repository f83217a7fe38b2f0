"""llama.cpp server routes (LLM for Unity 2.x and 3.x): HTTP only; the work is in serving.py."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from edge import sse
from edge.llamacpp.protocol import (
    ApplyTemplateBody,
    CompletionBody,
    CompletionResult,
    DetokenizeBody,
    DetokenizeResult,
    EmbeddingBody,
    EmbeddingResult,
    Health,
    PromptResult,
    Props,
    TemplateResult,
    TokenizeBody,
    TokenizeResult,
)
from edge.llamacpp.serving import LlamaCppServing, render_error
from edge.routing import dialect_route


def build_router(serving: LlamaCppServing) -> APIRouter:
    router = APIRouter(tags=["llama.cpp / LLM for Unity"], route_class=dialect_route(render_error))

    @router.post(
        "/completion",
        summary="Completion; `data: {...}` lines when stream is true, the last one a CompletionResult",
        response_model=CompletionResult,
        responses=sse.RESPONSES,
    )
    async def completion(body: CompletionBody, request: Request) -> CompletionResult | Response:
        return await serving.completion(body, request)

    @router.post("/embeddings", summary="Embedding of one text (LLM for Unity)")
    async def embeddings(body: EmbeddingBody, request: Request) -> EmbeddingResult:
        return await serving.embeddings(body, request)

    @router.post("/tokenize", summary="Text to token ids")
    async def tokenize(body: TokenizeBody, request: Request) -> TokenizeResult:
        return await serving.tokenize(body, request)

    @router.post("/detokenize", summary="Token ids to text")
    async def detokenize(body: DetokenizeBody, request: Request) -> DetokenizeResult:
        return await serving.detokenize(body, request)

    @router.post("/apply-template", summary="Render chat messages with the model's chat template")
    async def apply_template(body: ApplyTemplateBody, request: Request) -> PromptResult:
        return await serving.apply_template(body, request)

    for method in ("GET", "POST"):  # LLM for Unity 2.x GETs these, 3.x POSTs them
        verb = method.lower()
        router.add_api_route(
            "/template", serving.template, methods=[method], operation_id=f"llamacpp_template_{verb}",
            response_model=TemplateResult,
            summary="The model's chat template (LLM for Unity 2.x)",
        )  # fmt: skip
        router.add_api_route(
            "/props", serving.props, methods=[method], operation_id=f"llamacpp_props_{verb}",
            response_model=Props,
            summary="Server and model properties",
        )  # fmt: skip
        router.add_api_route(
            "/health", serving.health, methods=[method], operation_id=f"llamacpp_health_{verb}",
            response_model=Health,
            summary="llama.cpp-style health: ok once a text worker serves",
        )  # fmt: skip

    return router
