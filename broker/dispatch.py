"""The dispatcher, one per broker replica: hands queued jobs to workers with free slots, streams each
worker call into the job's Redis event stream, renews the leases of the jobs it runs, reclaims jobs
whose broker died, ends jobs whose deadline passed in the queue, and stops jobs cancelled anywhere."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import redis.asyncio
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from broker.cluster import Cluster
from broker.events import EventLog
from broker.job import JobSpec, kind_name
from broker.queue import CANCELLED_EVENT, Claimed, JobQueue, JobState, error_event
from broker.relay import EventRelay, Lane, LostRun
from broker.worker_calls import GenerateCall, WorkerCalls, to_event
from mesh.errors import status_code
from mesh.keys import Keys
from mesh.tasks import periodic
from observability import metrics
from observability.logs import set_job_context
from observability.tracing import context_from, mark_status, ns, tracer
from velesio.v1 import events_pb2, inference_pb2, store_pb2, workers_pb2

log = logging.getLogger(__name__)
_tracer = tracer("velesio.broker")

# Output that, once it reached a client, a job cannot take back by running again from its start. (Image
# progress can: a re-run shows it again. Text tokens can too, in a way: a resumable text job goes on after
# them, see `_delivered`.)
CONTENT_EVENTS = frozenset({"token", "tool_call", "image", "embeddings"})
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]
DEADLINE_EXCEEDED = grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
# Worker failures after which a job runs again elsewhere (from its start, or a text job after its output).
# A worker whose call failed UNAVAILABLE gets no new job from this replica for this long: long enough for a
# dead worker's registration to expire, short enough that a live one is soon used again.
SUSPECT_S = 5.0
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


@dataclass(frozen=True)
class DispatchSettings:
    broker_id: str
    lease_s: float = 10.0
    max_attempts: int = 3
    poll_s: float = 0.25
    reap_s: float = 1.0


@dataclass
class _Filled:
    """What one pass did with one queue."""

    started: bool = False
    waiting: bool = True  # jobs may be left in the queue (not known to be empty)


class CannotResume(Exception):
    """A text job failed after output and cannot go on from it."""


def cancelled_meanwhile(run: Run) -> bool:
    """Whether the run was cancelled while the caller awaited something (a check mypy does not narrow)."""
    return run.cancelled


@dataclass
class Run:
    """A job this replica runs now."""

    claimed: Claimed
    worker: inference_pb2.WorkerInfo
    lane: Lane
    call: GenerateCall | None = None
    cancelled: bool = False
    lost: bool = False
    worker_gone: bool = False
    delivered: bool = False
    resumable: bool = False  # a text job that goes on from what it delivered when this run fails
    claimed_ms: int = field(default_factory=lambda: int(time.time() * 1000))
    kind: str = ""
    model: str = ""
    created_s: float = 0.0


class Dispatcher:
    def __init__(
        self,
        client: redis.asyncio.Redis,
        keys: Keys,
        queue: JobQueue,
        events: EventLog,
        relay: EventRelay,
        cluster: Cluster,
        calls: WorkerCalls,
        settings: DispatchSettings,
    ) -> None:
        self.client = client
        self.calls = calls
        self.keys = keys
        self.queue = queue
        self.events = events
        self.relay = relay
        self.cluster = cluster
        self.settings = settings
        self.runs: dict[str, Run] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._waiting = True  # the last pass left jobs in a queue (or has not run yet)
        self._stopping = False
        self._suspect: dict[str, float] = {}  # worker id -> monotonic time until which it gets no job
        self._stop_event = asyncio.Event()

    # -- lifecycle ---------------------------------------------------------------------------------

    async def serve(self, stop: asyncio.Event) -> None:
        """Runs until `stop` is set; `stop()` first lets the jobs in flight finish."""
        self._stop_event = stop
        loops = [
            self.relay.serve(stop),
            self._dispatch_loop(),
            periodic(self.settings.lease_s / 3, self._renew, stop, "lease renewal"),
            periodic(self.settings.reap_s, self.reap, stop, "reaper"),
            self._listen(),
        ]
        async with asyncio.TaskGroup() as group:
            for loop in loops:
                group.create_task(loop)

    async def stop(self, grace: float) -> None:
        """Stops taking jobs and waits up to `grace` seconds for running ones; the rest go back to the
        queue (nothing delivered yet, or a text job that goes on after its output) or end with UNAVAILABLE."""
        self._stopping = True
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=grace)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)

    def wake(self) -> None:
        """There may be work: a job queued, re-queued or reclaimed; the dispatcher looks at once."""
        self._waiting = True
        self._wake.set()

    async def work_arrived(self) -> None:
        """A job was queued: this replica's dispatcher looks at once. Other replicas are told only while this
        one is stopping; otherwise they find the work at their next poll, as one PUBLISH per job would wake
        every replica for every job."""
        self.wake()
        if self._stopping:
            with contextlib.suppress(redis.RedisError, OSError):
                await self.client.publish(self.keys.wake_channel(), self.settings.broker_id.encode())

    def slot_freed(self) -> None:
        """A run ended: the dispatcher looks again when its last pass left jobs waiting for a slot (else
        there is nothing to give the slot to until a job arrives, which wakes it anyway)."""
        if self._waiting:
            self._wake.set()

    # -- dispatching -------------------------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        while not self._stopping and not self._stop_event.is_set():
            self._wake.clear()
            try:
                again = await self.dispatch_once()
            except (redis.RedisError, OSError) as exc:
                log.warning("dispatch pass failed: %s", exc)
                again = False
            if not again:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.settings.poll_s)

    async def dispatch_once(self) -> bool:
        """One pass over every queue that has workers. True when it started a job and jobs may still wait
        that a free slot could take (worth another pass at once)."""
        now = time.monotonic()
        workers = [w for w in await self.cluster.workers() if self._suspect.get(w.worker_id, 0.0) <= now]
        if not workers:
            return False
        free = await self._free_slots(workers)
        by_queue: dict[str, list[inference_pb2.WorkerInfo]] = {}
        for worker in workers:
            for model in worker.models:
                queue_key = self.queue.queue_key(kind_name(worker.kind), model)
                by_queue.setdefault(queue_key, []).append(worker)
        started = waiting = False
        for queue_key, candidates in by_queue.items():
            filled = await self._fill(queue_key, candidates, free)
            started |= filled.started
            waiting |= filled.waiting
        self._waiting = waiting
        return started and waiting and any(n > 0 for n in free.values())

    async def _free_slots(self, workers: list[inference_pb2.WorkerInfo]) -> dict[str, int]:
        async with self.client.pipeline(transaction=False) as pipe:
            for worker in workers:
                pipe.hlen(self.keys.worker_busy(worker.worker_id))
            busy = await pipe.execute()
        return {w.worker_id: w.slots_total - b for w, b in zip(workers, busy, strict=True)}

    async def _fill(
        self, queue_key: str, candidates: list[inference_pb2.WorkerInfo], free: dict[str, int]
    ) -> _Filled:
        """Starts jobs of the queue on the candidates' free slots until either runs out."""
        filled = _Filled()
        while not self._stopping:
            available = [w for w in candidates if free[w.worker_id] > 0]
            if not available:
                return filled  # jobs may wait: as far as we know the queue is not empty
            worker, expected = await self._choose(queue_key, available, free)
            settings = self.settings
            outcome = await self.queue.claim(
                queue_key,
                worker.worker_id,
                worker.slots_total,
                settings.broker_id,
                settings.lease_s,
                expected,
            )
            if isinstance(outcome, Claimed):
                free[worker.worker_id] -= 1
                self._start(outcome, worker)
                filled.started = True
                if outcome.remaining == 0:
                    filled.waiting = False
                    return filled
            elif outcome == "full":
                free[worker.worker_id] = 0
            elif outcome.startswith("expired:"):
                await self._expire(outcome.partition(":")[2])
            elif outcome == "gone":
                log.debug("lost the race for the head of %s", queue_key)
            else:  # empty
                filled.waiting = False
                return filled
        return filled

    async def _choose(
        self, queue_key: str, available: list[inference_pb2.WorkerInfo], free: dict[str, int]
    ) -> tuple[inference_pb2.WorkerInfo, str]:
        """The worker for the head job: the one holding its session or prompt prefix in cache when that
        one has a free slot, else the least busy."""
        least_busy = max(
            available, key=lambda w: (free[w.worker_id] / max(w.slots_total, 1), free[w.worker_id])
        )
        if len(available) == 1:
            return least_busy, ""
        head = await self.queue.head(queue_key)
        if head is None:
            return least_busy, ""
        job_id, affinity = head
        if affinity:
            preferred: Any = await self.client.get(self.keys.affinity(affinity))
            for worker in available:
                if preferred is not None and worker.worker_id == preferred.decode():
                    return worker, job_id
        return least_busy, job_id

    async def _expire(self, job_id: str) -> None:
        event = error_event(DEADLINE_EXCEEDED, "the job's deadline passed while it was queued")
        if await self.queue.end_queued(job_id, JobState.FAILED, event, only_if_late=True):
            log.info("job %s expired in the queue", job_id)
            record = await self.queue.record(job_id)
            if record is not None:
                metrics.jobs_finished.add(1, {"kind": record.kind, "model": record.model, "status": "failed"})

    def _start(self, claimed: Claimed, worker: inference_pb2.WorkerInfo) -> None:
        run = Run(claimed, worker, self.relay.open(claimed.job_id, claimed.attempt, claimed.started))
        self.runs[claimed.job_id] = run
        task = asyncio.create_task(self._run(run), name=f"job-{claimed.job_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- running one job ---------------------------------------------------------------------------

    async def _run(self, run: Run) -> None:
        job_id = run.claimed.job_id
        try:
            await self._relay(run)
        except asyncio.CancelledError:
            await asyncio.shield(self._abandon(run))
            raise
        except LostRun as exc:
            log.warning("%s; stopping our run", exc)  # another broker runs the job now
            run.lost = True
            if run.call is not None:
                run.call.cancel()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            # Nothing can be recorded now; the lease, no longer renewed, expires and whichever broker
            # reaps it re-queues the job (nothing delivered yet, or a text job) or ends it UNAVAILABLE.
            log.warning("job %s: Redis unreachable (%s); left to lease expiry", job_id, exc)
            if run.call is not None:
                run.call.cancel()
        except Exception:
            log.exception("job %s: relay failed", job_id)
            await self._end(run, JobState.FAILED, error_event(13, "internal error in the broker"))
        finally:
            self.relay.close(run.lane)
            if self.runs.get(job_id) is run:
                del self.runs[job_id]
            self.slot_freed()

    async def _relay(self, run: Run) -> None:
        job = store_pb2.StoredJob.FromString(run.claimed.spec)
        set_job_context(job.job_id, job.tenant)
        spec = JobSpec.of(job.request)
        run.kind, run.model, run.resumable = spec.kind, spec.model, spec.resumable
        run.created_s = job.created_at.ToMilliseconds() / 1000
        claimed_s = run.claimed_ms / 1000
        labels = {"kind": run.kind, "model": run.model}
        if run.claimed.attempt == 1:  # a re-queued job's wait would include its failed first run
            metrics.queue_wait.record(max(0.0, claimed_s - run.created_s), labels)
        parent = context_from(job.traceparent)
        attributes = {"velesio.job_id": job.job_id, "velesio.kind": run.kind, "velesio.model": run.model}
        attributes["velesio.tenant"] = job.tenant
        waited = _tracer.start_span("queue wait", parent, start_time=ns(run.created_s), attributes=attributes)
        waited.set_attribute("velesio.attempt", run.claimed.attempt)
        waited.end(end_time=ns(claimed_s))
        attributes["velesio.worker_id"] = run.worker.worker_id
        with _tracer.start_as_current_span(
            "dispatch", parent, kind=SpanKind.CLIENT, attributes=attributes, start_time=ns(claimed_s)
        ):
            await self._relay_job(run, job, spec)

    async def _relay_job(self, run: Run, job: store_pb2.StoredJob, spec: JobSpec) -> None:
        # Its started event was written by the claim and is in the lane.
        remaining = run.claimed.deadline_ms / 1000 - time.time() if run.claimed.deadline_ms else None
        if remaining is not None and remaining <= 0:
            await self._end(run, JobState.FAILED, error_event(DEADLINE_EXCEEDED, "deadline passed"))
            return
        try:
            resume = await self._resume(run, spec)
        except CannotResume as exc:
            await self._end(run, JobState.FAILED, error_event(UNAVAILABLE, str(exc)))
            return
        run.call = self.calls.generate(run.worker, job.job_id, spec, remaining or 24 * 3600, resume)
        if run.cancelled:  # while the call was being set up: nothing had one to cancel yet
            run.call.cancel()
        try:
            async for event in self._worker_events(run):
                if event.HasField("done"):
                    event.done.timings.queue_ms = max(0, run.claimed_ms - job.created_at.ToMilliseconds())
                    await self._end(run, JobState.SUCCEEDED, event.SerializeToString())
                    return
                first_output = not run.delivered and event.WhichOneof("event") in CONTENT_EVENTS
                run.delivered = run.delivered or first_output
                first_token = event.HasField("token") or event.HasField("tool_call")
                if first_output and first_token and resume is None:  # a resumed run's is not the job's
                    since = time.time() - run.created_s
                    metrics.time_to_first_token.record(since, {"model": run.model})
                    trace.get_current_span().add_event("first token")
                await self.relay.put(run.lane, event, first_output=first_output)
        except grpc.aio.AioRpcError as exc:
            await self._failed(run, exc.code(), exc.details() or exc.code().name)
            return
        if run.cancelled:
            await self._end(run, JobState.CANCELLED, CANCELLED_EVENT)
        elif run.worker_gone:
            await self._failed(
                run, grpc.StatusCode.UNAVAILABLE, f"worker {run.worker.worker_id} stopped answering"
            )
        elif not run.lost:
            await self._end(
                run, JobState.FAILED, error_event(13, "the worker ended the stream without a result")
            )

    async def _resume(self, run: Run, spec: JobSpec) -> workers_pb2.Resume | None:
        """For a text job run again after output: what its earlier runs delivered (its event stream in Redis
        is what clients got), to go on after, with the seam marked in the stream. None for a first run, or
        one after runs that delivered nothing. CannotResume when what was delivered is no longer known or
        the worker cannot go on from it."""
        if not run.resumable or run.claimed.attempt == 1:
            return None
        events = await self.events.read_all(run.claimed.job_id)
        if events and not events[0].HasField("queued"):  # trimmed: what was delivered is not all there
            raise CannotResume(
                "the job failed after output that its event stream no longer holds (--max-events)"
            )
        resume = workers_pb2.Resume()
        texts = []
        for event in events:
            if event.HasField("token"):
                resume.tokens.extend(event.token.token_ids)
                texts.append(event.token.text)
        if not resume.tokens:
            return None
        if not any("resume" in model.capabilities for model in run.worker.model_details):
            raise CannotResume(
                f"the job failed after output, and worker {run.worker.worker_id} cannot resume it"
            )
        resume.text = "".join(texts)
        seam = events_pb2.JobResumed(delivered_tokens=len(resume.tokens), exact=spec.exact_resume)
        await self.relay.put(run.lane, events_pb2.JobEvent(resumed=seam))
        log.warning("job %s: going on after %d delivered tokens", run.claimed.job_id, len(resume.tokens))
        return resume

    async def _worker_events(self, run: Run) -> AsyncIterator[events_pb2.JobEvent]:
        assert run.call is not None
        try:
            async for response in run.call:
                yield to_event(response)
        except asyncio.CancelledError:
            # grpc raises CancelledError from a call that we cancelled ourselves; that ends the stream.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise

    async def _failed(self, run: Run, code: grpc.StatusCode, details: str) -> None:
        job_id = run.claimed.job_id
        if code == grpc.StatusCode.UNAVAILABLE and not run.cancelled:
            self._suspect[run.worker.worker_id] = time.monotonic() + SUSPECT_S
        if code == grpc.StatusCode.CANCELLED and not run.cancelled:
            # Nobody here cancelled it: the worker did, stopping (its grace period ran out). Not the
            # caller's wish; the job goes elsewhere like any other the worker dropped.
            code, details = grpc.StatusCode.UNAVAILABLE, f"the worker stopped the job ({details})"
        if run.cancelled:
            await self._end(run, JobState.CANCELLED, CANCELLED_EVENT)
        elif (
            code in RETRYABLE
            and (not run.delivered or run.resumable)
            and run.claimed.attempt < self.settings.max_attempts
        ):
            await self.relay.drain(run.lane)  # what was delivered is in Redis before the next run reads it
            if cancelled_meanwhile(run):
                await self._end(run, JobState.CANCELLED, CANCELLED_EVENT)
                return
            requeued = await self.queue.requeue(job_id, run.claimed.attempt, run.worker.worker_id)
            if requeued is not None and requeued.startswith("cancelled:"):
                log.info("job %s: cancelled while its run failed", job_id)
            elif requeued is not None:
                log.warning("job %s: worker %s: %s; re-queued", job_id, run.worker.worker_id, details)
                self.wake()
        elif code == grpc.StatusCode.UNAVAILABLE:
            message = f"worker {run.worker.worker_id} failed: {details}"
            await self._end(run, JobState.FAILED, error_event(UNAVAILABLE, message))
        else:
            await self._end(run, JobState.FAILED, error_event(code.value[0], details))

    async def _abandon(self, run: Run) -> None:
        """This broker is stopping with the job unfinished."""
        if run.call is not None:
            run.call.cancel()
        with contextlib.suppress(Exception):  # what it delivered is in Redis before another broker reads it
            await asyncio.wait_for(self.relay.drain(run.lane), self.settings.lease_s / 2)
        if (not run.delivered or run.resumable) and await self.queue.requeue(
            run.claimed.job_id, run.claimed.attempt, run.worker.worker_id
        ):
            return
        await self._end(run, JobState.FAILED, error_event(UNAVAILABLE, "the broker running the job stopped"))

    async def _end(self, run: Run, state: JobState, event: bytes) -> None:
        final = events_pb2.JobEvent.FromString(event)
        if final.HasField("error"):
            code = status_code(final.error.code)
            mark_status(trace.get_current_span(), code, final.error.message)
        await self.relay.drain(run.lane)  # the final event comes after every other in the stream
        job_id = run.claimed.job_id
        event_id = await self.queue.finish(job_id, run.claimed.attempt, run.worker.worker_id, state, final)
        if event_id is None:
            log.info("job %s: no longer ours (reclaimed); dropping its result", job_id)
            return
        final.event_id, final.job_id = event_id, job_id
        self.relay.close(run.lane, final)
        labels = {"kind": run.kind, "model": run.model, "status": state.value}
        metrics.jobs_finished.add(1, labels)  # counted where it ended: a reclaimed run counts at its owner
        if run.created_s:
            metrics.job_duration.record(time.time() - run.created_s, labels)

    # -- cancel, leases, reaping -------------------------------------------------------------------

    async def cancel(self, job_id: str) -> None:
        """Stops a running job wherever it runs: here at once, else its broker hears it by pub/sub."""
        if not self.cancel_local(job_id):
            await self.client.publish(self.keys.cancel_channel(), job_id.encode())

    def cancel_local(self, job_id: str) -> bool:
        run = self.runs.get(job_id)
        if run is None:
            return False
        run.cancelled = True
        if run.call is not None:
            run.call.cancel()
        return True

    async def _listen(self) -> None:
        """Wake-ups and cancels from other replicas; a lost Redis connection is resubscribed, not fatal
        (an exception here would end the whole dispatcher)."""
        while not self._stop_event.is_set():
            try:
                await self._listen_once()
            except (redis.RedisError, OSError) as exc:
                log.warning("pub/sub listener failed: %s; subscribing again", exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop_event.wait(), self.settings.poll_s)

    async def _listen_once(self) -> None:
        pubsub = self.client.pubsub()
        await pubsub.subscribe(self.keys.wake_channel(), self.keys.cancel_channel())
        cancel = self.keys.cancel_channel().encode()
        own = self.settings.broker_id.encode()
        try:
            while not self._stop_event.is_set():
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is None:
                    continue
                if message["channel"] == cancel:
                    self.cancel_local(message["data"].decode())
                elif message["data"] != own:  # our own news woke us already
                    self.wake()
        finally:
            await pubsub.aclose()

    async def _renew(self) -> None:
        live = {w.worker_id for w in await self.cluster.workers(fresh=True)} if self.runs else set()
        for job_id, run in list(self.runs.items()):
            if run.worker.worker_id not in live and run.call is not None:
                # Its worker stopped heart-beating (stalled, cut off): stop waiting for it.
                log.warning(
                    "job %s: worker %s left the registry; giving up on it", job_id, run.worker.worker_id
                )
                run.worker_gone = True
                run.call.cancel()
                continue
            owned = await self.queue.renew(
                job_id, run.claimed.attempt, run.worker.worker_id, self.settings.lease_s
            )
            if not owned and job_id in self.runs:
                log.warning(
                    "job %s: its lease was taken over (this broker stalled?); stopping our run", job_id
                )
                run.lost = True
                if run.call is not None:
                    run.call.cancel()

    async def reap(self) -> None:
        now_ms = int(time.time() * 1000)
        for job_id in await self.queue.overdue(now_ms):
            await self._expire(job_id)
        for job_id in await self.queue.expired_leases(now_ms):
            if job_id in self.runs:
                continue
            record = await self.queue.record(job_id)
            stored = await self.queue.stored(job_id)
            resumable = stored is not None and JobSpec.of(stored.request).resumable
            outcome = await self.queue.reclaim(
                job_id, record.worker if record else "", self.settings.max_attempts, resumable
            )
            if outcome not in ("alive", "stale"):
                log.warning("job %s: its broker stopped renewing the lease; %s", job_id, outcome)
                self.wake()
