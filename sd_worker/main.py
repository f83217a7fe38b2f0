"""`velesio sd-worker`: serve a diffusers image engine over gRPC and keep it registered in Redis."""

from __future__ import annotations

import logging

from mesh.server import Service
from mesh.settings import CommonSettings
from mesh.version import VERSION
from mesh.worker import Ready, serve_registered, worker_main
from observability.setup import setup_telemetry
from observability.tracing import TelemetryInterceptor
from sd_worker.engine import ImageEngine
from sd_worker.samplers import SCHEDULERS
from sd_worker.server import ImageWorkerServicer
from sd_worker.settings import ImageWorkerSettings
from velesio.v1 import common_pb2, inference_pb2, workers_pb2, workers_pb2_grpc

log = logging.getLogger(__name__)

COMPONENT = "velesio.sd_worker"  # the instrumentation scope of its spans


async def serve(settings: ImageWorkerSettings, ready: Ready | None = None) -> None:
    engine = await ImageEngine.start(settings)
    log.info(
        "serving %s (%s) on %s, %d slot(s)%s",
        engine.card.id, engine.card.description, engine.device, engine.slots,
        f"; also {', '.join(c.id for c in engine.cards[1:])} on request" if len(engine.cards) > 1 else "",
    )  # fmt: skip
    try:
        await _serve_engine(settings, engine, ready)
    finally:
        await engine.close()


async def _serve_engine(settings: ImageWorkerSettings, engine: ImageEngine, ready: Ready | None) -> None:
    worker_id = settings.worker_name("image")
    servicer = ImageWorkerServicer(engine, worker_id)
    name = workers_pb2.DESCRIPTOR.services_by_name["ImageWorker"].full_name
    service = Service(name, lambda s: workers_pb2_grpc.add_ImageWorkerServicer_to_server(servicer, s))
    details = []
    for card in engine.cards:  # the default first: every model a request may name, loaded or not
        model = card.to_pb()
        model.samplers.extend(engine.samplers)
        model.schedulers.extend(SCHEDULERS)
        model.loras.extend(engine.loras)
        details.append(model)
    info = inference_pb2.WorkerInfo(
        worker_id=worker_id,
        kind=common_pb2.JOB_KIND_IMAGE,
        models=[card.id for card in engine.cards],
        slots_total=engine.slots,
        version=VERSION,
        model_details=details,
    )
    await serve_registered(settings, service, info, ready, [TelemetryInterceptor(COMPONENT)])


def main(settings: CommonSettings) -> int:
    assert isinstance(settings, ImageWorkerSettings)
    return worker_main(settings, lambda: serve(settings), lambda: setup_telemetry(settings, "sd-worker"))
