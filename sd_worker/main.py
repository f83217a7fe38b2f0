"""`velesio sd-worker`: serve a diffusers image engine over gRPC and keep it registered in Redis."""

from __future__ import annotations

import asyncio
import logging
import socket
import uuid
from collections.abc import Awaitable, Callable

from mesh.keys import Keys
from mesh.logs import configure_logging
from mesh.registry import WorkerRegistration
from mesh.server import GrpcServer, Service, join_host_port
from mesh.settings import CommonSettings, is_loopback
from mesh.version import VERSION
from sd_worker.engine import ImageEngine
from sd_worker.pipelines import ModelLoadError
from sd_worker.samplers import SCHEDULERS
from sd_worker.server import ImageWorkerServicer
from sd_worker.settings import ImageWorkerSettings
from velesio.v1 import common_pb2, inference_pb2, workers_pb2, workers_pb2_grpc

log = logging.getLogger(__name__)


def advertised(settings: ImageWorkerSettings, port: int) -> str:
    if settings.advertise_addr:
        return settings.advertise_addr
    host = settings.host
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
        log.warning("listening on all interfaces; advertising %s (set --advertise-addr to choose)", host)
    return join_host_port(host, port)


async def serve(settings: ImageWorkerSettings, ready: Callable[[str], Awaitable[None]] | None = None) -> None:
    engine = await ImageEngine.start(settings)
    log.info(
        "serving %s (%s) on %s %s, %d slot(s)",
        engine.card.id, engine.card.description, engine.model.device, engine.model.dtype, engine.slots,
    )  # fmt: skip
    try:
        await _serve_engine(settings, engine, ready)
    finally:
        await engine.close()


async def _serve_engine(
    settings: ImageWorkerSettings, engine: ImageEngine, ready: Callable[[str], Awaitable[None]] | None
) -> None:
    worker_id = settings.worker_id or f"image-{uuid.uuid4().hex[:8]}"
    servicer = ImageWorkerServicer(engine, worker_id)
    name = workers_pb2.DESCRIPTOR.services_by_name["ImageWorker"].full_name
    server = GrpcServer(
        [Service(name, lambda s: workers_pb2_grpc.add_ImageWorkerServicer_to_server(servicer, s))],
        host=settings.host,
        port=settings.port,
        grace=settings.grace_s,
    )
    await server.start()
    details = engine.card.to_pb()
    details.samplers.extend(engine.samplers)
    details.schedulers.extend(SCHEDULERS)
    details.loras.extend(engine.loras)
    info = inference_pb2.WorkerInfo(
        worker_id=worker_id,
        address=advertised(settings, server.port),
        kind=common_pb2.JOB_KIND_IMAGE,
        models=[engine.card.id],
        slots_total=engine.slots,
        version=VERSION,
        model_details=[details],
    )
    client = settings.redis.connect()
    try:
        async with WorkerRegistration(client, Keys(settings.key_prefix), info, ttl=settings.heartbeat_s):
            if ready is not None:
                await ready(info.address)
            await server.wait_for_signal()
    finally:
        await server.stop()
        await client.aclose()


def main(settings: CommonSettings) -> int:
    assert isinstance(settings, ImageWorkerSettings)
    configure_logging(settings.log_level, settings.log_format, "sd-worker")
    if not is_loopback(settings.host):
        log.warning("the worker API has no authentication; keep %s on a private network", settings.host)
    try:
        asyncio.run(serve(settings))
    except ModelLoadError as exc:
        log.error("cannot serve the model: %s", exc)
        return 2
    return 0
