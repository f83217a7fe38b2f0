"""Server-sent events: one JSON object per `data:` line, the way OpenAI and llama.cpp stream."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# For the OpenAPI document of a route that streams (always, or when its request asks to).
RESPONSES: dict[int | str, dict[str, Any]] = {200: {"content": {"text/event-stream": {}}}}


def data(payload: Any, *, event: str | None = None, event_id: str | None = None) -> str:
    lines = []
    if event_id:
        lines.append(f"id: {event_id}")
    if event:
        lines.append(f"event: {event}")
    text = (
        payload
        if isinstance(payload, str)
        else json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    )
    lines.append(f"data: {text}")
    return "\n".join(lines) + "\n\n"


def response(body: AsyncIterator[str], background: BackgroundTask | None = None) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream", headers=HEADERS, background=background)
