"""The OpenAI dialect of the edge against a real broker and echo worker: in-process over ASGI, and with the
official openai SDK against a real edge process."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import EdgeFactory, EdgeProcessFactory, StartFactory
from tests.helpers import eventually, inference
from velesio.v1 import common_pb2, inference_pb2

PROMPT = "the quick brown fox jumps over the lazy dog"


@pytest.fixture
async def edge(
    start_broker: StartFactory, start_echo_worker: StartFactory, edge_client: EdgeFactory
) -> httpx.AsyncClient:
    broker = await start_broker(api_tokens="alice:tok-a")
    await start_echo_worker(echo_delay_ms=0)
    client = await edge_client(broker.address)
    client.headers["authorization"] = "Bearer tok-a"
    return client


def sse_payloads(text: str) -> list[Any]:
    return [
        json.loads(line[6:]) if line[6:] != "[DONE]" else "[DONE]"
        for line in text.splitlines()
        if line.startswith("data: ")
    ]


async def test_chat_completion(edge: httpx.AsyncClient) -> None:
    reply = await edge.post(
        "/v1/chat/completions", json={"model": "echo", "messages": [{"role": "user", "content": PROMPT}]}
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": PROMPT}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == len(PROMPT)
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + len(PROMPT)
    assert body["model"] == "echo"


async def test_chat_stream_with_usage_and_n(edge: httpx.AsyncClient) -> None:
    reply = await edge.post(
        "/v1/chat/completions",
        json={"model": "echo", "messages": [{"role": "user", "content": PROMPT}], "stream": True, "n": 2,
              "stream_options": {"include_usage": True}, "max_tokens": 9},
    )  # fmt: skip
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/event-stream")
    chunks = sse_payloads(reply.text)
    assert chunks[-1] == "[DONE]"
    usage = chunks[-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 18
    texts = {0: "", 1: ""}
    finish = {}
    for chunk in chunks[:-2]:
        assert chunk["object"] == "chat.completion.chunk" and chunk["usage"] is None
        for choice in chunk["choices"]:
            texts[choice["index"]] += choice["delta"].get("content", "")
            if choice["finish_reason"]:
                finish[choice["index"]] = choice["finish_reason"]
    assert texts == {0: PROMPT[:9], 1: PROMPT[:9]}
    assert finish == {0: "length", 1: "length"}


async def test_completions_with_stop(edge: httpx.AsyncClient) -> None:
    reply = await edge.post(
        "/v1/completions", json={"model": "echo", "prompt": PROMPT, "stop": ["fox"], "max_tokens": 100}
    )
    body = reply.json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "the quick brown "
    assert body["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("path", "payload", "status", "param"),
    [
        ("/v1/chat/completions", {"model": "echo", "messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"model": "echo", "messages": "hi"}, 400, "messages"),
        (
            "/v1/chat/completions",
            {"model": "echo", "messages": [{"role": "user", "content": "x"}], "temperature": 9},
            400,
            "temperature",
        ),
        (
            "/v1/chat/completions",
            {"model": "nope", "messages": [{"role": "user", "content": "x"}]},
            404,
            None,
        ),
        ("/v1/completions", {"model": "echo", "prompt": ""}, 400, "prompt"),
        ("/v1/completions", {"model": "echo"}, 400, "prompt"),
        ("/v1/completions", {"model": "echo", "prompt": "x", "logit_bias": {"a": 1}}, 400, "logit_bias"),
    ],
)
async def test_bad_input_is_an_openai_error(
    edge: httpx.AsyncClient, path: str, payload: dict[str, Any], status: int, param: str | None
) -> None:
    reply = await edge.post(path, json=payload)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param:
        assert error["param"] == param
    if status == 404:
        assert error["code"] == "model_not_found"


async def test_malformed_json_and_auth(edge: httpx.AsyncClient) -> None:
    reply = await edge.post(
        "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert reply.status_code == 400
    assert "JSON" in reply.json()["error"]["message"]
    reply = await edge.get("/v1/models", headers={"authorization": "Bearer wrong"})
    assert reply.status_code == 401
    assert reply.json()["error"]["type"] == "authentication_error"
    reply = await edge.get("/v1/models")
    assert [m["id"] for m in reply.json()["data"]] == ["echo"]


async def test_oversized_body_is_refused(start_broker: StartFactory, edge_client: EdgeFactory) -> None:
    broker = await start_broker()
    client = await edge_client(broker.address, max_body_bytes=1000)
    reply = await client.post("/v1/completions", json={"model": "echo", "prompt": "x" * 2000})
    assert reply.status_code == 413
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and "larger than 1000 bytes" in error["message"]


@pytest.fixture
async def edge_process(
    start_broker: StartFactory, start_echo_worker: StartFactory, start_edge_process: EdgeProcessFactory
) -> str:
    """A real `velesio edge` process in front of a broker with an echo worker, once /readyz says so."""
    broker = await start_broker()
    await start_echo_worker(echo_delay_ms=5)
    return await start_edge_process(broker.address, ready="/readyz")


async def test_official_openai_sdk(edge_process: str) -> None:
    client = openai.AsyncOpenAI(base_url=f"{edge_process}/v1", api_key="unused-on-loopback", max_retries=0)
    chat = await client.chat.completions.create(model="echo", messages=[{"role": "user", "content": PROMPT}])
    assert chat.choices[0].message.content == PROMPT
    stream = await client.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": PROMPT}], stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    parts, usage = [], None
    async for chunk in stream:
        parts += [c.delta.content or "" for c in chunk.choices]
        usage = chunk.usage or usage
    assert "".join(parts) == PROMPT
    assert usage is not None and usage.completion_tokens == len(PROMPT)
    text = await client.completions.create(model="echo", prompt="hello world", max_tokens=5)
    assert text.choices[0].text == "hello"
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="missing", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": "x"}], temperature=7
        )
    models = await client.models.list()
    assert [m.id for m in models.data] == ["echo"]
    await client.close()


async def test_official_openai_sdk_embeddings(edge_process: str) -> None:
    """`embeddings.create` as the SDK sends it: base64 by default (decoded by the SDK), or floats; strings,
    token ids; `dimensions` only the model's own."""
    client = openai.AsyncOpenAI(base_url=f"{edge_process}/v1", api_key="unused-on-loopback", max_retries=0)
    texts = ["a small red fox", "a small red fox", "an unrelated sentence"]
    packed = await client.embeddings.create(model="echo", input=texts)  # the SDK asks for base64
    floats = await client.embeddings.create(model="echo", input=texts, encoding_format="float")
    assert [d.index for d in floats.data] == [0, 1, 2] and floats.model == "echo"
    for decoded, plain in zip(packed.data, floats.data, strict=True):
        assert decoded.embedding == pytest.approx(plain.embedding)
    assert floats.data[0].embedding == floats.data[1].embedding != floats.data[2].embedding
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == sum(len(t) for t in texts)
    ids = await client.embeddings.create(
        model="echo", input=[ord(c) for c in texts[0]], encoding_format="float"
    )
    assert ids.data[0].embedding == floats.data[0].embedding
    size = len(floats.data[0].embedding)
    same = await client.embeddings.create(model="echo", input="x", dimensions=size, encoding_format="float")
    assert len(same.data[0].embedding) == size
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        await client.embeddings.create(model="echo", input="x", dimensions=size // 2)
    with pytest.raises(openai.BadRequestError, match="input"):
        await client.embeddings.create(model="echo", input=[])
    with pytest.raises(openai.BadRequestError, match="input"):
        await client.embeddings.create(model="echo", input=[[5, -1]])
    with pytest.raises(openai.BadRequestError, match="input"):
        await client.embeddings.create(model="echo", input=["fine", ""])
    with pytest.raises(openai.NotFoundError):
        await client.embeddings.create(model="missing", input="x")
    await client.close()


async def test_client_dropping_a_stream_cancels_the_job(
    start_broker: StartFactory, start_echo_worker: StartFactory, start_edge_process: EdgeProcessFactory
) -> None:
    """A real HTTP client that goes away mid-stream: the edge cancels the gRPC call, the broker the job,
    and the worker's slot frees."""
    broker = await start_broker()
    await start_echo_worker(echo_delay_ms=100, slots=1, worker_id="w1")
    base = await start_edge_process(broker.address)
    channel, stub = inference(broker.address)
    async with channel, httpx.AsyncClient(base_url=base) as client:
        body = {"model": "echo", "messages": [{"role": "user", "content": PROMPT}], "stream": True}
        async with client.stream("POST", "/v1/chat/completions", json=body) as reply:
            async for line in reply.aiter_lines():
                if '"content":"the' in line.replace(" ", ""):
                    break
        # The response is closed: the TCP connection is gone.

        async def cancelled() -> bool:
            jobs = (await stub.ListJobs(inference_pb2.ListJobsRequest(limit=1))).jobs
            return bool(jobs) and jobs[0].state == common_pb2.JOB_STATE_CANCELLED

        await eventually(cancelled, limit_s=5)
        cluster = await stub.GetCluster(inference_pb2.GetClusterRequest())
        assert cluster.workers[0].slots_busy == 0
