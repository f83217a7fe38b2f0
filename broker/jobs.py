"""What the Inference service does with jobs: accept (validate, resolve the model, store, queue), follow
a job's events for a caller, read and cancel jobs, all scoped to the caller's tenant."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import redis.asyncio
from google.protobuf.timestamp_pb2 import Timestamp

from broker import validate
from broker.cluster import Cluster
from broker.dispatch import Dispatcher
from broker.events import READ_BATCH, START, EventLog, is_terminal
from broker.job import JobSpec
from broker.queue import CANCELLED_EVENT, JobQueue, JobRecord, JobState, NewJob
from broker.reader import StreamReader, Subscription
from broker.relay import EventRelay, Follower, event_id_key
from mesh.errors import FailedPrecondition, NotFound
from observability import metrics
from observability.logs import job_context
from observability.tracing import current_traceparent, tracer
from velesio.v1 import events_pb2, inference_pb2, store_pb2

log = logging.getLogger(__name__)
_tracer = tracer("velesio.broker")

CANCEL_WAIT_S = 2.0
# A caller's stream waits this long for Redis to come back (restarted, failed over) before it ends
# UNAVAILABLE; the call's own deadline still holds. Its job goes on meanwhile, or after, from what it
# delivered.
REDIS_WAIT_S = 30.0
LOCAL_START_WAIT_S = 0.05  # how long a caller waits for this broker to start its job before reading Redis


@dataclass
class _Seen:
    """What a follower last told its caller of a queued job's position."""

    position: int | None = None


@dataclass(frozen=True)
class JobDefaults:
    timeout_s: float = 600.0
    queue_poll_s: float = 1.0


class Jobs:
    def __init__(
        self,
        queue: JobQueue,
        events: EventLog,
        relay: EventRelay,
        reader: StreamReader,
        cluster: Cluster,
        dispatcher: Dispatcher,
        limits: validate.RequestLimits,
        defaults: JobDefaults,
        *,
        log_content: bool = False,
    ) -> None:
        self.log_content = log_content
        self.queue = queue
        self.events = events
        self.relay = relay
        self.reader = reader
        self.cluster = cluster
        self.dispatcher = dispatcher
        self.limits = limits
        self.defaults = defaults
        self._background: set[asyncio.Task[None]] = set()
        # Set while this broker shuts down: streams it ends were not abandoned by their callers, who
        # may resume them with Watch on another replica, so their jobs must not be cancelled.
        self.shutting_down = False

    async def submit(
        self,
        tenant: str,
        request: inference_pb2.SubmitRequest,
        *,
        traceparent: str = "",
        call_timeout_s: float | None = None,
    ) -> events_pb2.JobEvent:
        """Validates and queues a job; returns its first event (queued: job id, position, event id)."""
        spec = JobSpec.of(request)
        kind = spec.kind
        # A refused request is the caller's mistake: the span is not marked as failed.
        kind_attribute = {"velesio.kind": kind}
        with _tracer.start_as_current_span(
            "validate", attributes=kind_attribute, record_exception=False, set_status_on_exception=False
        ):
            spec.check(self.limits)
            spec.body.model = await self.cluster.resolve_model(kind, spec.model, tenant)
            if spec.form == "embed":
                await self.cluster.require_capability(kind, spec.model, "embed")
                await self.cluster.check_token_ids(kind, spec.model, spec.token_ids())
            elif spec.form in ("complete", "chat"):
                await self.cluster.require_capability(kind, spec.model, "generate")
                if spec.uses_tools:
                    await self.cluster.require_capability(kind, spec.model, "tools")
        options = spec.options
        timeouts = [t for t in (options.timeout_ms / 1000, call_timeout_s) if t]
        deadline_s = time.time() + min(timeouts or [self.defaults.timeout_s])
        job_id = uuid.uuid4().hex
        # The trace continues from this broker's span (itself a child of the caller's), across the queue.
        traceparent = current_traceparent() or traceparent
        stored = store_pb2.StoredJob(job_id=job_id, tenant=tenant, request=request, traceparent=traceparent)
        stored.created_at.GetCurrentTime()
        stored.deadline.CopyFrom(_timestamp(deadline_s))
        new = NewJob(
            job_id=job_id,
            tenant=tenant,
            kind=kind,
            model=spec.model,
            priority=options.priority,
            deadline_ms=int(deadline_s * 1000),
            affinity=spec.affinity(tenant),
            spec=stored.SerializeToString(),
        )
        attributes = {"velesio.job_id": job_id, "velesio.kind": kind, "velesio.model": spec.model}
        attributes["velesio.tenant"] = tenant
        with _tracer.start_as_current_span("enqueue", attributes=attributes) as span:
            queued = await self.queue.submit(new)
            span.set_attribute("velesio.queue_position", queued.queued.position)
        metrics.jobs_submitted.add(1, {"kind": kind, "model": spec.model})
        await self.dispatcher.work_arrived()
        with job_context(job_id, tenant):
            log.info("job queued: %s, model %s, %s", kind, spec.model, self._describe_input(spec))
        return queued

    def _describe_input(self, spec: JobSpec) -> str:
        """What the log says of a job's input: its size, or (only when asked for) the text itself."""
        text = spec.prompt_text()
        return f"prompt {text!r}" if self.log_content else f"{len(text)} prompt characters"

    async def record(self, tenant: str, job_id: str) -> JobRecord:
        """The caller's job; other tenants' jobs and unknown ids alike are NOT_FOUND."""
        record = await self.queue.record(job_id) if job_id else None
        if record is None or record.tenant != tenant:
            raise NotFound(f"job {job_id!r} not found")
        return record

    async def skip_image(self, tenant: str, job_id: str) -> bool:
        """Ends the image a running image job is making now (the rest of its batch goes on); False when
        the job is not running."""
        record = await self.record(tenant, job_id)
        if record.kind != "image":
            raise FailedPrecondition(f"job {job_id} is not an image job")
        if record.state != JobState.RUNNING:
            return False
        return await self.dispatcher.calls.skip_image(record.worker, job_id)

    async def describe(self, tenant: str, job_id: str) -> inference_pb2.Job:
        record = await self.record(tenant, job_id)
        position = await self.queue.position(record) if record.state == JobState.QUEUED else None
        return record.to_pb(position or 0)

    async def recent(self, tenant: str, kind: str | None, limit: int) -> list[inference_pb2.Job]:
        """The tenant's newest jobs (of a kind), newest first; expired ones are skipped."""
        found = []
        for job_id in await self.queue.recent(tenant, 100):
            record = await self.queue.record(job_id)
            if record is None or record.tenant != tenant or (kind and record.kind != kind):
                continue
            position = await self.queue.position(record) if record.state == JobState.QUEUED else None
            found.append(record.to_pb(position or 0))
            if len(found) >= limit:
                break
        return found

    async def cancel(self, tenant: str, job_id: str) -> inference_pb2.Job:
        await self.record(tenant, job_id)
        await self._cancel(job_id)
        return await self.describe(tenant, job_id)

    async def _cancel(self, job_id: str) -> None:
        if await self.queue.end_queued(job_id, JobState.CANCELLED, CANCELLED_EVENT):
            log.info("job %s cancelled while queued", job_id)
            record = await self.queue.record(job_id)
            if record is not None:
                metrics.jobs_finished.add(
                    1, {"kind": record.kind, "model": record.model, "status": "cancelled"}
                )
            return
        if await self.queue.request_cancel(job_id) == JobState.RUNNING:
            await self.dispatcher.cancel(job_id)
            await self._await_end(job_id)

    async def _await_end(self, job_id: str) -> None:
        """Waits (briefly) until a cancelled running job has ended, so the caller sees its final state."""
        give_up = time.monotonic() + CANCEL_WAIT_S
        while time.monotonic() < give_up:
            record = await self.queue.record(job_id)
            if record is None or record.state.ended:
                return
            await asyncio.sleep(0.02)

    def cancel_soon(self, job_id: str) -> None:
        """Cancels in the background: the caller of a stream went away and its task is being torn down."""
        if self.shutting_down:
            return
        task = asyncio.create_task(self._cancel_quietly(job_id), name=f"cancel-{job_id}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _cancel_quietly(self, job_id: str) -> None:
        try:
            await self._cancel(job_id)
        except (redis.ConnectionError, redis.TimeoutError) as exc:  # nobody awaits this task to hear it
            log.warning("job %s: cannot cancel, Redis unreachable (%s)", job_id, exc)

    async def follow(
        self, job_id: str, after: str = "", *, submitted_here: bool = False
    ) -> AsyncIterator[events_pb2.JobEvent]:
        """The job's events after `after`, live, until its last one: in memory while this broker runs the
        job, else from Redis through the broker's one reader. While the job waits, a fresh queued event is
        yielded whenever its position changes (ephemeral: it carries the last stored event id). A job
        `submitted_here` was just queued by this broker (`after` is its queued event), and this broker's
        dispatcher most likely takes it: that is waited for a moment first."""
        last = after or START
        seen = _Seen()
        # Whether `last` is an event of the stream itself (not any id a caller made up): then a first run
        # followed from its start needs no catch-up read.
        read_the_stream = submitted_here
        if submitted_here:
            await self.relay.opened(job_id, LOCAL_START_WAIT_S)
        subscription: Subscription | None = None  # to the broker's reader, while the job runs elsewhere
        outage: float | None = None  # since when Redis has been unreachable
        try:
            while True:
                try:
                    with self.relay.follow(job_id) as follower:
                        if follower is not None:
                            if subscription is not None:
                                subscription.close()
                                subscription = None
                            catch_up = not (follower.from_the_start and read_the_stream)
                            events = self._follow_here(job_id, last, follower, catch_up)
                        else:
                            subscription = subscription or self.reader.subscribe(job_id, last)
                            events = self._read_from_redis(job_id, last, seen, subscription)
                        async for event in events:
                            last = event.event_id
                            read_the_stream = True
                            outage = None
                            yield event
                            if is_terminal(event):
                                return
                except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                    outage = outage or time.monotonic()
                    if time.monotonic() - outage > REDIS_WAIT_S:
                        raise
                    log.warning("job %s: Redis unreachable (%s); the stream waits for it", job_id, exc)
                    if subscription is not None:  # a new one, from where the caller is
                        subscription.close()
                        subscription = None
                    await asyncio.sleep(min(1.0, 0.1 + (time.monotonic() - outage) / 4))
        finally:
            if subscription is not None:
                subscription.close()

    async def _read_from_redis(
        self, job_id: str, last: str, seen: _Seen, subscription: Subscription
    ) -> AsyncIterator[events_pb2.JobEvent]:
        """What the broker's reader found of the job's stream after `last`, waiting a little; when nothing
        came, the job's final event if it ended, or its queue position if that moved."""
        batch = await subscription.next(self.defaults.queue_poll_s)
        for event in batch:
            if event.HasField("queued"):
                seen.position = event.queued.position
            yield event
        if batch:
            return
        record = await self.queue.record(job_id)
        if record is None:
            raise NotFound(f"job {job_id!r} not found (it may have expired)")
        if record.state.ended:
            yield await self._final(record, last)
        elif record.state == JobState.QUEUED:
            now = await self.queue.position(record)
            if now is not None and now != seen.position:
                seen.position = now
                depth = await self.queue.depth(record.queue)
                queued = events_pb2.JobQueued(position=now, queue_depth=depth)
                yield events_pb2.JobEvent(event_id=last, job_id=job_id, queued=queued)

    async def _follow_here(
        self, job_id: str, after: str, follower: Follower, catch_up: bool
    ) -> AsyncIterator[events_pb2.JobEvent]:
        """Events of a job this broker runs: what Redis has after `after` (written before the subscription
        began; `catch_up` False when nothing can be), then each event as the relay writes it, each once; ends
        when the relay lets go of the job."""
        last = event_id_key(after)
        while catch_up:
            batch = await self.events.read(job_id, after, None)
            for event in batch:
                after, last = event.event_id, event_id_key(event.event_id)
                yield event
            if len(batch) < READ_BATCH:
                break
        while (written := await follower.next()) is not None:
            if event_id_key(written.event_id) > last:
                last = event_id_key(written.event_id)
                yield written

    async def _final(self, record: JobRecord, last: str) -> events_pb2.JobEvent:
        """The terminal event of an ended job whose stream had no more events for us (e.g. trimmed)."""
        batch = await self.events.read(record.job_id, last, None)
        for event in batch:
            if is_terminal(event):
                return event
        event = events_pb2.JobEvent.FromString(record.result)
        event.event_id, event.job_id = record.last_event_id, record.job_id
        return event


def _timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp
