"""Auth, tenancy, limits, deadlines and scheduling of the broker: real Redis, gRPC and echo workers."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import redis.asyncio

from mesh.keys import Keys
from tests.conftest import StartFactory
from tests.helpers import bearer, collect, complete, inference, kinds, next_event
from velesio.v1 import common_pb2, inference_pb2, workers_pb2, workers_pb2_grpc

TOKENS = "alice:tok-a,bob:tok-b"


async def test_missing_or_wrong_token_is_unauthenticated(
    start_broker: StartFactory, start_echo_worker: StartFactory
) -> None:
    broker = await start_broker(api_tokens=TOKENS)
    await start_echo_worker()
    channel, stub = inference(broker.address)
    async with channel:
        for metadata, detail in [
            ((), "missing"),
            (bearer("nope"), "invalid"),
            ((("authorization", "Basic dG9rLWE="),), "Bearer"),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ListModels(inference_pb2.ListModelsRequest(), metadata=metadata)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert detail in (info.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await collect(stub.Complete(complete("hi")))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        events = await collect(stub.Complete(complete("hi"), metadata=bearer("tok-a")))
        assert kinds(events)[-1] == "done"


async def test_tenants_cannot_see_each_others_jobs(
    start_broker: StartFactory, start_echo_worker: StartFactory
) -> None:
    broker = await start_broker(api_tokens=TOKENS)
    await start_echo_worker(echo_delay_ms=50)
    channel, stub = inference(broker.address)
    async with channel:
        job = await stub.Submit(
            inference_pb2.SubmitRequest(complete=complete("a b c d e f")), metadata=bearer("tok-a")
        )
        for call in (
            stub.GetJob(inference_pb2.GetJobRequest(job_id=job.job_id), metadata=bearer("tok-b")),
            stub.CancelJob(inference_pb2.CancelJobRequest(job_id=job.job_id), metadata=bearer("tok-b")),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await collect(stub.Watch(inference_pb2.WatchRequest(job_id=job.job_id), metadata=bearer("tok-b")))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        # Bob's failed cancel left Alice's job alone.
        events = await collect(
            stub.Watch(inference_pb2.WatchRequest(job_id=job.job_id), metadata=bearer("tok-a"))
        )
        assert kinds(events)[-1] == "done"


async def test_rate_limit_holds_across_replicas_with_retry_after(
    start_broker: StartFactory, start_echo_worker: StartFactory
) -> None:
    first = await start_broker(api_tokens=TOKENS, rate_limit_per_minute=3)
    second = await start_broker(api_tokens=TOKENS, rate_limit_per_minute=3)
    await start_echo_worker(echo_delay_ms=0)
    channel_a, stub_a = inference(first.address)
    channel_b, stub_b = inference(second.address)
    async with channel_a, channel_b:
        for stub in (stub_a, stub_b, stub_a):
            await stub.Submit(inference_pb2.SubmitRequest(complete=complete("hi")), metadata=bearer("tok-a"))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub_b.Submit(
                inference_pb2.SubmitRequest(complete=complete("hi")), metadata=bearer("tok-a")
            )
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        retry_after = dict(info.value.trailing_metadata() or ())["retry-after"]
        assert 1 <= int(retry_after) <= 60
        # Another tenant has its own budget.
        await stub_b.Submit(inference_pb2.SubmitRequest(complete=complete("hi")), metadata=bearer("tok-b"))


async def test_active_and_queued_job_limits(
    start_broker: StartFactory, start_echo_worker: StartFactory
) -> None:
    broker = await start_broker(max_active_jobs=2)
    await start_echo_worker(slots=1, echo_delay_ms=200)
    channel, stub = inference(broker.address)
    async with channel:
        jobs = [await stub.Submit(inference_pb2.SubmitRequest(complete=complete("a b c"))) for _ in range(2)]
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Submit(inference_pb2.SubmitRequest(complete=complete("a b c")))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "active jobs" in (info.value.details() or "")
        await collect(stub.Watch(inference_pb2.WatchRequest(job_id=jobs[0].job_id)))
        await stub.Submit(inference_pb2.SubmitRequest(complete=complete("a b c")))  # room again


async def test_full_queue_is_resource_exhausted(
    start_broker: StartFactory, start_echo_worker: StartFactory
) -> None:
    broker = await start_broker(max_queue_depth=2)
    await start_echo_worker(slots=1, echo_delay_ms=300)
    channel, stub = inference(broker.address)
    async with channel:
        running = await stub.Submit(inference_pb2.SubmitRequest(complete=complete("a b c")))
        await asyncio.sleep(0.3)  # let it start, so the queue holds only what follows
        for _ in range(2):
            await stub.Submit(inference_pb2.SubmitRequest(complete=complete("a")))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Submit(inference_pb2.SubmitRequest(complete=complete("a")))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "full" in (info.value.details() or "")
        assert running.job_id


async def test_deadline_passed_in_queue_is_never_dispatched(
    start_broker: StartFactory, start_echo_worker: StartFactory
) -> None:
    broker = await start_broker()
    await start_echo_worker(slots=1, echo_delay_ms=300)
    channel, stub = inference(broker.address)
    async with channel:
        blocker = await stub.Submit(inference_pb2.SubmitRequest(complete=complete("a b c d e")))
        late = inference_pb2.CompleteRequest(prompt="late", options=inference_pb2.JobOptions(timeout_ms=300))
        submitted = await stub.Submit(inference_pb2.SubmitRequest(complete=late))
        events = await collect(stub.Watch(inference_pb2.WatchRequest(job_id=submitted.job_id)))
        assert kinds(events) == ["queued", "error"]
        assert events[-1].error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
        job = (await stub.GetJob(inference_pb2.GetJobRequest(job_id=submitted.job_id))).job
        assert job.state == common_pb2.JOB_STATE_FAILED
        assert job.attempts == 0
        assert blocker.job_id


async def test_stream_deadline_bounds_the_job(
    start_broker: StartFactory, start_echo_worker: StartFactory
) -> None:
    broker = await start_broker()
    await start_echo_worker(slots=1, echo_delay_ms=200)
    channel, stub = inference(broker.address)
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await collect(stub.Complete(complete("a b c d e f g h"), timeout=0.5))
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # The worker slot is free again: the next job runs at once.
        events = await collect(stub.Complete(complete("ok"), timeout=5))
        assert kinds(events)[-1] == "done"


async def test_never_more_jobs_on_a_worker_than_its_slots_across_replicas(
    start_broker: StartFactory, start_echo_worker: StartFactory, redis_url: str, keys: Keys
) -> None:
    brokers = [await start_broker(), await start_broker()]
    worker = await start_echo_worker(slots=2, echo_delay_ms=30, worker_id="w1")
    channels = [inference(b.address) for b in brokers]
    client = redis.asyncio.Redis.from_url(redis_url)
    worker_channel = grpc.aio.insecure_channel(worker.address)
    worker_stub = workers_pb2_grpc.TextWorkerStub(worker_channel)
    peaks = {"redis": 0, "worker": 0}
    done = asyncio.Event()

    async def sample() -> None:
        while not done.is_set():
            peaks["redis"] = max(peaks["redis"], await client.hlen(keys.worker_busy("w1")))
            info = await worker_stub.Info(workers_pb2.TextWorkerInfoRequest())
            peaks["worker"] = max(peaks["worker"], info.slots_busy)
            await asyncio.sleep(0.005)

    sampler = asyncio.create_task(sample())
    results = await asyncio.gather(
        *(collect(channels[i % 2][1].Complete(complete("a b c"))) for i in range(12))
    )
    done.set()
    await sampler
    for channel, _ in channels:
        await channel.close()
    await worker_channel.close()
    await client.aclose()
    assert all(kinds(events)[-1] == "done" for events in results)
    assert 1 <= peaks["redis"] <= 2
    assert 1 <= peaks["worker"] <= 2


async def test_session_affinity_prefers_the_same_worker(
    start_broker: StartFactory, start_echo_worker: StartFactory
) -> None:
    """A session's next turn goes to the worker that ran its last one while that worker has a free slot,
    even when another is less busy; a job without a session, sent at the same moment, shows where the
    least-busy rule alone would have sent it."""
    await start_echo_worker(slots=8, worker_id="big", echo_delay_ms=20)
    await start_echo_worker(slots=2, worker_id="small", echo_delay_ms=20)
    broker = await start_broker()  # after both registered: its first view of the cluster holds both
    channel, stub = inference(broker.address)

    async def started_on(call: object) -> str:
        while True:
            event = await next_event(call)
            if event.HasField("started"):
                return event.started.worker_id

    def turn(number: int) -> inference_pb2.ChatRequest:
        return inference_pb2.ChatRequest(
            messages=[common_pb2.ChatMessage(role="user", content=f"turn {number}")],
            options=inference_pb2.JobOptions(session_id="player-7"),
        )

    blockers = []
    async with channel:
        first = stub.Chat(turn(0))
        assert await started_on(first) == "big"  # both idle: the one with more free slots
        await collect(first)
        # Long jobs without a session until "big" is the busier by share of its slots (6 of 8 against 1
        # of 2 here), while it still has free ones.
        busy = {"big": 0, "small": 0}
        while (8 - busy["big"]) / 8 >= (2 - busy["small"]) / 2:
            blocker = stub.Complete(complete(" ".join(["word"] * 500), max_tokens=500))  # 10 s of echo
            blockers.append(blocker)
            busy[await started_on(blocker)] += 1
        assert busy["big"] < 8
        probe = stub.Complete(complete("no session"))
        assert await started_on(probe) == "small", "the least-busy worker, for a job without affinity"
        await collect(probe)
        for number in (1, 2, 3):
            call = stub.Chat(turn(number))
            assert await started_on(call) == "big", f"turn {number} left the worker holding its session"
            await collect(call)
        for blocker in blockers:
            blocker.cancel()
