"""One reader of Redis for every caller on this broker that follows a job it does not run.

Such a caller (a `Watch` on another replica than the job's, or a job still waiting in the queue) subscribes
here with the id of the last event it has. One task reads every subscribed job stream with one blocking
`XREAD` and hands each subscription the events after its cursor, so that a thousand waiting callers hold one
Redis connection and cost one round trip per batch of events, not one connection and one loop each.

The read also covers the broker's own wake stream (`Keys.reader_wake`): a caller that subscribes while a read
blocks appends to it, which ends that read at once. Unlike `CLIENT UNBLOCK` this cannot be lost to a race:
an entry appended before the read reached Redis is returned by it all the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import redis.asyncio

from broker.events import READ_BATCH, START, EventLog, decode
from broker.relay import event_id_key
from velesio.v1 import events_pb2

log = logging.getLogger(__name__)

# A read with nothing new returns after this long and starts again; under redis-py's default socket
# timeout (5 s), which would end the read as a failure.
BLOCK_MS = 2_000
RETRY_S = 0.25  # after Redis failed a read
WAKE_TTL_MS = 60_000


class Subscription:
    """The events of one job after `cursor`, as the reader finds them."""

    def __init__(self, reader: StreamReader, job_id: str, after: str) -> None:
        self._reader = reader
        self.job_id = job_id
        self.cursor = after
        self._key = event_id_key(after)
        self._batches: asyncio.Queue[list[events_pb2.JobEvent] | BaseException] = asyncio.Queue()

    async def next(self, timeout_s: float) -> list[events_pb2.JobEvent]:
        """The next events (in order, each once), or [] when none came within `timeout_s`; raises what
        made Redis fail meanwhile."""
        try:
            batch = await asyncio.wait_for(self._batches.get(), timeout_s)
        except TimeoutError:
            return []
        if isinstance(batch, BaseException):
            raise batch
        return batch

    def close(self) -> None:
        self._reader._unsubscribe(self)

    def _deliver(self, events: list[events_pb2.JobEvent]) -> None:
        fresh = [e for e in events if event_id_key(e.event_id) > self._key]
        if fresh:
            self.cursor = fresh[-1].event_id
            self._key = event_id_key(self.cursor)
            self._batches.put_nowait(fresh)

    def _fail(self, exc: BaseException) -> None:
        self._batches.put_nowait(exc)


class StreamReader:
    def __init__(self, client: redis.asyncio.Redis, events: EventLog, broker_id: str) -> None:
        self.client = client
        self.events = events
        self._wake_key = events.keys.reader_wake(broker_id)
        self._wake_cursor = START
        self._subscriptions: dict[str, set[Subscription]] = {}
        self._changed = asyncio.Event()
        self._blocking = False  # a read is on its way: new subscriptions must end it
        self._waking: set[asyncio.Task[None]] = set()

    def subscribe(self, job_id: str, after: str) -> Subscription:
        """The job's events after `after` from now on, until the subscription is closed."""
        subscription = Subscription(self, job_id, after)
        self._subscriptions.setdefault(job_id, set()).add(subscription)
        self._changed.set()
        if self._blocking:
            self._blocking = False  # one wake per read
            task = asyncio.create_task(self._wake())
            self._waking.add(task)
            task.add_done_callback(self._waking.discard)
        return subscription

    @property
    def followed(self) -> int:
        """How many jobs the reader follows now."""
        return len(self._subscriptions)

    def _unsubscribe(self, subscription: Subscription) -> None:
        subscribed = self._subscriptions.get(subscription.job_id)
        if subscribed is not None:
            subscribed.discard(subscription)
            if not subscribed:
                del self._subscriptions[subscription.job_id]

    async def _wake(self) -> None:
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.xadd(self._wake_key, {"w": 1}, maxlen=1, approximate=False)
                pipe.pexpire(self._wake_key, WAKE_TTL_MS)
                await pipe.execute()
        except (redis.RedisError, OSError) as exc:  # the read ends by itself within BLOCK_MS
            log.debug("waking the event reader failed: %s", exc)

    async def serve(self, stop: asyncio.Event) -> None:
        """Reads until `stop` is set."""
        stopping = asyncio.create_task(stop.wait())
        stopping.add_done_callback(lambda _: self._changed.set())
        try:
            while not stop.is_set():
                if not self._subscriptions:
                    await self._changed.wait()
                    self._changed.clear()
                    continue
                try:
                    await self._read()
                except (redis.RedisError, OSError) as exc:
                    log.warning("reading job events failed: %s", exc)
                    for subscribed in self._subscriptions.values():
                        for subscription in subscribed:
                            subscription._fail(exc)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), RETRY_S)
        finally:
            stopping.cancel()

    async def _read(self) -> None:
        self._changed.clear()
        streams: dict[Any, Any] = {self._wake_key: self._wake_cursor}
        job_of: dict[str, str] = {}
        for job_id, subscribed in self._subscriptions.items():
            key = self.events.keys.events(job_id)
            streams[key] = min((s.cursor for s in subscribed), key=event_id_key)
            job_of[key] = job_id
        self._blocking = True
        try:
            reply: Any = await self.client.xread(streams, count=READ_BATCH, block=BLOCK_MS)
        finally:
            self._blocking = False
        for stream, entries in reply or ():
            key = stream.decode() if isinstance(stream, bytes) else stream
            if key == self._wake_key:
                last = entries[-1][0]
                self._wake_cursor = last.decode() if isinstance(last, bytes) else last
                continue
            job_id = job_of[key]
            batch = [decode(job_id, entry_id, fields) for entry_id, fields in entries]
            for subscription in list(self._subscriptions.get(job_id, ())):
                subscription._deliver(batch)
