"""What every worker process shares: its common options, serving one gRPC service while registered in
Redis, and a `main()` that turns start-up failures (a model that does not load) into one readable line.

Telemetry is the caller's: it passes its server interceptors and a function that sets telemetry up, so
that this ground floor imports nothing above it."""

from __future__ import annotations

import asyncio
import logging
import socket
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Protocol

import grpc
from pydantic import Field

from mesh.errors import StartupError
from mesh.keys import Keys
from mesh.registry import WorkerRegistration
from mesh.server import GrpcServer, Service, join_host_port
from mesh.settings import CommonSettings, is_loopback
from velesio.v1 import inference_pb2

log = logging.getLogger(__name__)

Ready = Callable[[str], Awaitable[None]]


class Telemetry(Protocol):
    """What a process's telemetry set-up hands back: something to flush and stop at exit."""

    def shutdown(self) -> None: ...


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
    settings: WorkerSettings,
    service: Service,
    info: inference_pb2.WorkerInfo,
    ready: Ready | None,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
) -> None:
    """Serves `service` and keeps `info` registered (with the address it got) until SIGTERM/SIGINT; then
    deregisters first, so brokers send nothing new, and gives running jobs the grace period."""
    server = GrpcServer(
        [service], host=settings.host, port=settings.port, interceptors=interceptors, grace=settings.grace_s
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
    settings: WorkerSettings,
    serve: Callable[[], Coroutine[Any, Any, None]],
    set_up_telemetry: Callable[[], Telemetry],
) -> int:
    telemetry = set_up_telemetry()
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
