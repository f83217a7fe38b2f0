"""The edge application: one FastAPI app with a router per dialect, sharing one broker channel."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse

from edge.a1111.router import build_router as a1111_router
from edge.a1111.serving import A1111Serving
from edge.auth import PUBLIC_PATHS, AuthGate
from edge.broker import BrokerClient
from edge.errors import BodyTooLarge
from edge.llamacpp.router import build_router as llamacpp_router
from edge.llamacpp.serving import LlamaCppServing
from edge.native.router import build_router as native_router
from edge.ollama.router import build_router as ollama_router
from edge.ollama.serving import OllamaServing
from edge.openai.router import build_router as openai_router
from edge.openai.serving import OpenAIServing
from edge.ops.router import build_router as ops_router
from edge.settings import EdgeSettings
from mesh.version import VERSION
from observability.http import ASGIApp, Message, Receive, RequestMetrics, Scope, Send, telemetry_config

DESCRIPTION = """REST bridge of a Velesio cluster. OpenAI-style (`/v1/chat/completions`, `/v1/completions`,
`/v1/models`, `/v1/embeddings`, `/v1/images/generations`), llama.cpp server / LLM for Unity (`/completion`,
`/embeddings`, `/tokenize`, ...), Automatic1111 (`/sdapi/v1/...`), Ollama (`/api/chat`, `/api/generate` as
NDJSON streams, `/api/embed`, `/api/tags`, `/api/show`, `/api/ps`, `/api/version`),
and native JSON generated from the gRPC API (`/v1/jobs`, ...). Send `Authorization: Bearer <token>`; the
probes, the docs and Ollama's `GET /` ("Ollama is running") need none."""


class BodyLimit:
    """Refuses request bodies over `limit` bytes with 413 when a route starts reading one (so after the caller
    was let in: a stranger gets 401 whatever it sends), reading nothing past the limit. A dialect's route
    answers in its own error shape (edge.routing); any other refusal gets the OpenAI one."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_long = declared is not None and declared.isdigit() and int(declared) > self.limit
        seen, refused, answered = 0, False, False

        async def counted() -> Message:
            nonlocal seen
            if too_long:
                seen = self.limit + 1
                raise BodyTooLarge(self.limit)
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise BodyTooLarge(self.limit)
            return message

        async def sending(message: Message) -> None:
            nonlocal refused, answered
            if message["type"] == "http.response.start" and message["status"] == 413:
                answered = True  # the route's dialect said it
            if seen <= self.limit or answered:
                await send(message)
            elif not refused:  # a route without a dialect made the error something else: answer 413
                refused = True
                await self._refuse(scope, receive, send)

        try:
            await self.app(scope, counted, sending)
        except BodyTooLarge:
            if not refused and not answered:
                await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"request body larger than {self.limit} bytes"
        body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": 413}}
        await JSONResponse(body, status_code=413)(scope, receive, send)


def create_app(settings: EdgeSettings) -> FastAPI:
    broker = BrokerClient(settings.broker_addr)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        broker.open()
        yield
        await broker.close()

    app = FastAPI(
        title="Velesio",
        version=VERSION,
        description=DESCRIPTION,
        lifespan=lifespan,
        telemetry=telemetry_config(),
    )
    app.state.auth = AuthGate(broker)
    app.include_router(ops_router(broker))
    app.include_router(openai_router(OpenAIServing(broker)))
    app.include_router(llamacpp_router(LlamaCppServing(broker)))
    app.include_router(a1111_router(A1111Serving(broker)))
    app.include_router(ollama_router(OllamaServing(broker)))
    app.include_router(native_router(broker))
    origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
    if origins:
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["*"], allow_headers=["*"])
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(RequestMetrics)
    document_errors(app)
    return app


# What a client of any route but the probes may get back, in its dialect's error shape.
ERROR_RESPONSES = {
    "400": "a malformed body, or a field with a wrong type or value (the message names it)",
    "401": "no API token, or a wrong one",
    "404": "an unknown model or job",
    "413": "a body larger than the edge's --max-body-bytes",
    "429": "a tenant limit, or a full queue; Retry-After says when to try again",
    "503": "no worker serves the model now, or the broker cannot be reached",
    "504": "the job's deadline passed",
}


def document_errors(app: FastAPI) -> None:
    """The OpenAPI document lists the errors routes really answer with: validation failures are 400 in each
    dialect's shape (never FastAPI's default 422), plus the codes of the gRPC -> HTTP table."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            for path, operations in schema.get("paths", {}).items():
                if path in PUBLIC_PATHS:
                    continue
                for operation in operations.values():
                    responses = operation.setdefault("responses", {})
                    responses.pop("422", None)
                    for status, meaning in ERROR_RESPONSES.items():
                        responses.setdefault(status, {"description": f"Error: {meaning}."})
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
