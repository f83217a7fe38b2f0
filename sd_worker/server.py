"""`velesio.v1.ImageWorker`: protobuf <-> domain types around an `ImageEngine`, and slot accounting."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from mesh.server import Context
from mesh.slots import Slots
from mesh.version import VERSION
from observability.work import ImageJobTelemetry, slot_gauges
from sd_worker.engine import ImageEngine
from sd_worker.types import Done, ImageJob, Progress
from velesio.v1 import workers_pb2, workers_pb2_grpc


class ImageWorkerServicer(workers_pb2_grpc.ImageWorkerServicer):
    def __init__(self, engine: ImageEngine, worker_id: str) -> None:
        self.engine = engine
        self.worker_id = worker_id
        self.slots = Slots(engine.slots, slot_gauges("image", engine.card.id, engine.slots))

    async def Generate(
        self, request: workers_pb2.ImageWorkerGenerateRequest, context: Context
    ) -> AsyncIterator[workers_pb2.ImageWorkerGenerateResponse]:
        job = ImageJob.from_pb(request, self.engine.limits)
        self.engine.check(job)
        observed = ImageJobTelemetry(request.model or self.engine.card.id)
        with self.slots.claim() as slot:
            async with contextlib.aclosing(self.engine.generate(job)) as events:
                async for event in events:
                    if isinstance(event, Done):
                        slot.release()  # before the broker hears "done" and sends the next job here
                        observed.finished(event.images)
                    elif isinstance(event, Progress):
                        observed.step(event.step)
                    yield event.to_pb()

    async def Skip(
        self, request: workers_pb2.ImageWorkerSkipRequest, context: Context
    ) -> workers_pb2.ImageWorkerSkipResponse:
        return workers_pb2.ImageWorkerSkipResponse(skipped=self.engine.skip(request.job_id))

    async def Info(
        self, request: workers_pb2.ImageWorkerInfoRequest, context: Context
    ) -> workers_pb2.ImageWorkerInfoResponse:
        return workers_pb2.ImageWorkerInfoResponse(
            worker_id=self.worker_id,
            models=[card.to_pb() for card in self.engine.cards],
            samplers=self.engine.samplers,
            schedulers=self.engine.schedulers,
            loras=self.engine.loras,
            slots_total=self.engine.slots,
            slots_busy=self.slots.busy,
            version=VERSION,
        )
