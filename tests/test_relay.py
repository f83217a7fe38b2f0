"""The event relay on real Redis: events written in order with one round trip per tick, token deltas that
gathered meanwhile merged losslessly, followers on the broker served in memory with the ids Redis gave, and a
stream resumed on another broker under load, each event exactly once."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio

from broker.events import EventLog
from broker.queue import Claimed, JobQueue, JobState, NewJob
from broker.relay import EventRelay, LostRun, event_id_key
from mesh.keys import Keys
from tests.conftest import StartFactory
from tests.helpers import collect, complete, inference, next_event, serving, text_of
from velesio.v1 import events_pb2, inference_pb2, store_pb2

JOB = "relay-job"


async def running(client: redis.asyncio.Redis, keys: Keys, attempt: int = 1) -> None:
    """The job's record as a claim leaves it: the relay writes only for the run that owns it."""
    await client.hset(keys.job(JOB), mapping={"state": "running", "attempts": attempt})


def token(text: str, token_id: int) -> events_pb2.JobEvent:
    logprob = events_pb2.TokenLogprob(token=text, logprob=-0.5)
    return events_pb2.JobEvent(
        token=events_pb2.TokenDelta(text=text, token_ids=[token_id], logprobs=[logprob])
    )


async def test_deltas_that_gather_become_one_event_in_order(
    redis_client: redis.asyncio.Redis, keys: Keys
) -> None:
    events = EventLog(redis_client, keys)
    relay = EventRelay(redis_client, events)
    await running(redis_client, keys)
    lane = relay.open(JOB)
    started = events_pb2.JobEvent(started=events_pb2.JobStarted(worker_id="w", model="m", attempt=1))
    with relay.follow(JOB) as follower:
        assert follower is not None
        await relay.put(lane, started)
        for i, piece in enumerate("hello"):  # handed over before the writer runs: they gather
            await relay.put(lane, token(piece, i), first_output=i == 0)
        async with serving(relay):
            await relay.drain(lane)
            stored = await events.read(JOB, "0-0", None)
            assert [e.WhichOneof("event") for e in stored] == ["started", "token"]
            delta = stored[1].token
            assert delta.text == "hello" and list(delta.token_ids) == [0, 1, 2, 3, 4]
            assert [p.token for p in delta.logprobs] == list("hello")
            assert await redis_client.hget(keys.job(JOB), "delivered") == b"1"

            await relay.put(lane, token("!", 5))
            await relay.drain(lane)
            final = events_pb2.JobEvent(done=events_pb2.JobDone(), event_id="99999999999999-0", job_id=JOB)
            relay.close(lane, final)
            heard = []
            while (event := await follower.next()) is not None:
                heard.append(event)
    stored = await events.read(JOB, "0-0", None)
    assert [(e.event_id, e.WhichOneof("event")) for e in heard[:-1]] == [
        (e.event_id, e.WhichOneof("event")) for e in stored
    ]
    assert text_of(heard) == "hello!" and heard[-1].HasField("done")
    ids = [event_id_key(e.event_id) for e in heard]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    with relay.follow(JOB) as gone:
        assert gone is None, "a closed run has no followers: they read Redis"


async def test_pieces_of_one_tool_call_that_gather_become_one_event(
    redis_client: redis.asyncio.Redis, keys: Keys
) -> None:
    events = EventLog(redis_client, keys)
    relay = EventRelay(redis_client, events)
    await running(redis_client, keys)
    lane = relay.open(JOB)
    pieces = [
        events_pb2.ToolCallDelta(index=0, id="call_a", name="say", arguments=""),
        events_pb2.ToolCallDelta(index=0, arguments='{"line": '),
        events_pb2.ToolCallDelta(index=0, arguments='"hi"}'),
        events_pb2.ToolCallDelta(index=1, id="call_b", name="say", arguments=""),
        events_pb2.ToolCallDelta(index=1, arguments="{}"),
    ]
    for i, piece in enumerate(pieces):
        await relay.put(lane, events_pb2.JobEvent(tool_call=piece), first_output=i == 0)
    async with serving(relay):
        await relay.drain(lane)
        stored = [e.tool_call for e in await events.read(JOB, "0-0", None)]
    assert [(c.index, c.id, c.name, c.arguments) for c in stored] == [
        (0, "call_a", "say", '{"line": "hi"}'),
        (1, "call_b", "say", "{}"),
    ]


async def test_a_run_that_lost_its_job_writes_nothing_more(
    redis_client: redis.asyncio.Redis, keys: Keys
) -> None:
    """A broker that stalled past its lease: the job was reclaimed (attempt 2 runs elsewhere) and its late
    events must not land after the new run's."""
    events = EventLog(redis_client, keys)
    relay = EventRelay(redis_client, events)
    await running(redis_client, keys)
    stale = relay.open(JOB, attempt=1)
    async with serving(relay):
        await relay.put(stale, token("a", 1), first_output=True)
        await relay.drain(stale)
        await running(redis_client, keys, attempt=2)  # reclaimed and claimed again
        await relay.put(stale, token("b", 2))
        with pytest.raises(LostRun):
            await relay.drain(stale)
        with pytest.raises(LostRun):
            await relay.put(stale, token("c", 3))
    assert text_of(await events.read_all(JOB)) == "a"


async def test_a_resumed_run_reads_every_delivered_event(
    redis_client: redis.asyncio.Redis, keys: Keys
) -> None:
    """More events than one XREAD returns: what a resumed run goes on after must be all of them."""
    events = EventLog(redis_client, keys)
    async with redis_client.pipeline(transaction=False) as pipe:
        for i in range(300):
            events.add(pipe, JOB, token(str(i % 10), i))
        await pipe.execute()
    assert len(await events.read(JOB, "0-0", None)) < 300
    stored = await events.read_all(JOB)
    assert [e.token.token_ids[0] for e in stored] == list(range(300))


async def test_a_failed_write_reaches_the_dispatcher_and_the_followers_fall_back(
    redis_client: redis.asyncio.Redis, keys: Keys
) -> None:
    broken = redis.asyncio.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    relay = EventRelay(broken, EventLog(broken, keys))
    lane = relay.open(JOB)
    async with serving(relay):
        await relay.put(lane, token("x", 1))
        with pytest.raises((redis.ConnectionError, OSError)):
            await relay.drain(lane)
        with pytest.raises((redis.ConnectionError, OSError)):
            await relay.put(lane, token("y", 2))
    with relay.follow(JOB) as follower:
        assert follower is None, "a run whose writes fail is followed from Redis"
    await broken.aclose()


async def test_half_a_stream_on_one_broker_the_rest_on_another_under_load(
    start_broker: StartFactory, start_echo_worker: StartFactory
) -> None:
    prompt = " ".join(f"w{i}" for i in range(60))
    first, second = await start_broker(), await start_broker()
    await start_echo_worker(echo_delay_ms=0, slots=32)
    channel_a, stub_a = inference(first.address)
    channel_b, stub_b = inference(second.address)

    async def one() -> None:
        submit = inference_pb2.SubmitRequest(complete=complete(prompt))
        job_id = (await stub_a.Submit(submit)).job_id
        watch = stub_a.Watch(inference_pb2.WatchRequest(job_id=job_id))
        seen: list[events_pb2.JobEvent] = []
        while len(text_of(seen)) < len(prompt) // 2:
            seen.append(await next_event(watch))
            if seen[-1].HasField("done"):
                break
        watch.cancel()
        if seen[-1].HasField("done"):
            rest: list[events_pb2.JobEvent] = []
        else:
            after = inference_pb2.WatchRequest(job_id=job_id, after_event_id=seen[-1].event_id)
            rest = await collect(stub_b.Watch(after))
        assert text_of(seen) + text_of(rest) == prompt
        stored = [e for e in seen + rest if not e.HasField("queued")]
        ids = [event_id_key(e.event_id) for e in stored]
        assert ids == sorted(ids) and len(ids) == len(set(ids)), "each event once, in order"
        assert stored[-1].HasField("done")

    async with channel_a, channel_b:
        await asyncio.wait_for(asyncio.gather(*(one() for _ in range(24))), 60)


async def test_a_run_that_fails_after_a_cancel_request_ends_cancelled_not_queued(
    redis_client: redis.asyncio.Redis, keys: Keys
) -> None:
    """A cancel asked for on another broker while this one puts the job back: the job ends there, cancelled,
    instead of running again for nobody."""
    queue = JobQueue(redis_client, keys)
    spec = store_pb2.StoredJob(job_id=JOB).SerializeToString()
    await queue.submit(NewJob(JOB, "t", "text", "echo", 0, 0, "", spec))
    claimed = await queue.claim(queue.queue_key("text", "echo"), "w1", 1, "b1", 10.0)
    assert isinstance(claimed, Claimed)
    assert await queue.request_cancel(JOB) == "running"
    outcome = await queue.requeue(JOB, claimed.attempt, "w1")
    assert outcome is not None and outcome.startswith("cancelled:")
    record = await queue.record(JOB)
    assert record is not None and record.state == JobState.CANCELLED
    assert await redis_client.zcard(queue.queue_key("text", "echo")) == 0
