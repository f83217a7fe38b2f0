"""Newline-delimited JSON: one JSON object per line, the way Ollama streams."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

MEDIA_TYPE = "application/x-ndjson"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def line(reply: BaseModel) -> str:
    return reply.model_dump_json() + "\n"


def responses(model: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """For the OpenAPI document of a route that streams when its request asks to: each line is a `model`
    (a reply model of the route, so the document has its schema)."""
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {200: {"content": {MEDIA_TYPE: {"schema": schema}}}}


def response(body: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(body, media_type=MEDIA_TYPE, headers=HEADERS)
