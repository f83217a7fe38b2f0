"""Job events on their way from a worker call to Redis and to the callers this broker serves.

The dispatcher hands each event of a job it runs to the relay and goes on reading the worker's stream. One
writer task writes whatever has gathered in one pipelined round trip, and token deltas of one job that
gathered meanwhile become one event, so Redis round trips grow with ticks, not tokens. Once written, an event
has its id (the Redis stream entry id), and callers on this broker that follow the job get it in memory at
once; Redis stays the record that `Watch` resumes from, on any broker, exactly once by event id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio

from broker import scripts
from broker.events import EventLog, is_terminal
from velesio.v1 import events_pb2

log = logging.getLogger(__name__)

# A job's events not yet written; past this the dispatcher waits for the writer (Redis is slower than the
# worker), so that memory stays bounded.
MAX_BACKLOG = 1024


def event_id_key(event_id: str) -> tuple[int, int]:
    """A Redis stream id ("ms-seq") as a pair that sorts as Redis orders them."""
    ms, _, seq = event_id.partition("-")
    return int(ms or 0), int(seq or 0)


class LostRun(Exception):
    """The run no longer owns its job (reclaimed by another broker after this one stalled): nothing more of
    it is written."""


@dataclass(eq=False)
class Lane:
    """One run of a job that the relay carries: how many of its events are written, who follows it on this
    broker, and what made a write fail."""

    job_id: str
    attempt: int = 1
    first: events_pb2.JobEvent | None = None  # the run's started event, written when the job was claimed
    put: int = 0  # events handed to the relay
    written: int = 0  # of those, written to Redis
    error: BaseException | None = None
    followers: set[asyncio.Queue[events_pb2.JobEvent | None]] = field(default_factory=set)
    progress: asyncio.Event = field(default_factory=asyncio.Event)  # set whenever `written` moves


@dataclass
class _Item:
    lane: Lane
    event: events_pb2.JobEvent
    first_output: bool
    count: int = 1  # events of the dispatcher's that this one stands for (merged token deltas)


class Follower:
    """A caller's subscription to a job this broker runs: events as they are written (each with its event
    id), then None when the relay stops carrying the job (its end, a re-queue, a lost lease): the follower
    then reads on from Redis."""

    def __init__(self, lane: Lane) -> None:
        self._lane = lane
        self._queue: asyncio.Queue[events_pb2.JobEvent | None] = asyncio.Queue()
        lane.followers.add(self._queue)
        # The job's first run, nothing of it written by the relay yet: the stream holds only its queued and
        # started events, and every later event reaches this follower (the started one at once). One that
        # has read the queued event needs no catch-up read.
        self.from_the_start = lane.attempt == 1 and lane.written == 0
        if self.from_the_start and lane.first is not None:
            self._queue.put_nowait(lane.first)

    async def next(self) -> events_pb2.JobEvent | None:
        return await self._queue.get()

    def close(self) -> None:
        self._lane.followers.discard(self._queue)


class EventRelay:
    def __init__(self, client: redis.asyncio.Redis, events: EventLog) -> None:
        self.client = client
        self.events = events
        self._append = client.register_script(scripts.APPEND_EVENT)
        self._lanes: dict[str, Lane] = {}
        self._pending: list[_Item] = []
        self._wake = asyncio.Event()
        self._opening: dict[str, asyncio.Event] = {}  # jobs whose followers wait for a run here

    # -- the dispatcher's side --------------------------------------------------------------------

    def open(self, job_id: str, attempt: int = 1, first: events_pb2.JobEvent | None = None) -> Lane:
        """The dispatcher starts a run of the job (`first`: its event already written, with its id): callers
        on this broker may follow it in memory."""
        previous = self._lanes.get(job_id)
        if previous is not None:  # an earlier run of it here, re-queued and claimed again before it closed
            self.close(previous)
        lane = self._lanes[job_id] = Lane(job_id, attempt, first)
        if (opening := self._opening.get(job_id)) is not None:
            opening.set()
        return lane

    async def put(self, lane: Lane, event: events_pb2.JobEvent, *, first_output: bool = False) -> None:
        """Hands over an event to be written; `first_output` also records on the job, in the same script,
        that output reached the caller (after which only a text job is re-queued, to go on after it).
        Returns at once unless the run's backlog is full; raises what made an earlier write of the run fail
        (LostRun when another broker took the job over)."""
        if lane.error is not None:
            raise lane.error
        self._pending.append(_Item(lane, event, first_output))
        lane.put += 1
        self._wake.set()
        if lane.put - lane.written > MAX_BACKLOG:
            await self.drain(lane)

    async def drain(self, lane: Lane) -> None:
        """Waits until every event handed over for the run is written; raises what made a write fail."""
        while lane.written < lane.put and lane.error is None:
            lane.progress.clear()
            await lane.progress.wait()
        if lane.error is not None:
            raise lane.error

    def close(self, lane: Lane, final: events_pb2.JobEvent | None = None) -> None:
        """The run ends here; `final` (its terminal event, with its event id) reaches the followers first.
        Followers then read on from Redis, where everything is."""
        if self._lanes.get(lane.job_id) is lane:
            del self._lanes[lane.job_id]
        for queue in lane.followers:
            if final is not None:
                queue.put_nowait(final)
            queue.put_nowait(None)
        lane.followers.clear()

    # -- the followers' side ----------------------------------------------------------------------

    async def opened(self, job_id: str, limit_s: float) -> None:
        """Returns once this broker runs the job, or after `limit_s`: a job queued here is most often taken
        by this broker's own dispatcher, which is faster to wait for than a blocking read of Redis."""
        if job_id in self._lanes:
            return
        opening = self._opening.setdefault(job_id, asyncio.Event())
        try:
            await asyncio.wait_for(opening.wait(), limit_s)
        except TimeoutError:
            pass
        finally:
            self._opening.pop(job_id, None)

    @contextlib.contextmanager
    def follow(self, job_id: str) -> Iterator[Follower | None]:
        """A subscription to the job's events while this broker runs it; None when it does not."""
        lane = self._lanes.get(job_id)
        follower = Follower(lane) if lane is not None and lane.error is None else None
        try:
            yield follower
        finally:
            if follower is not None:
                follower.close()

    # -- the writer -------------------------------------------------------------------------------

    async def serve(self, stop: asyncio.Event) -> None:
        """Writes what has gathered, one round trip at a time, until `stop` is set and nothing is left."""
        stopping = asyncio.create_task(stop.wait())
        stopping.add_done_callback(lambda _: self._wake.set())
        try:
            while self._pending or not stop.is_set():
                await self._wake.wait()
                self._wake.clear()
                if self._pending:
                    batch, self._pending = merge(self._pending), []
                    await self._write(batch)
        finally:
            stopping.cancel()

    async def _write(self, batch: list[_Item]) -> None:
        # A run whose write failed gets nothing more written: a later event after a lost one is a gap.
        batch = [item for item in batch if item.lane.error is None]
        if not batch:
            return
        keys = self.events.keys
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for item in batch:
                    event, lane = item.event, item.lane
                    progress = event.progress.SerializeToString() if event.HasField("progress") else b""
                    await self._append(
                        keys=[keys.job(lane.job_id), keys.events(lane.job_id)],
                        args=[
                            lane.attempt,
                            int(item.first_output),
                            progress,
                            self.events.max_events,
                            event.SerializeToString(),
                        ],
                        client=pipe,
                    )
                replies: list[Any] = await pipe.execute()
        except (redis.RedisError, OSError) as exc:
            log.warning("writing %d job events failed: %s", len(batch), exc)
            for item in batch:
                item.lane.error = exc
                item.lane.progress.set()
            return
        for item, event_id in zip(batch, replies, strict=True):
            if not event_id:
                item.lane.error = LostRun(
                    f"job {item.lane.job_id}: run {item.lane.attempt} no longer owns it"
                )
                item.lane.progress.set()
                continue
            item.event.event_id = event_id.decode() if isinstance(event_id, bytes) else event_id
            item.event.job_id = item.lane.job_id
            item.lane.written += item.count
            item.lane.progress.set()
            if not is_terminal(item.event):
                for queue in item.lane.followers:
                    queue.put_nowait(item.event)


def merge(items: list[_Item]) -> list[_Item]:
    """Consecutive token deltas of one job become one delta (text joined, ids and log-probabilities in
    order), and so do consecutive pieces of one tool call (arguments joined; a call's first piece, with its
    id and name, stays first); every other event, and the order of each job's events, stay as they are."""
    merged: list[_Item] = []
    last_of: dict[str, _Item] = {}
    for item in items:
        job_id = item.lane.job_id
        previous = last_of.get(job_id)
        if previous is not None and _joins(previous.event, item.event):
            if previous.count == 1:  # the dispatcher's own object: copy before changing it
                copied = events_pb2.JobEvent()
                copied.CopyFrom(previous.event)
                previous.event = copied
            if item.event.HasField("token"):
                token = previous.event.token
                token.text += item.event.token.text
                token.token_ids.extend(item.event.token.token_ids)
                token.logprobs.extend(item.event.token.logprobs)
            else:
                previous.event.tool_call.arguments += item.event.tool_call.arguments
            previous.first_output |= item.first_output
            previous.count += 1
            continue
        merged.append(item)
        last_of[job_id] = item
    return merged


def _joins(previous: events_pb2.JobEvent, event: events_pb2.JobEvent) -> bool:
    if previous.HasField("token") and event.HasField("token"):
        return True
    return (
        previous.HasField("tool_call")
        and event.HasField("tool_call")
        and event.tool_call.index == previous.tool_call.index
        and not event.tool_call.id  # a later piece of the same call
    )
