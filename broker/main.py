"""`velesio broker`: the public gRPC API, the queue and the dispatcher of one broker replica."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable

from grpc_health.v1 import health_pb2

from broker.auth import Authenticator
from broker.cluster import Cluster
from broker.dispatch import Dispatcher, DispatchSettings
from broker.events import EventLog
from broker.job import kind_name
from broker.jobs import JobDefaults, Jobs
from broker.queue import JobQueue, QueueLimits
from broker.reader import StreamReader
from broker.relay import EventRelay
from broker.server import InferenceServicer
from broker.settings import BrokerSettings
from broker.validate import RequestLimits
from broker.worker_calls import WorkerCalls
from mesh.auth import Tokens
from mesh.keys import Keys
from mesh.registry import Registry
from mesh.server import GrpcServer, Service
from mesh.settings import CommonSettings, is_loopback
from mesh.tasks import finish, periodic
from observability import metrics
from observability.setup import setup_telemetry
from observability.tracing import TelemetryInterceptor
from velesio.v1 import inference_pb2, inference_pb2_grpc, workers_pb2

log = logging.getLogger(__name__)

HEARTBEAT_S = 2.0
GAUGES_S = 2.0


def check_exposure(tokens: Tokens, host: str) -> None:
    if tokens:
        return
    if not is_loopback(host):
        raise SystemExit(
            f"refusing to serve on {host} without API tokens: set --api-tokens / VELESIO_API_TOKENS, "
            "or listen on 127.0.0.1"
        )
    log.warning("no API tokens configured: anyone who can reach %s may use the API (loopback only)", host)


CAPABILITIES = {
    "text": workers_pb2.DESCRIPTOR.services_by_name["TextWorker"].full_name,
    "image": workers_pb2.DESCRIPTOR.services_by_name["ImageWorker"].full_name,
}


async def _capability_health(server: GrpcServer, cluster: Cluster) -> None:
    """The broker's health for "velesio.v1.TextWorker" / "velesio.v1.ImageWorker" says whether a worker of
    that kind is registered, so probes (the edge's /readyz) learn it without credentials."""
    kinds = {kind_name(w.kind) for w in await cluster.workers(fresh=True)}
    for kind, service in CAPABILITIES.items():
        serving = kind in kinds
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await server.health.set(service, status)


async def _cluster_gauges(queue: JobQueue, cluster: Cluster) -> None:
    """Queue depths and registry size, read from Redis: every replica reports the same values."""
    for kind, model in await queue.queues():
        depth = await queue.depth(queue.queue_key(kind, model))
        metrics.queue_depth.set(depth, {"kind": kind, "model": model})
    workers = await cluster.workers(fresh=True)
    for kind in CAPABILITIES:
        metrics.workers_registered.set(sum(kind_name(w.kind) == kind for w in workers), {"kind": kind})


async def serve(settings: BrokerSettings, ready: Callable[[str], Awaitable[None]] | None = None) -> None:
    tokens = Tokens.parse(settings.api_tokens, settings.api_tokens_file)
    check_exposure(tokens, settings.host)
    broker_id = settings.broker_id or f"broker-{uuid.uuid4().hex[:8]}"
    client = settings.redis.connect()
    keys = Keys(settings.key_prefix)
    registry = Registry(client, keys)
    cluster = Cluster(
        registry, default_models={"text": settings.default_text_model, "image": settings.default_image_model}
    )
    queue = JobQueue(
        client,
        keys,
        limits=QueueLimits(
            max_depth=settings.max_queue_depth,
            rate_per_minute=settings.rate_limit_per_minute,
            max_active_per_tenant=settings.max_active_jobs,
            max_queued_per_tenant=settings.max_queued_jobs,
        ),
        ttl_s=settings.event_ttl_s,
        max_events=settings.max_events,
    )
    events = EventLog(client, keys, max_events=settings.max_events)
    relay = EventRelay(client, events)
    reader = StreamReader(client, events, broker_id)
    calls = WorkerCalls(cluster)
    dispatcher = Dispatcher(
        client,
        keys,
        queue,
        events,
        relay,
        cluster,
        calls,
        DispatchSettings(broker_id=broker_id, lease_s=settings.lease_s, max_attempts=settings.max_attempts),
    )
    jobs = Jobs(
        queue,
        events,
        relay,
        reader,
        cluster,
        dispatcher,
        RequestLimits(max_prompt_chars=settings.max_prompt_chars, max_image_bytes=settings.max_image_bytes),
        JobDefaults(timeout_s=settings.default_timeout_s, queue_poll_s=settings.queue_poll_s),
        log_content=settings.log_content,
    )
    servicer = InferenceServicer(Authenticator(tokens), jobs, cluster, queue, calls)
    name = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name
    server = GrpcServer(
        [Service(name, lambda s: inference_pb2_grpc.add_InferenceServicer_to_server(servicer, s))],
        host=settings.host,
        port=settings.grpc_port,
        interceptors=[TelemetryInterceptor("velesio.broker")],
        grace=settings.grace_s,
    )
    await client.ping()
    await server.start()
    stop = asyncio.Event()
    background = [
        asyncio.create_task(dispatcher.serve(stop), name="dispatcher"),
        asyncio.create_task(reader.serve(stop), name="event reader"),
        asyncio.create_task(
            periodic(
                HEARTBEAT_S,
                lambda: registry.broker_alive(broker_id, HEARTBEAT_S * 3),
                stop,
                "broker heartbeat",
            ),
            name="broker-heartbeat",
        ),
        asyncio.create_task(
            periodic(1.0, lambda: _capability_health(server, cluster), stop, "capability health"),
            name="capability-health",
        ),
        asyncio.create_task(
            periodic(GAUGES_S, lambda: _cluster_gauges(queue, cluster), stop, "cluster gauges"),
            name="cluster-gauges",
        ),
    ]
    log.info(
        "broker %s serving velesio.v1.Inference on %s (Redis %s)",
        broker_id,
        server.address,
        settings.redis.url,
    )
    try:
        if ready is not None:
            await ready(server.address)
        await server.wait_for_signal()
    finally:
        jobs.shutting_down = True
        await asyncio.gather(server.stop(), dispatcher.stop(server.grace))
        await finish(background, stop)
        with contextlib.suppress(OSError, ConnectionError):
            await registry.broker_gone(broker_id)
        await cluster.close()
        await client.aclose()


def main(settings: CommonSettings) -> int:
    assert isinstance(settings, BrokerSettings)
    telemetry = setup_telemetry(settings, "broker")
    try:
        asyncio.run(serve(settings))
    finally:
        telemetry.shutdown()
    return 0
