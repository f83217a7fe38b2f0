"""The broker's one event reader on real Redis: many followers of jobs the broker does not run share one
blocking read, each gets the events after its own cursor once and in order, and one that subscribes while
the read blocks is served at once, not after the read's timeout."""

from __future__ import annotations

import asyncio
import time

import redis.asyncio

from broker import reader as reader_module
from broker.events import START, EventLog
from broker.reader import StreamReader, Subscription
from mesh.keys import Keys
from tests.helpers import serving
from velesio.v1 import events_pb2


async def append(client: redis.asyncio.Redis, events: EventLog, job_id: str, text: str) -> str:
    event = events_pb2.JobEvent(token=events_pb2.TokenDelta(text=text))
    async with client.pipeline(transaction=False) as pipe:
        events.add(pipe, job_id, event)
        (event_id,) = await pipe.execute()
    return str(event_id.decode())


async def texts(subscription: Subscription, count: int) -> list[str]:
    found: list[str] = []
    while len(found) < count:
        batch = await subscription.next(3.0)
        assert batch, f"only {found} arrived"
        found += [e.token.text for e in batch]
    return found


async def blocked_clients(client: redis.asyncio.Redis) -> int:
    info = await client.info("clients")
    return int(info["blocked_clients"])


async def test_many_followers_share_one_blocking_read(redis_client: redis.asyncio.Redis, keys: Keys) -> None:
    events = EventLog(redis_client, keys)
    reader = StreamReader(redis_client, events, "broker-a")
    jobs = [f"job-{i}" for i in range(200)]
    subscriptions = [reader.subscribe(job_id, START) for job_id in jobs]
    async with serving(reader, reader_module.BLOCK_MS / 1000 + 5):
        await asyncio.sleep(0.3)
        assert await blocked_clients(redis_client) == 1, "200 followers, one blocking XREAD"
        for i, job_id in enumerate(jobs):
            await append(redis_client, events, job_id, f"{i}-a")
            await append(redis_client, events, job_id, f"{i}-b")
        for i, subscription in enumerate(subscriptions):
            assert await texts(subscription, 2) == [f"{i}-a", f"{i}-b"]
        for subscription in subscriptions:
            subscription.close()
        assert reader.followed == 0


async def test_each_follower_reads_after_its_own_cursor(
    redis_client: redis.asyncio.Redis, keys: Keys
) -> None:
    events = EventLog(redis_client, keys)
    reader = StreamReader(redis_client, events, "broker-a")
    ids = [await append(redis_client, events, "job", text) for text in ("a", "b", "c")]
    from_start = reader.subscribe("job", START)
    from_b = reader.subscribe("job", ids[1])
    async with serving(reader, reader_module.BLOCK_MS / 1000 + 5):
        assert await texts(from_start, 3) == ["a", "b", "c"]
        assert await texts(from_b, 1) == ["c"]
        await append(redis_client, events, "job", "d")
        assert await texts(from_start, 1) == ["d"]
        assert await texts(from_b, 1) == ["d"], "each event once per follower"
        assert await from_b.next(0.2) == []


async def test_a_new_follower_does_not_wait_for_the_read_in_progress(
    redis_client: redis.asyncio.Redis, keys: Keys
) -> None:
    events = EventLog(redis_client, keys)
    reader = StreamReader(redis_client, events, "broker-a")
    reader.subscribe("quiet-job", START)
    async with serving(reader, reader_module.BLOCK_MS / 1000 + 5):
        await asyncio.sleep(0.3)  # the read on quiet-job now blocks for BLOCK_MS
        assert await blocked_clients(redis_client) == 1
        late = reader.subscribe("late-job", START)
        await append(redis_client, events, "late-job", "x")
        began = time.monotonic()
        assert await texts(late, 1) == ["x"]
        waited = time.monotonic() - began
        assert waited < reader_module.BLOCK_MS / 1000 / 2, f"waited {waited:.1f} s for the other read"


async def test_a_redis_failure_reaches_every_follower(keys: Keys) -> None:
    client = redis.asyncio.Redis(port=1)  # nothing listens there
    reader = StreamReader(client, EventLog(client, keys), "broker-a")
    subscriptions = [reader.subscribe(f"job-{i}", START) for i in range(3)]
    async with serving(reader, reader_module.BLOCK_MS / 1000 + 5):
        for subscription in subscriptions:
            try:
                await subscription.next(5.0)
            except redis.ConnectionError:
                continue
            raise AssertionError("a follower did not hear that Redis failed")
    await client.aclose()
