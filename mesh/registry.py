"""The worker registry in Redis: workers register, heartbeat and deregister; brokers read who is alive.

A worker's registration is a key with a TTL, so a worker that stops heart-beating (killed, stalled,
cut off) disappears within `ttl` seconds without anyone cleaning up; a graceful stop deletes it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence

import redis.asyncio
from google.protobuf.timestamp_pb2 import Timestamp

from mesh.keys import Keys
from mesh.tasks import finish, periodic
from velesio.v1 import inference_pb2

log = logging.getLogger(__name__)

DEFAULT_TTL = 3.0


def _now_ms() -> int:
    return int(time.time() * 1000)


class WorkerRegistration:
    """Keeps one worker registered while it serves. Use `async with` around the serving part."""

    def __init__(
        self,
        client: redis.asyncio.Redis,
        keys: Keys,
        info: inference_pb2.WorkerInfo,
        ttl: float = DEFAULT_TTL,
    ) -> None:
        self.client = client
        self.keys = keys
        self.info = info
        self.ttl = ttl
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    async def register(self) -> None:
        now = Timestamp()
        now.GetCurrentTime()
        if not self.info.HasField("registered_at"):
            self.info.registered_at.CopyFrom(now)
        self.info.heartbeat_at.CopyFrom(now)
        ttl_ms = int(self.ttl * 1000)
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.set(self.keys.worker(self.info.worker_id), self.info.SerializeToString(), px=ttl_ms)
            pipe.zadd(self.keys.workers(), {self.info.worker_id: _now_ms() + ttl_ms})
            await pipe.execute()

    async def deregister(self) -> None:
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(self.keys.worker(self.info.worker_id))
            pipe.zrem(self.keys.workers(), self.info.worker_id)
            await pipe.execute()
        log.info("worker %s deregistered", self.info.worker_id)

    async def __aenter__(self) -> WorkerRegistration:
        await self.register()
        self._task = asyncio.create_task(
            periodic(self.ttl / 3, self.register, self._stop, f"heartbeat of {self.info.worker_id}"),
            name="registry-heartbeat",
        )
        log.info("worker %s registered at %s", self.info.worker_id, self.info.address)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._task is not None:
            await finish([self._task], self._stop)
        with contextlib.suppress(redis.RedisError, OSError):
            await self.deregister()


class Registry:
    """What brokers read: the workers alive now, with their busy slots; and broker liveness."""

    def __init__(self, client: redis.asyncio.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys

    async def live_workers(self) -> list[inference_pb2.WorkerInfo]:
        ids: Sequence[bytes] = await self.client.zrange(self.keys.workers(), 0, -1)  # type: ignore[assignment]
        if not ids:
            return []
        names = [i.decode() for i in ids]
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.mget([self.keys.worker(n) for n in names])
            for name in names:
                pipe.hlen(self.keys.worker_busy(name))
            blobs, *busy = await pipe.execute()
        workers, gone = [], []
        for name, blob, slots_busy in zip(names, blobs, busy, strict=True):
            if blob is None:
                gone.append(name)
                continue
            info = inference_pb2.WorkerInfo.FromString(blob)
            info.slots_busy = slots_busy
            workers.append(info)
        if gone:
            # The registration key expired: the worker stopped heart-beating. Drop it from the index.
            await self.client.zrem(self.keys.workers(), *gone)
            log.info("workers gone (no heartbeat): %s", ", ".join(gone))
        return workers

    async def broker_alive(self, broker_id: str, ttl: float) -> None:
        now = _now_ms()
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.zadd(self.keys.brokers(), {broker_id: now + int(ttl * 1000)})
            pipe.zremrangebyscore(self.keys.brokers(), "-inf", now - 60_000)
            await pipe.execute()

    async def broker_gone(self, broker_id: str) -> None:
        await self.client.zrem(self.keys.brokers(), broker_id)

    async def live_brokers(self) -> int:
        return int(await self.client.zcount(self.keys.brokers(), _now_ms(), "+inf"))
