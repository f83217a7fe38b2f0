"""The broker end to end, in one event loop: real Redis, real gRPC, real echo workers."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import grpc
import pytest
import redis.asyncio

from mesh.keys import Keys
from tests.conftest import StartFactory
from tests.helpers import collect, complete, eventually, inference, kinds, next_event, text_of
from velesio.v1 import common_pb2, events_pb2, inference_pb2

if TYPE_CHECKING:
    from velesio.v1.inference_pb2_grpc import InferenceAsyncStub

PROMPT = "the quick brown fox jumps over the lazy dog"


async def test_tokens_stream_end_to_end(start_broker: StartFactory, start_echo_worker: StartFactory) -> None:
    broker = await start_broker()
    await start_echo_worker(echo_delay_ms=1)
    channel, stub = inference(broker.address)
    async with channel:
        events = await collect(stub.Complete(complete(PROMPT)))
    assert kinds(events)[:2] == ["queued", "started"]
    assert kinds(events)[-1] == "done"
    assert text_of(events) == PROMPT
    done = events[-1].done
    assert done.finish_reason == common_pb2.FINISH_REASON_STOP
    assert done.usage.completion_tokens == len(PROMPT)
    assert len({e.event_id for e in events}) == len(events)
    assert {e.job_id for e in events} == {events[0].job_id}


async def test_chat_stop_and_max_tokens(start_broker: StartFactory, start_echo_worker: StartFactory) -> None:
    broker = await start_broker()
    await start_echo_worker(echo_delay_ms=0)
    channel, stub = inference(broker.address)
    async with channel:
        chat = inference_pb2.ChatRequest(
            messages=[
                common_pb2.ChatMessage(role="system", content="be brief"),
                common_pb2.ChatMessage(role="user", content=PROMPT),
            ],
            sampling=common_pb2.SamplingParams(stop=["fox"]),
        )
        events = await collect(stub.Chat(chat))
        assert text_of(events) == "the quick brown "
        assert events[-1].done.finish_reason == common_pb2.FINISH_REASON_STOP_SEQUENCE
        assert events[-1].done.stopping_word == "fox"
        events = await collect(stub.Complete(complete(PROMPT, max_tokens=7)))
        assert text_of(events) == "the qui"
        assert events[-1].done.finish_reason == common_pb2.FINISH_REASON_LENGTH


async def test_queue_positions_count_down_and_priority_wins(
    start_broker: StartFactory, start_echo_worker: StartFactory
) -> None:
    broker = await start_broker(queue_poll_s=0.05)
    await start_echo_worker(slots=1, echo_delay_ms=60)
    channel, stub = inference(broker.address)
    async with channel:
        first = stub.Complete(complete("a b c d"))
        assert (await next_event(first)).HasField("queued")
        assert (await next_event(first)).HasField("started")
        low = [
            await stub.Submit(inference_pb2.SubmitRequest(complete=complete(f"low {i}"))) for i in range(3)
        ]
        high = await stub.Submit(
            inference_pb2.SubmitRequest(
                complete=inference_pb2.CompleteRequest(
                    prompt="high", options=inference_pb2.JobOptions(priority=10)
                )
            )
        )
        assert [s.queue_position for s in low] == [0, 1, 2]
        assert high.queue_position == 0  # jumps the queue

        watched = await collect(stub.Watch(inference_pb2.WatchRequest(job_id=low[2].job_id)))
        positions = [e.queued.position for e in watched if e.HasField("queued")]
        # Queued at 2, pushed back to 3 by the high-priority job, then counting down as jobs start.
        assert positions[:2] == [2, 3]
        assert positions[1:] == sorted(set(positions[1:]), reverse=True)
        assert positions[-1] == 0
        assert text_of(watched) == "low 2"

        jobs = [
            (await stub.GetJob(inference_pb2.GetJobRequest(job_id=j))).job
            for j in [high.job_id] + [s.job_id for s in low]
        ]
        starts = [j.started_at.ToNanoseconds() for j in jobs]
        assert starts == sorted(starts), "high priority first, then arrival order"
        await collect(first)


async def test_cancel_queued_and_running_jobs(
    start_broker: StartFactory, start_echo_worker: StartFactory, redis_url: str, keys: Keys
) -> None:
    broker = await start_broker()
    await start_echo_worker(slots=1, echo_delay_ms=200, worker_id="w1")
    client = redis.asyncio.Redis.from_url(redis_url)
    channel, stub = inference(broker.address)
    async with channel:
        running = await stub.Submit(inference_pb2.SubmitRequest(complete=complete(PROMPT)))
        queued = await stub.Submit(inference_pb2.SubmitRequest(complete=complete(PROMPT)))
        await _until_state(stub, running.job_id, common_pb2.JOB_STATE_RUNNING)

        cancelled = await stub.CancelJob(inference_pb2.CancelJobRequest(job_id=queued.job_id))
        assert cancelled.job.state == common_pb2.JOB_STATE_CANCELLED
        assert cancelled.job.started_at.seconds == 0  # never ran
        events = await collect(stub.Watch(inference_pb2.WatchRequest(job_id=queued.job_id)))
        assert kinds(events) == ["queued", "error"]
        assert events[-1].error.code == grpc.StatusCode.CANCELLED.value[0]

        loop = asyncio.get_running_loop()
        began = loop.time()
        cancelled = await stub.CancelJob(inference_pb2.CancelJobRequest(job_id=running.job_id))
        assert cancelled.job.state == common_pb2.JOB_STATE_CANCELLED
        assert await client.hlen(keys.worker_busy("w1")) == 0
        assert loop.time() - began < 1.0
        events = await collect(stub.Watch(inference_pb2.WatchRequest(job_id=running.job_id)))
        assert kinds(events)[-1] == "error"
        assert len(text_of(events)) < len(PROMPT)
    await client.aclose()


async def _until_state(stub: InferenceAsyncStub, job_id: str, state: int, limit_s: float = 5.0) -> None:
    async def reached() -> bool:
        job = (await stub.GetJob(inference_pb2.GetJobRequest(job_id=job_id))).job
        return bool(job.state == state)

    await eventually(reached, limit_s)


async def test_stream_caller_leaving_cancels_the_job(
    start_broker: StartFactory, start_echo_worker: StartFactory, redis_url: str, keys: Keys
) -> None:
    broker = await start_broker()
    await start_echo_worker(slots=1, echo_delay_ms=100, worker_id="w1")
    channel, stub = inference(broker.address)
    async with channel:
        call = stub.Complete(complete(PROMPT))
        job_id = (await next_event(call)).job_id
        while not (await next_event(call)).HasField("token"):
            pass
        call.cancel()
        await _until_state(stub, job_id, common_pb2.JOB_STATE_CANCELLED, limit_s=2)
    client = redis.asyncio.Redis.from_url(redis_url)
    assert await client.hlen(keys.worker_busy("w1")) == 0
    await client.aclose()


async def test_resume_on_another_broker_gets_the_rest_exactly_once(
    start_broker: StartFactory, start_echo_worker: StartFactory
) -> None:
    first, second = await start_broker(), await start_broker()
    await start_echo_worker(echo_delay_ms=30)
    channel_a, stub_a = inference(first.address)
    channel_b, stub_b = inference(second.address)
    async with channel_a, channel_b:
        job_id = (await stub_a.Submit(inference_pb2.SubmitRequest(complete=complete(PROMPT)))).job_id
        watch = stub_a.Watch(inference_pb2.WatchRequest(job_id=job_id))
        seen: list[events_pb2.JobEvent] = []
        while len([e for e in seen if e.HasField("token")]) < 3:
            seen.append(await next_event(watch))
        watch.cancel()
        rest = await collect(
            stub_b.Watch(inference_pb2.WatchRequest(job_id=job_id, after_event_id=seen[-1].event_id))
        )
        assert text_of(seen) + text_of(rest) == PROMPT
        ids = [e.event_id for e in seen + rest if not e.HasField("queued")]
        assert len(ids) == len(set(ids))
        assert kinds(rest)[-1] == "done"
        everything = await collect(stub_b.Watch(inference_pb2.WatchRequest(job_id=job_id)))
        assert text_of(everything) == PROMPT


@pytest.mark.parametrize(
    ("request_", "code", "field"),
    [
        (complete(""), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        (complete("hi", temperature=-1), grpc.StatusCode.INVALID_ARGUMENT, "sampling.temperature"),
        (complete("hi", top_p=1.5), grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_p"),
        (complete("hi", max_tokens=0), grpc.StatusCode.INVALID_ARGUMENT, "sampling.max_tokens"),
        (complete("hi", stop=["x"] * 17), grpc.StatusCode.INVALID_ARGUMENT, "sampling.stop"),
        (complete("hi", json_schema="{nope"), grpc.StatusCode.INVALID_ARGUMENT, "sampling.json_schema"),
        (inference_pb2.CompleteRequest(model="nope", prompt="hi"), grpc.StatusCode.NOT_FOUND, "model"),
        (
            inference_pb2.CompleteRequest(prompt="hi", options=inference_pb2.JobOptions(priority=1000)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "options.priority",
        ),
    ],
)
async def test_bad_requests_are_refused_before_queueing(
    start_broker: StartFactory,
    start_echo_worker: StartFactory,
    redis_url: str,
    keys: Keys,
    request_: inference_pb2.CompleteRequest,
    code: grpc.StatusCode,
    field: str,
) -> None:
    broker = await start_broker(max_prompt_chars=100)
    await start_echo_worker()
    channel, stub = inference(broker.address)
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await collect(stub.Complete(request_))
        assert info.value.code() == code
        assert field in (info.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Complete(complete("x" * 101)).read()
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "limit is 100" in (info.value.details() or "")
        # Still serving, and nothing was queued.
        assert text_of(await collect(stub.Complete(complete("ok")))) == "ok"
    client = redis.asyncio.Redis.from_url(redis_url)
    assert await client.zcard(keys.queue("text", "echo")) == 0
    assert await client.xlen(keys.events("nope")) == 0
    await client.aclose()


async def test_unknown_job_is_not_found(start_broker: StartFactory) -> None:
    broker = await start_broker()
    channel, stub = inference(broker.address)
    async with channel:
        for call in (
            stub.GetJob(inference_pb2.GetJobRequest(job_id="missing")),
            stub.CancelJob(inference_pb2.CancelJobRequest(job_id="missing")),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await collect(stub.Watch(inference_pb2.WatchRequest(job_id="missing")))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_no_worker_is_unavailable(start_broker: StartFactory) -> None:
    broker = await start_broker()
    channel, stub = inference(broker.address)
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await collect(stub.Complete(complete("hi")))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_models_and_cluster(start_broker: StartFactory, start_echo_worker: StartFactory) -> None:
    broker = await start_broker()
    await start_echo_worker(slots=3, worker_id="w1")
    channel, stub = inference(broker.address)
    async with channel:
        models = (await stub.ListModels(inference_pb2.ListModelsRequest())).models
        assert [m.id for m in models] == ["echo"]
        assert models[0].test_only
        assert models[0].kind == common_pb2.JOB_KIND_TEXT
        cluster = await stub.GetCluster(inference_pb2.GetClusterRequest())
        assert [(w.worker_id, w.slots_total, w.slots_busy) for w in cluster.workers] == [("w1", 3, 0)]
        assert cluster.brokers >= 1
        tokens = await stub.Tokenize(inference_pb2.TokenizeRequest(content="héllo", with_pieces=True))
        assert list(tokens.tokens) == [ord(c) for c in "héllo"]
        assert tokens.pieces[1].piece == "é"
        text = await stub.Detokenize(inference_pb2.DetokenizeRequest(tokens=tokens.tokens))
        assert text.content == "héllo"
        rendered = await stub.ApplyTemplate(
            inference_pb2.ApplyTemplateRequest(messages=[common_pb2.ChatMessage(role="user", content="hi")])
        )
        assert rendered.prompt == "<|user|>\nhi\n<|assistant|>\n"


async def test_a_tenants_default_model_holds_on_every_replica_and_for_no_one_else(
    start_broker: StartFactory, start_echo_worker: StartFactory
) -> None:
    """SetDefaultModel on one broker: the tenant's jobs and tools that name no model get it on another broker
    (it lives in Redis), another tenant does not, and clearing it gives back the cluster's default."""
    await start_echo_worker(model_id="alpha", worker_id="wa", echo_delay_ms=0)
    await start_echo_worker(model_id="bravo", worker_id="wb", echo_delay_ms=0)
    tokens = "alice:token-alice,bob:token-bob"
    first, second = await start_broker(api_tokens=tokens), await start_broker(api_tokens=tokens)
    alice = (("authorization", "Bearer token-alice"),)
    bob = (("authorization", "Bearer token-bob"),)
    text = common_pb2.JOB_KIND_TEXT

    async def model_of_a_job(stub: InferenceAsyncStub, caller: tuple[tuple[str, str], ...]) -> str:
        events = await collect(stub.Complete(complete("hi"), metadata=caller))
        return next(e.started.model for e in events if e.HasField("started"))

    one, stub_one = inference(first.address)
    two, stub_two = inference(second.address)
    async with one, two:
        assert await model_of_a_job(stub_two, alice) == "alpha"  # the first served, before any choice
        chose = await stub_one.SetDefaultModel(
            inference_pb2.SetDefaultModelRequest(model="bravo"), metadata=alice
        )
        assert [(d.kind, d.model, d.tenant_choice) for d in chose.defaults] == [
            (text, "bravo", True),
            (common_pb2.JOB_KIND_IMAGE, "", False),
        ]
        assert await model_of_a_job(stub_two, alice) == "bravo"
        assert await model_of_a_job(stub_two, bob) == "alpha"
        assert await model_of_a_job(stub_two, alice) == "bravo"
        detokenized = await stub_two.Detokenize(inference_pb2.DetokenizeRequest(tokens=[104]), metadata=alice)
        assert detokenized.content == "h"
        asked = await stub_two.GetDefaultModels(
            inference_pb2.GetDefaultModelsRequest(kind=text), metadata=alice
        )
        assert [(d.model, d.tenant_choice) for d in asked.defaults] == [("bravo", True)]

        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub_one.SetDefaultModel(
                inference_pb2.SetDefaultModelRequest(kind=text, model="charlie"), metadata=alice
            )
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        assert "charlie" in str(refused.value.details()) and "bravo" in str(refused.value.details())
        assert await model_of_a_job(stub_two, alice) == "bravo"  # a refused choice changes nothing

        await stub_one.SetDefaultModel(inference_pb2.SetDefaultModelRequest(), metadata=alice)
        assert await model_of_a_job(stub_two, alice) == "alpha"
        asked = await stub_two.GetDefaultModels(
            inference_pb2.GetDefaultModelsRequest(kind=text), metadata=alice
        )
        assert [(d.model, d.tenant_choice) for d in asked.defaults] == [("alpha", False)]


async def test_default_models_name_a_configured_default_not_served_yet(
    start_broker: StartFactory, start_echo_worker: StartFactory
) -> None:
    """A broker configured with a default model that no worker serves yet (still loading) names it rather
    than failing."""
    broker = await start_broker(default_text_model="later")
    await start_echo_worker(echo_delay_ms=0)
    channel, stub = inference(broker.address)
    async with channel:
        reply = await stub.GetDefaultModels(inference_pb2.GetDefaultModelsRequest())
    assert [(d.kind, d.model) for d in reply.defaults] == [
        (common_pb2.JOB_KIND_TEXT, "later"),
        (common_pb2.JOB_KIND_IMAGE, ""),
    ]


async def test_embed_runs_as_a_queued_job_and_answers_every_input_in_order(
    start_broker: StartFactory, start_echo_worker: StartFactory
) -> None:
    broker = await start_broker()
    await start_echo_worker(echo_delay_ms=0)
    texts = [f"input {i} " * (i % 5 + 1) for i in range(40)]  # more than one batch of the echo engine
    inputs = [common_pb2.EmbedInput(text=t) for t in texts]
    inputs.append(common_pb2.EmbedInput(tokens=common_pb2.TokenIds(ids=[ord(c) for c in texts[3]])))
    channel, stub = inference(broker.address)
    async with channel:
        reply = await stub.Embed(inference_pb2.EmbedRequest(inputs=inputs))
        assert reply.model == "echo" and len(reply.embeddings) == 41
        assert [e.index for e in reply.embeddings] == list(range(41))
        assert reply.embeddings[40].values == reply.embeddings[3].values  # the same tokens, as ids
        assert all(abs(sum(v * v for v in e.values) - 1) < 1e-5 for e in reply.embeddings)  # normalised
        assert reply.usage.prompt_tokens == sum(len(t) for t in texts) + len(texts[3])
        job = (await stub.GetJob(inference_pb2.GetJobRequest(job_id=reply.job_id))).job
        assert job.state == common_pb2.JOB_STATE_SUCCEEDED
        raw = await stub.Embed(
            inference_pb2.EmbedRequest(inputs=inputs[:1], params=common_pb2.EmbedParams(normalize=False))
        )
        assert abs(sum(v * v for v in raw.embeddings[0].values) - 1) > 1e-3

        for request, field in [
            (inference_pb2.EmbedRequest(), "inputs"),
            (inference_pb2.EmbedRequest(inputs=[inputs[0], common_pb2.EmbedInput(text="")]), "inputs[1]"),
            (inference_pb2.EmbedRequest(inputs=[common_pb2.EmbedInput()]), "inputs[0]"),
            (
                inference_pb2.EmbedRequest(
                    inputs=[common_pb2.EmbedInput(tokens=common_pb2.TokenIds(ids=[5, -1]))]
                ),
                "inputs[0]",
            ),
            (  # past the vocabulary (the echo model's: Unicode code points), refused before queueing too
                inference_pb2.EmbedRequest(
                    inputs=[inputs[0], common_pb2.EmbedInput(tokens=common_pb2.TokenIds(ids=[5, 0x110000]))]
                ),
                "inputs[1]",
            ),
            (inference_pb2.EmbedRequest(model="nope", inputs=inputs[:1]), "model"),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Embed(request)
            assert refused.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
            assert field in str(refused.value.details())
        listed = (await stub.ListJobs(inference_pb2.ListJobsRequest())).jobs
        assert len(listed) == 2  # nothing refused was queued
