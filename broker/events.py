"""Job event streams in Redis: the dispatcher appends, whoever serves the client reads.

Each job has one Redis stream. An entry holds either a whole `JobEvent` (field "pb", without its ids,
which the reader fills in from the entry) or, when a Lua script wrote it, a queued event as plain
fields ("queued", "depth"). The entry id is the event id that clients resume from.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio

from mesh.keys import Keys
from velesio.v1 import events_pb2

TERMINAL = frozenset({"done", "error"})
START = "0-0"


def is_terminal(event: events_pb2.JobEvent) -> bool:
    return event.WhichOneof("event") in TERMINAL


def decode(job_id: str, entry_id: bytes | str, fields: dict[bytes, bytes]) -> events_pb2.JobEvent:
    event_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    if b"pb" in fields:
        event = events_pb2.JobEvent.FromString(fields[b"pb"])
    else:
        queued = events_pb2.JobQueued(position=int(fields[b"queued"]), queue_depth=int(fields[b"depth"]))
        event = events_pb2.JobEvent(queued=queued)
    event.event_id = event_id
    event.job_id = job_id
    return event


class EventLog:
    def __init__(self, client: redis.asyncio.Redis, keys: Keys, *, max_events: int = 10_000) -> None:
        self.client = client
        self.keys = keys
        self.max_events = max_events

    async def append(self, job_id: str, event: events_pb2.JobEvent, *, first_output: bool = False) -> None:
        """Appends an event; `first_output` also records on the job that output reached the caller, after
        which a worker failure can no longer re-queue it. Image progress is also kept on the job itself,
        for GetJob (Automatic1111's progress polling)."""
        async with self.client.pipeline(transaction=first_output) as pipe:
            self.add(pipe, job_id, event)
            if first_output:
                pipe.hset(self.keys.job(job_id), "delivered", 1)
            if event.HasField("progress"):
                pipe.hset(self.keys.job(job_id), "progress", event.progress.SerializeToString())
            await pipe.execute()

    def add(self, pipe: Any, job_id: str, event: events_pb2.JobEvent) -> None:
        """Queues the XADD of an event on a pipeline of the caller's."""
        fields = {"pb": event.SerializeToString()}
        pipe.xadd(self.keys.events(job_id), fields, maxlen=self.max_events, approximate=True)

    async def read(self, job_id: str, after: str, block_ms: int | None) -> list[events_pb2.JobEvent]:
        """Events after `after` ("0-0" for all), waiting up to `block_ms` for one when there are none."""
        reply: Any = await self.client.xread({self.keys.events(job_id): after}, count=256, block=block_ms)
        if not reply:
            return []
        _stream, entries = reply[0]
        return [decode(job_id, entry_id, fields) for entry_id, fields in entries]

    async def exists(self, job_id: str) -> bool:
        return bool(await self.client.exists(self.keys.events(job_id)))
