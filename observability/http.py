"""The edge's request telemetry. FastAPI traces each request itself (its native OpenTelemetry support: a
SERVER span continuing the caller's `traceparent`, named by the route template); `telemetry_config()`
turns that on without probes, and `RequestMetrics` counts requests into Velesio's own metrics (the same
names the broker and workers use) by route template and status."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi.telemetry import TelemetryConfig

from observability import metrics

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

PROBES = frozenset({"/healthz", "/readyz", "/metrics"})
# Label values must stay few: a request line may carry any token as its method.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def is_probe(scope: MutableMapping[str, Any]) -> bool:
    return scope.get("type") == "http" and scope.get("path") in PROBES


def telemetry_config() -> TelemetryConfig:
    """FastAPI's own request spans (not for probes); its metrics and logs stay off: Velesio's metrics are
    `RequestMetrics`', and its logs go through `logging`."""
    return {"tracing": True, "metrics": False, "logs": False, "operation_spans": False, "exclude": is_probe}


class RequestMetrics:
    """`velesio_requests_total` and `velesio_request_duration_seconds` for every HTTP request but probes;
    a stream counts until its last byte."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_probe(scope):  # probes and scrapes are not traffic
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, observed)
        finally:
            route = getattr(scope.get("route"), "path", "") or "unmatched"
            method = scope["method"] if scope["method"] in METHODS else "_OTHER"  # any token parses
            labels = {"protocol": "http", "route": f"{method} {route}", "code": str(status)}
            metrics.requests.add(1, labels)
            metrics.request_duration.record(time.perf_counter() - started, labels)
