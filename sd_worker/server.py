"""`velesio.v1.ImageWorker`: protobuf <-> domain types around an `ImageEngine`, and slot accounting."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from mesh.errors import InvalidArgument, ResourceExhausted
from mesh.server import Context
from mesh.version import VERSION
from sd_worker.engine import ImageEngine
from sd_worker.types import Done, ImageJob
from velesio.v1 import workers_pb2, workers_pb2_grpc


class ImageWorkerServicer(workers_pb2_grpc.ImageWorkerServicer):
    def __init__(self, engine: ImageEngine, worker_id: str) -> None:
        self.engine = engine
        self.worker_id = worker_id
        self.busy = 0

    async def Generate(
        self, request: workers_pb2.ImageWorkerGenerateRequest, context: Context
    ) -> AsyncIterator[workers_pb2.ImageWorkerGenerateResponse]:
        if request.model and request.model != self.engine.card.id:
            raise InvalidArgument(
                f"this worker serves {self.engine.card.id!r}, not {request.model!r}", field="model"
            )
        job = ImageJob.from_pb(request, self.engine.limits)
        if self.busy >= self.engine.slots:
            raise ResourceExhausted(f"all {self.engine.slots} slots are busy", retry_after=1)
        self.busy += 1
        released = False
        try:
            async with contextlib.aclosing(self.engine.generate(job)) as events:
                async for event in events:
                    if isinstance(event, Done):
                        # Free the slot before the broker hears "done" and sends the next job here.
                        self.busy -= 1
                        released = True
                    yield event.to_pb()
        finally:
            if not released:
                self.busy -= 1

    async def Skip(
        self, request: workers_pb2.ImageWorkerSkipRequest, context: Context
    ) -> workers_pb2.ImageWorkerSkipResponse:
        return workers_pb2.ImageWorkerSkipResponse(skipped=self.engine.skip(request.job_id))

    async def Info(
        self, request: workers_pb2.ImageWorkerInfoRequest, context: Context
    ) -> workers_pb2.ImageWorkerInfoResponse:
        return workers_pb2.ImageWorkerInfoResponse(
            worker_id=self.worker_id,
            models=[self.engine.card.to_pb()],
            samplers=self.engine.samplers,
            schedulers=self.engine.schedulers,
            loras=self.engine.loras,
            slots_total=self.engine.slots,
            slots_busy=self.busy,
            version=VERSION,
        )
