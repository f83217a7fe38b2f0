"""What every worker process shares: its common options, serving one gRPC service while registered in
Redis, and a `main()` that turns start-up failures (a model that does not load) into one readable line."""

from __future__ import annotations

import asyncio
import logging
import socket
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from pydantic import Field

from mesh.keys import Keys
from mesh.registry import WorkerRegistration
from mesh.server import GrpcServer, Service, join_host_port
from mesh.settings import CommonSettings, is_loopback
from observability.setup import setup_telemetry
from observability.tracing import TelemetryInterceptor
from velesio.v1 import common_pb2, inference_pb2

log = logging.getLogger(__name__)

Ready = Callable[[str], Awaitable[None]]


class StartupError(Exception):
    """The worker cannot serve (its model is missing, not a model, or does not load); said in one line."""


class WorkerSettings(CommonSettings):
    """Options every worker takes."""

    port: int = Field(0, description="gRPC port (0: any free port; the registry tells brokers which)")
    advertise_addr: str = Field("", description="host:port brokers dial (default: --host and the bound port)")
    worker_id: str = Field("", description="name in the registry (default: <kind>-<random>)")
    heartbeat_s: float = Field(
        3.0, gt=0, description="registration TTL; the worker drops out this long after it dies"
    )
    grace_s: float = Field(10.0, description="on SIGTERM, how long running jobs may take to finish")

    def worker_name(self, kind: str) -> str:
        return self.worker_id or f"{kind}-{uuid.uuid4().hex[:8]}"


def advertised(settings: WorkerSettings, port: int) -> str:
    if settings.advertise_addr:
        return settings.advertise_addr
    host = settings.host
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
        log.warning("listening on all interfaces; advertising %s (set --advertise-addr to choose)", host)
    return join_host_port(host, port)


async def serve_registered(
    settings: WorkerSettings, service: Service, info: inference_pb2.WorkerInfo, ready: Ready | None
) -> None:
    """Serves `service` and keeps `info` registered (with the address it got) until SIGTERM/SIGINT; then
    deregisters first, so brokers send nothing new, and gives running jobs the grace period."""
    component = "velesio.llm_worker" if info.kind == common_pb2.JOB_KIND_TEXT else "velesio.sd_worker"
    server = GrpcServer(
        [service],
        host=settings.host,
        port=settings.port,
        interceptors=[TelemetryInterceptor(component)],
        grace=settings.grace_s,
    )
    await server.start()
    info.address = advertised(settings, server.port)
    client = settings.redis.connect()
    try:
        async with WorkerRegistration(client, Keys(settings.key_prefix), info, ttl=settings.heartbeat_s):
            if ready is not None:
                await ready(info.address)
            await server.wait_for_signal()
    finally:
        await server.stop()
        await client.aclose()


def worker_main(
    settings: WorkerSettings, serve: Callable[[], Coroutine[Any, Any, None]], process: str
) -> int:
    telemetry = setup_telemetry(settings, process)
    if not is_loopback(settings.host):
        log.warning("the worker API has no authentication; keep %s on a private network", settings.host)
    try:
        asyncio.run(serve())
    except StartupError as exc:
        log.error("cannot serve the model: %s", exc)
        return 2
    finally:
        telemetry.shutdown()
    return 0
