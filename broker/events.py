"""Job event streams in Redis: the dispatcher's relay (broker/relay.py) appends, whoever serves the client
reads.

Each job has one Redis stream. An entry holds either a whole `JobEvent` (field "pb", without its ids,
which the reader fills in from the entry) or, when a Lua script wrote it, a queued event ("queued",
"depth") or a started event ("started" with the worker id, "model", "attempt") as plain fields. The entry
id is the event id that clients resume from.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio

from mesh.keys import Keys
from velesio.v1 import events_pb2

TERMINAL = frozenset({"done", "error"})
START = "0-0"
READ_BATCH = 256  # events one read returns at most


def is_terminal(event: events_pb2.JobEvent) -> bool:
    return event.WhichOneof("event") in TERMINAL


def decode(job_id: str, entry_id: bytes | str, fields: dict[bytes, bytes]) -> events_pb2.JobEvent:
    event_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    if b"pb" in fields:
        event = events_pb2.JobEvent.FromString(fields[b"pb"])
    elif b"started" in fields:
        started = events_pb2.JobStarted(
            worker_id=fields[b"started"].decode(),
            model=fields[b"model"].decode(),
            attempt=int(fields[b"attempt"]),
        )
        event = events_pb2.JobEvent(started=started)
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

    def add(self, pipe: Any, job_id: str, event: events_pb2.JobEvent) -> None:
        """Queues the XADD of an event on a pipeline of the caller's."""
        fields = {"pb": event.SerializeToString()}
        pipe.xadd(self.keys.events(job_id), fields, maxlen=self.max_events, approximate=True)

    async def read(self, job_id: str, after: str, block_ms: int | None) -> list[events_pb2.JobEvent]:
        """Events after `after` ("0-0" for all), waiting up to `block_ms` for one when there are none."""
        reply: Any = await self.client.xread(
            {self.keys.events(job_id): after}, count=READ_BATCH, block=block_ms
        )
        if not reply:
            return []
        _stream, entries = reply[0]
        return [decode(job_id, entry_id, fields) for entry_id, fields in entries]

    async def read_all(self, job_id: str) -> list[events_pb2.JobEvent]:
        """Every event the job's stream holds (up to --max-events)."""
        entries: Any = await self.client.xrange(self.keys.events(job_id), "-", "+")
        return [decode(job_id, entry_id, fields) for entry_id, fields in entries]

    async def exists(self, job_id: str) -> bool:
        return bool(await self.client.exists(self.keys.events(job_id)))
