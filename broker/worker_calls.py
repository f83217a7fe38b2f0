"""Every call the broker makes to a worker: a job's run (`Generate` or `Embed`, streamed), the text worker's
tools (`Tokenize`, `Detokenize`, `ApplyTemplate`, on any worker of the model) and an image job's `Skip`."""

from __future__ import annotations

import random
from typing import Any

import grpc

from broker.cluster import Cluster
from broker.job import JobSpec
from mesh.errors import Unavailable
from observability.tracing import trace_metadata
from velesio.v1 import events_pb2, inference_pb2, workers_pb2, workers_pb2_grpc

TOOL_TIMEOUT_S = 30.0

GenerateCall = grpc.aio.UnaryStreamCall[Any, Any]


def to_event(
    response: workers_pb2.TextWorkerGenerateResponse
    | workers_pb2.TextWorkerEmbedResponse
    | workers_pb2.ImageWorkerGenerateResponse,
) -> events_pb2.JobEvent:
    """A worker's stream message as a job event (without ids: the relay gives it its event id)."""
    which = response.WhichOneof("event")
    event = events_pb2.JobEvent()
    if which is not None:
        getattr(event, which).CopyFrom(getattr(response, which))
    return event


class WorkerCalls:
    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    def generate(
        self,
        worker: inference_pb2.WorkerInfo,
        job_id: str,
        spec: JobSpec,
        timeout: float,
        resume: workers_pb2.Resume | None = None,
    ) -> GenerateCall:
        """Starts the job's run on the worker (a text job going on after `resume`, what earlier runs
        delivered); its messages become events with `to_event`."""
        channel = self.cluster.channel(worker.address)
        metadata = trace_metadata()
        request = spec.request
        if spec.form == "image":
            image = workers_pb2.ImageWorkerGenerateRequest(
                job_id=job_id, model=request.image.model, params=request.image.params
            )
            image_stub = workers_pb2_grpc.ImageWorkerStub(channel)
            return image_stub.Generate(image, timeout=timeout, metadata=metadata)
        if spec.form == "embed":
            embed = workers_pb2.TextWorkerEmbedRequest(
                job_id=job_id, model=spec.model, inputs=request.embed.inputs, params=request.embed.params
            )
            return workers_pb2_grpc.TextWorkerStub(channel).Embed(embed, timeout=timeout, metadata=metadata)
        text = workers_pb2.TextWorkerGenerateRequest(job_id=job_id, model=spec.model)
        if spec.form == "complete":
            text.prompt = request.complete.prompt
            text.sampling.CopyFrom(request.complete.sampling)
        else:
            chat = request.chat
            text.chat.messages.extend(chat.messages)
            text.chat.tools.extend(chat.tools)
            text.chat.tool_choice.CopyFrom(chat.tool_choice)
            text.chat.parallel_tool_calls = (
                chat.parallel_tool_calls if chat.HasField("parallel_tool_calls") else True
            )
            text.sampling.CopyFrom(chat.sampling)
        if resume is not None:
            text.resume.CopyFrom(resume)
        options = spec.options
        text.session_id = options.session_id
        text.cache_prompt = options.cache_prompt if options.HasField("cache_prompt") else True
        return workers_pb2_grpc.TextWorkerStub(channel).Generate(text, timeout=timeout, metadata=metadata)

    async def skip_image(self, worker_id: str, job_id: str) -> bool:
        """Asks the image worker running the job to end its current image; False when it runs none."""
        worker = next((w for w in await self.cluster.workers(fresh=True) if w.worker_id == worker_id), None)
        if worker is None:
            raise Unavailable(f"worker {worker_id} is gone")
        stub = workers_pb2_grpc.ImageWorkerStub(self.cluster.channel(worker.address))
        skip = workers_pb2.ImageWorkerSkipRequest(job_id=job_id)
        reply = await stub.Skip(skip, timeout=TOOL_TIMEOUT_S, metadata=trace_metadata())
        return bool(reply.skipped)

    async def tokenize(
        self, model: str, tenant: str, request: workers_pb2.TextWorkerTokenizeRequest
    ) -> workers_pb2.TextWorkerTokenizeResponse:
        stub = await self._text_worker(model, tenant)
        return await stub.Tokenize(request, timeout=TOOL_TIMEOUT_S, metadata=trace_metadata())

    async def detokenize(
        self, model: str, tenant: str, request: workers_pb2.TextWorkerDetokenizeRequest
    ) -> workers_pb2.TextWorkerDetokenizeResponse:
        stub = await self._text_worker(model, tenant)
        return await stub.Detokenize(request, timeout=TOOL_TIMEOUT_S, metadata=trace_metadata())

    async def apply_template(
        self, model: str, tenant: str, request: workers_pb2.TextWorkerApplyTemplateRequest
    ) -> workers_pb2.TextWorkerApplyTemplateResponse:
        stub = await self._text_worker(model, tenant)
        return await stub.ApplyTemplate(request, timeout=TOOL_TIMEOUT_S, metadata=trace_metadata())

    async def _text_worker(self, model: str, tenant: str) -> workers_pb2_grpc.TextWorkerAsyncStub:
        """Any live worker of the text model (the tenant's default one when `model` is empty)."""
        model = await self.cluster.resolve_model("text", model, tenant)
        workers = await self.cluster.workers_for("text", model)
        if not workers:
            raise Unavailable(f"no worker serves text model {model!r} now")
        return workers_pb2_grpc.TextWorkerStub(self.cluster.channel(random.choice(workers).address))
