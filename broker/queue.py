"""The durable job queue in Redis: submit, claim with a lease, renew, finish, re-queue, cancel, reclaim.

One sorted set per (kind, model), scored by priority then arrival, so that the position of any job is
one ZRANK (O(log n)). Each transition is one Lua script from `broker.scripts`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import redis.asyncio
from google.protobuf.timestamp_pb2 import Timestamp

from broker import scripts
from mesh import errors
from mesh.keys import Keys
from observability import metrics
from velesio.v1 import common_pb2, events_pb2, inference_pb2, store_pb2

log = logging.getLogger(__name__)


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def ended(self) -> bool:
        return self not in (JobState.QUEUED, JobState.RUNNING)

    def to_pb(self) -> common_pb2.JobState.ValueType:
        return common_pb2.JobState.Value(f"JOB_STATE_{self.name}")


@dataclass(frozen=True)
class QueueLimits:
    max_depth: int = 10_000
    rate_per_minute: int = 0
    max_active_per_tenant: int = 0
    max_queued_per_tenant: int = 0


@dataclass(frozen=True)
class NewJob:
    job_id: str
    tenant: str
    kind: str
    model: str
    priority: int
    deadline_ms: int  # unix ms; 0 means none
    affinity: str
    spec: bytes  # StoredJob


@dataclass(frozen=True)
class Claimed:
    job_id: str
    attempt: int
    spec: bytes
    deadline_ms: int
    remaining: int  # jobs left in the queue after this one
    affinity: str
    started: events_pb2.JobEvent  # written by the claim, with its event id


@dataclass(frozen=True)
class JobRecord:
    """A job as its Redis hash has it."""

    job_id: str
    tenant: str
    kind: str
    model: str
    state: JobState
    priority: int
    attempts: int
    worker: str
    created_ms: int
    started_ms: int
    finished_ms: int
    result: bytes
    last_event_id: str
    queue: str
    cancel_requested: bool
    progress: bytes = b""

    @classmethod
    def from_hash(cls, job_id: str, fields: dict[bytes, bytes]) -> JobRecord:
        def text(name: str) -> str:
            return fields.get(name.encode(), b"").decode()

        def number(name: str) -> int:
            return int(float(fields.get(name.encode(), b"0") or b"0"))

        return cls(
            job_id=job_id,
            tenant=text("tenant"),
            kind=text("kind"),
            model=text("model"),
            state=JobState(text("state")),
            priority=number("priority"),
            attempts=number("attempts"),
            worker=text("worker"),
            created_ms=number("created_ms"),
            started_ms=number("started_ms"),
            finished_ms=number("finished_ms"),
            result=fields.get(b"result", b""),
            last_event_id=text("last_event_id"),
            queue=text("queue"),
            cancel_requested=text("cancel") == "1",
            progress=fields.get(b"progress", b""),
        )

    def to_pb(self, queue_position: int = 0) -> inference_pb2.Job:
        job = inference_pb2.Job(
            job_id=self.job_id,
            kind=common_pb2.JobKind.Value(f"JOB_KIND_{self.kind.upper()}"),
            model=self.model,
            state=self.state.to_pb(),
            priority=self.priority,
            queue_position=queue_position,
            worker_id=self.worker,
            last_event_id=self.last_event_id,
            attempts=self.attempts,
        )
        for field, ms in (("created_at", self.created_ms), ("started_at", self.started_ms)):
            if ms:
                getattr(job, field).CopyFrom(_timestamp(ms))
        if self.finished_ms:
            job.finished_at.CopyFrom(_timestamp(self.finished_ms))
        if self.progress:
            job.progress.ParseFromString(self.progress)
        if self.result:
            final = events_pb2.JobEvent.FromString(self.result)
            if final.HasField("done"):
                job.finish_reason = final.done.finish_reason
                job.usage.CopyFrom(final.done.usage)
            elif final.HasField("error"):
                job.error.CopyFrom(final.error)
        return job


def _timestamp(ms: int) -> Timestamp:
    stamp = Timestamp()
    stamp.FromMilliseconds(ms)
    return stamp


def error_event(code: int, message: str) -> bytes:
    return events_pb2.JobEvent(error=events_pb2.JobError(code=code, message=message)).SerializeToString()


CANCELLED_EVENT = error_event(1, "cancelled")


ScriptArg = bytes | str | int | float
AFFINITY_TTL_MS = 600_000  # how long a session or prompt prefix prefers the worker that served it last


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class JobQueue:
    def __init__(
        self,
        client: redis.asyncio.Redis,
        keys: Keys,
        *,
        limits: QueueLimits = QueueLimits(),
        ttl_s: float = 3600.0,
        max_events: int = 10_000,
    ) -> None:
        self.client = client
        self.keys = keys
        self.limits = limits
        self.ttl_ms = int(ttl_s * 1000)
        self.max_events = max_events
        self._enqueue = client.register_script(scripts.ENQUEUE)
        self._claim = client.register_script(scripts.CLAIM)
        self._renew = client.register_script(scripts.RENEW)
        self._finish = client.register_script(scripts.FINISH)
        self._requeue = client.register_script(scripts.REQUEUE)
        self._end_queued = client.register_script(scripts.END_QUEUED)
        self._reclaim = client.register_script(scripts.RECLAIM)
        self._request_cancel = client.register_script(scripts.REQUEST_CANCEL)

    def queue_key(self, kind: str, model: str) -> str:
        return self.keys.queue(kind, model)

    async def submit(self, job: NewJob) -> events_pb2.JobEvent:
        """Queues the job; returns its queued event (position, depth, event id) as the stream has it."""
        window = int(time.time() // 60)
        keys = [
            self.keys.job(job.job_id),
            self.queue_key(job.kind, job.model),
            self.keys.queues(),
            self.keys.deadlines(),
            self.keys.tenant_queued(job.tenant),
            self.keys.tenant_running(job.tenant),
            self.keys.tenant_rate(job.tenant, window),
            self.keys.events(job.job_id),
            self.keys.sequence(),
            self.keys.tenant_jobs(job.tenant),
        ]
        limits = self.limits
        args: list[ScriptArg] = [
            job.job_id, job.spec, job.tenant, job.kind, job.model, job.priority, job.deadline_ms,
            limits.max_depth, limits.max_queued_per_tenant, limits.max_active_per_tenant,
            limits.rate_per_minute, 60_000, self.max_events, job.affinity,
        ]  # fmt: skip
        reply: Any = await self._enqueue(keys=keys, args=args)
        outcome = _str(reply[0])
        if outcome == "ok":
            queued = events_pb2.JobQueued(position=int(reply[1]), queue_depth=int(reply[3]))
            return events_pb2.JobEvent(event_id=_str(reply[2]), job_id=job.job_id, queued=queued)
        metrics.rate_limited.add(1, {"reason": outcome})
        if outcome == "rate":
            raise errors.ResourceExhausted(
                f"rate limit: {limits.rate_per_minute} requests per minute", retry_after=int(reply[1]) / 1000
            )
        if outcome == "depth":
            raise errors.ResourceExhausted(
                f"the {job.kind} queue of model {job.model!r} is full ({reply[1]} jobs)", retry_after=1
            )
        if outcome == "tenant_queued":
            raise errors.ResourceExhausted(
                f"limit of {limits.max_queued_per_tenant} queued jobs", retry_after=1
            )
        raise errors.ResourceExhausted(f"limit of {limits.max_active_per_tenant} active jobs", retry_after=1)

    async def claim(
        self, queue: str, worker_id: str, slots: int, broker_id: str, lease_s: float, expected: str = ""
    ) -> Claimed | str:
        """Takes the job at the head of `queue` (or `expected`) for the worker if it has a free slot, writes
        its started event and notes the worker for its affinity key. Returns the claimed job, or why not:
        "full", "empty", "gone" (another broker took it), or "expired:<job id>" (its deadline passed; the
        caller ends it)."""
        keys = [queue, self.keys.worker_busy(worker_id), self.keys.leases(), self.keys.deadlines()]
        args: list[ScriptArg] = [
            expected, slots, int(lease_s * 1000), broker_id, worker_id,
            self.keys.job(""), self.keys.tenant_queued(""), self.keys.tenant_running(""),
            self.keys.events(""), self.max_events, self.keys.affinity(""), AFFINITY_TTL_MS,
        ]  # fmt: skip
        reply: Any = await self._claim(keys=keys, args=args)
        outcome = _str(reply[0])
        if outcome == "ok":
            job_id, attempt = _str(reply[1]), int(reply[2])
            started = events_pb2.JobStarted(worker_id=worker_id, model=_str(reply[8]), attempt=attempt)
            return Claimed(
                job_id=job_id,
                attempt=attempt,
                spec=bytes(reply[3]),
                deadline_ms=int(reply[4]),
                remaining=int(reply[5]),
                affinity=_str(reply[6]),
                started=events_pb2.JobEvent(event_id=_str(reply[7]), job_id=job_id, started=started),
            )
        if outcome == "expired":
            return f"expired:{_str(reply[1])}"
        return outcome

    async def renew(self, job_id: str, attempt: int, worker_id: str, lease_s: float) -> bool:
        keys = [self.keys.job(job_id), self.keys.leases(), self.keys.worker_busy(worker_id)]
        return bool(await self._renew(keys=keys, args=[job_id, attempt, int(lease_s * 1000)]))

    async def finish(
        self, job_id: str, attempt: int, worker_id: str, state: JobState, event: events_pb2.JobEvent
    ) -> str | None:
        """Records the final event of a run this broker owns; None when it no longer owns it."""
        keys = [
            self.keys.job(job_id),
            self.keys.events(job_id),
            self.keys.leases(),
            self.keys.worker_busy(worker_id),
        ]
        args: list[ScriptArg] = [
            job_id, attempt, state.value, event.SerializeToString(), self.ttl_ms, self.max_events,
            self.keys.tenant_running(""),
        ]  # fmt: skip
        reply: Any = await self._finish(keys=keys, args=args)
        return None if reply is None else _str(reply)

    async def requeue(self, job_id: str, attempt: int, worker_id: str) -> str | None:
        """Puts a running job back in its queue: the queued event's id; "cancelled:<id>" when a cancel was
        requested meanwhile (the job then ends cancelled); None when the run no longer owns the job."""
        keys = [
            self.keys.job(job_id), self.keys.events(job_id), self.keys.leases(),
            self.keys.worker_busy(worker_id), self.keys.deadlines(),
        ]  # fmt: skip
        args: list[ScriptArg] = [
            job_id,
            attempt,
            self.max_events,
            self.keys.tenant_running(""),
            self.keys.tenant_queued(""),
            CANCELLED_EVENT,
            self.ttl_ms,
        ]
        reply: Any = await self._requeue(keys=keys, args=args)
        return None if reply is None else _str(reply)

    async def end_queued(
        self, job_id: str, state: JobState, event: bytes, *, only_if_late: bool = False
    ) -> bool:
        """Ends a job that is still queued (cancel, or deadline passed). False when it was not queued."""
        keys = [self.keys.job(job_id), self.keys.events(job_id), self.keys.deadlines()]
        args: list[ScriptArg] = [
            job_id, state.value, event, self.ttl_ms, self.max_events, self.keys.tenant_queued(""),
            1 if only_if_late else 0,
        ]  # fmt: skip
        reply: Any = await self._end_queued(keys=keys, args=args)
        return _str(reply[0]) == "ok"

    async def request_cancel(self, job_id: str) -> str:
        """Marks a running job for cancellation; returns the job's state ('' when unknown)."""
        return _str(await self._request_cancel(keys=[self.keys.job(job_id)]))

    async def reclaim(self, job_id: str, worker_id: str, max_attempts: int, resumable: bool = False) -> str:
        """Takes back a running job whose lease expired: re-queued when it delivered nothing yet, or when it
        is `resumable` (its next run goes on from what it delivered); else failed."""
        keys = [
            self.keys.job(job_id), self.keys.events(job_id), self.keys.leases(),
            self.keys.worker_busy(worker_id), self.keys.deadlines(),
        ]  # fmt: skip
        args: list[ScriptArg] = [
            job_id, max_attempts, CANCELLED_EVENT,
            error_event(14, "the broker running this job stopped after the job had produced output"),
            self.ttl_ms, self.max_events, self.keys.tenant_running(""), self.keys.tenant_queued(""),
            1 if resumable else 0,
        ]  # fmt: skip
        reply: Any = await self._reclaim(keys=keys, args=args)
        return _str(reply[0])

    async def recent(self, tenant: str, limit: int) -> list[str]:
        """The tenant's newest job ids, newest first."""
        return [_str(i) for i in await self.client.zrevrange(self.keys.tenant_jobs(tenant), 0, limit - 1)]

    async def expired_leases(self, now_ms: int) -> list[str]:
        return [_str(i) for i in await self.client.zrangebyscore(self.keys.leases(), "-inf", now_ms)]

    async def overdue(self, now_ms: int) -> list[str]:
        return [_str(i) for i in await self.client.zrangebyscore(self.keys.deadlines(), "-inf", now_ms)]

    async def stored(self, job_id: str) -> store_pb2.StoredJob | None:
        """The job as it was submitted."""
        spec: Any = await self.client.hget(self.keys.job(job_id), "spec")
        return store_pb2.StoredJob.FromString(spec) if spec else None

    async def record(self, job_id: str) -> JobRecord | None:
        fields: dict[bytes, bytes] = await self.client.hgetall(self.keys.job(job_id))  # type: ignore[assignment]
        return JobRecord.from_hash(job_id, fields) if fields else None

    async def position(self, record: JobRecord) -> int | None:
        rank: Any = await self.client.zrank(record.queue, record.job_id)
        return None if rank is None else int(rank)

    async def queues(self) -> list[tuple[str, str]]:
        """(kind, model) of every queue that has been used."""
        members = sorted(_str(m) for m in await self.client.smembers(self.keys.queues()))
        return [(kind, model) for kind, _, model in (m.partition("\n") for m in members)]

    async def depth(self, queue: str) -> int:
        return int(await self.client.zcard(queue))

    async def head(self, queue: str) -> tuple[str, str] | None:
        """The first job id of the queue and its affinity key."""
        ids = await self.client.zrange(queue, 0, 0)
        if not ids:
            return None
        job_id = _str(ids[0])
        affinity: Any = await self.client.hget(self.keys.job(job_id), "affinity")
        return job_id, _str(affinity or b"")
