"""`velesio.v1.Inference`: protobuf in, protobuf out. Authentication, then the work is `Jobs`'s."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import TypeVar

from broker import validate
from broker.auth import Authenticator
from broker.cluster import Cluster
from broker.job import KINDS, Kind, kind_filter, kind_name, kind_pb
from broker.jobs import Jobs
from broker.queue import JobQueue
from broker.worker_calls import WorkerCalls
from mesh.errors import Internal, NotFound, Unavailable, error_for_code, status_code
from mesh.server import Context
from velesio.v1 import common_pb2, events_pb2, inference_pb2, inference_pb2_grpc, workers_pb2

Response = TypeVar("Response")


def _metadata(context: Context, key: str) -> str:
    return next((str(v) for k, v in context.invocation_metadata() or () if k == key), "")


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(
        self, auth: Authenticator, jobs: Jobs, cluster: Cluster, queue: JobQueue, calls: WorkerCalls
    ) -> None:
        self.auth = auth
        self.jobs = jobs
        self.calls = calls
        self.cluster = cluster
        self.queue = queue

    async def _stream(
        self,
        request: inference_pb2.SubmitRequest,
        context: Context,
        wrap: Callable[[events_pb2.JobEvent], Response],
    ) -> AsyncIterator[Response]:
        """Queues the job and streams its events; the caller going away (or its deadline) cancels the job."""
        tenant = self.auth.tenant(context)
        queued = await self.jobs.submit(
            tenant,
            request,
            traceparent=_metadata(context, "traceparent"),
            call_timeout_s=context.time_remaining(),
        )
        job_id = queued.job_id
        finished = False
        try:
            yield wrap(queued)
            async for event in self.jobs.follow(job_id, queued.event_id, submitted_here=True):
                finished = event.WhichOneof("event") in ("done", "error")
                yield wrap(event)
        except Exception:
            # This side failed (e.g. Redis unreachable), the caller did not leave: the job goes on, and
            # the caller may pick it up again with Watch.
            finished = True
            raise
        finally:
            if not finished:
                self.jobs.cancel_soon(job_id)

    async def Complete(
        self, request: inference_pb2.CompleteRequest, context: Context
    ) -> AsyncIterator[inference_pb2.CompleteResponse]:
        submit = inference_pb2.SubmitRequest(complete=request)
        async for response in self._stream(
            submit, context, lambda e: inference_pb2.CompleteResponse(event=e)
        ):
            yield response

    async def Chat(
        self, request: inference_pb2.ChatRequest, context: Context
    ) -> AsyncIterator[inference_pb2.ChatResponse]:
        submit = inference_pb2.SubmitRequest(chat=request)
        async for response in self._stream(submit, context, lambda e: inference_pb2.ChatResponse(event=e)):
            yield response

    async def GenerateImage(
        self, request: inference_pb2.GenerateImageRequest, context: Context
    ) -> AsyncIterator[inference_pb2.GenerateImageResponse]:
        submit = inference_pb2.SubmitRequest(image=request)
        async for response in self._stream(
            submit, context, lambda e: inference_pb2.GenerateImageResponse(event=e)
        ):
            yield response

    async def Submit(
        self, request: inference_pb2.SubmitRequest, context: Context
    ) -> inference_pb2.SubmitResponse:
        tenant = self.auth.tenant(context)
        queued = await self.jobs.submit(tenant, request, traceparent=_metadata(context, "traceparent"))
        return inference_pb2.SubmitResponse(job_id=queued.job_id, queue_position=queued.queued.position)

    async def Watch(
        self, request: inference_pb2.WatchRequest, context: Context
    ) -> AsyncIterator[inference_pb2.WatchResponse]:
        tenant = self.auth.tenant(context)
        validate.check_event_id(request.after_event_id)
        await self.jobs.record(tenant, request.job_id)
        async for event in self.jobs.follow(request.job_id, request.after_event_id):
            yield inference_pb2.WatchResponse(event=event)

    async def ListJobs(
        self, request: inference_pb2.ListJobsRequest, context: Context
    ) -> inference_pb2.ListJobsResponse:
        tenant = self.auth.tenant(context)
        kind = kind_filter(request.kind)
        limit = min(max(request.limit or 20, 1), 100)
        return inference_pb2.ListJobsResponse(jobs=await self.jobs.recent(tenant, kind, limit))

    async def GetJob(
        self, request: inference_pb2.GetJobRequest, context: Context
    ) -> inference_pb2.GetJobResponse:
        job = await self.jobs.describe(self.auth.tenant(context), request.job_id)
        return inference_pb2.GetJobResponse(job=job)

    async def CancelJob(
        self, request: inference_pb2.CancelJobRequest, context: Context
    ) -> inference_pb2.CancelJobResponse:
        job = await self.jobs.cancel(self.auth.tenant(context), request.job_id)
        return inference_pb2.CancelJobResponse(job=job)

    async def SkipImage(
        self, request: inference_pb2.SkipImageRequest, context: Context
    ) -> inference_pb2.SkipImageResponse:
        skipped = await self.jobs.skip_image(self.auth.tenant(context), request.job_id)
        return inference_pb2.SkipImageResponse(skipped=skipped)

    async def Tokenize(
        self, request: inference_pb2.TokenizeRequest, context: Context
    ) -> inference_pb2.TokenizeResponse:
        reply = await self.calls.tokenize(
            request.model,
            self.auth.tenant(context),
            workers_pb2.TextWorkerTokenizeRequest(
                content=request.content,
                add_special=request.add_special,
                parse_special=request.parse_special,
                with_pieces=request.with_pieces,
            ),
        )
        return inference_pb2.TokenizeResponse(tokens=reply.tokens, pieces=reply.pieces)

    async def Detokenize(
        self, request: inference_pb2.DetokenizeRequest, context: Context
    ) -> inference_pb2.DetokenizeResponse:
        reply = await self.calls.detokenize(
            request.model,
            self.auth.tenant(context),
            workers_pb2.TextWorkerDetokenizeRequest(tokens=request.tokens),
        )
        return inference_pb2.DetokenizeResponse(content=reply.content)

    async def ApplyTemplate(
        self, request: inference_pb2.ApplyTemplateRequest, context: Context
    ) -> inference_pb2.ApplyTemplateResponse:
        tenant = self.auth.tenant(context)  # before validation: a caller without a token learns nothing
        validate.check_messages(request.messages)
        validate.check_tools(
            inference_pb2.ChatRequest(
                messages=request.messages, tools=request.tools, tool_choice=request.tool_choice
            )
        )
        add = request.add_generation_prompt if request.HasField("add_generation_prompt") else True
        parallel = request.parallel_tool_calls if request.HasField("parallel_tool_calls") else True
        reply = await self.calls.apply_template(
            request.model,
            tenant,
            workers_pb2.TextWorkerApplyTemplateRequest(
                messages=request.messages,
                add_generation_prompt=add,
                tools=request.tools,
                tool_choice=request.tool_choice,
                parallel_tool_calls=parallel,
            ),
        )
        return inference_pb2.ApplyTemplateResponse(prompt=reply.prompt)

    async def ListModels(
        self, request: inference_pb2.ListModelsRequest, context: Context
    ) -> inference_pb2.ListModelsResponse:
        self.auth.tenant(context)
        kind = kind_filter(request.kind)
        models = await self.cluster.models(kind, fresh=True)
        return inference_pb2.ListModelsResponse(models=[models[m] for m in sorted(models)])

    async def Embed(
        self, request: inference_pb2.EmbedRequest, context: Context
    ) -> inference_pb2.EmbedResponse:
        """A queued job like the others, answered once it is done: every input's embedding, in order."""
        reply = inference_pb2.EmbedResponse()
        found: dict[int, common_pb2.Embedding] = {}
        async for event in self._stream(inference_pb2.SubmitRequest(embed=request), context, lambda e: e):
            which = event.WhichOneof("event")
            reply.job_id = event.job_id or reply.job_id
            if which == "started":
                reply.model = event.started.model
            elif which == "embeddings":
                found.update((e.index, e) for e in event.embeddings.embeddings)
            elif which == "done":
                reply.usage.CopyFrom(event.done.usage)
            elif which == "error":
                raise error_for_code(status_code(event.error.code), event.error.message)
        missing = [i for i in range(len(request.inputs)) if i not in found]
        if missing:
            raise Internal(f"the worker returned no embedding for inputs {missing[:5]}")
        reply.embeddings.extend(found[i] for i in range(len(request.inputs)))
        return reply

    async def GetDefaultModels(
        self, request: inference_pb2.GetDefaultModelsRequest, context: Context
    ) -> inference_pb2.GetDefaultModelsResponse:
        tenant = self.auth.tenant(context)
        kinds = [kind_name(request.kind)] if request.kind else list(KINDS.values())
        return inference_pb2.GetDefaultModelsResponse(
            defaults=[await self._default(tenant, k) for k in kinds]
        )

    async def SetDefaultModel(
        self, request: inference_pb2.SetDefaultModelRequest, context: Context
    ) -> inference_pb2.SetDefaultModelResponse:
        tenant = self.auth.tenant(context)
        if request.kind:
            kinds = [kind_name(request.kind)]
        elif request.model:
            kinds = [await self.cluster.kind_of(request.model)]
        else:
            kinds = list(KINDS.values())
        for kind in kinds:
            await self.cluster.set_tenant_default(tenant, kind, request.model)
        defaults = [await self._default(tenant, k) for k in KINDS.values()]
        return inference_pb2.SetDefaultModelResponse(defaults=defaults)

    async def _default(self, tenant: str, kind: Kind) -> inference_pb2.DefaultModel:
        if chosen := await self.cluster.tenant_default(tenant, kind):
            return inference_pb2.DefaultModel(kind=kind_pb(kind), model=chosen, tenant_choice=True)
        try:
            model = await self.cluster.served_model(kind, "")  # the tenant's own is read above
        except (Unavailable, NotFound):  # nothing of the kind served, or the configured default not (yet)
            model = self.cluster.default_models.get(kind, "")
        return inference_pb2.DefaultModel(kind=kind_pb(kind), model=model)

    async def GetCluster(
        self, request: inference_pb2.GetClusterRequest, context: Context
    ) -> inference_pb2.GetClusterResponse:
        self.auth.tenant(context)
        workers = await self.cluster.workers(fresh=True)
        queues = []
        for kind, model in await self.queue.queues():
            depth = await self.queue.depth(self.queue.queue_key(kind, model))
            queues.append(inference_pb2.QueueInfo(kind=kind_pb(kind), model=model, depth=depth))
        brokers = await self.cluster.registry.live_brokers()
        return inference_pb2.GetClusterResponse(workers=workers, queues=queues, brokers=brokers)

    async def WhoAmI(
        self, request: inference_pb2.WhoAmIRequest, context: Context
    ) -> inference_pb2.WhoAmIResponse:
        return inference_pb2.WhoAmIResponse(tenant=self.auth.tenant(context))
