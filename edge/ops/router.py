"""Probes: no token needed."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from edge.broker import BrokerClient
from edge.ops.protocol import Liveness, Readiness
from observability.setup import PROMETHEUS_CONTENT_TYPE, exposition

TEXT = "velesio.v1.TextWorker"
IMAGE = "velesio.v1.ImageWorker"


def build_router(broker: BrokerClient) -> APIRouter:
    router = APIRouter(tags=["Operations"])

    @router.get("/healthz", summary="The edge process is up")
    async def healthz() -> Liveness:
        return Liveness()

    @router.get(
        "/readyz",
        summary="The broker answers and at least one worker is registered",
        response_model=Readiness,
        responses={503: {"model": Readiness, "description": "Not ready"}},
    )
    async def readyz(response: Response) -> Readiness:
        health = await broker.serving(("", TEXT, IMAGE))
        ready = health[""] and (health[TEXT] or health[IMAGE])
        response.status_code = 200 if ready else 503
        return Readiness(
            status="ready" if ready else "not ready",
            broker=health[""],
            text=health[TEXT],
            image=health[IMAGE],
        )

    @router.get("/metrics", summary="Prometheus metrics of this edge process", response_class=Response)
    async def prometheus_metrics() -> Response:
        return Response(exposition(), media_type=PROMETHEUS_CONTENT_TYPE)

    return router
