"""Ollama JSON <-> velesio.v1 gRPC: /api/chat and /api/generate (NDJSON streams, or one object), the model
list, show, ps, version, and embed (with the older embeddings)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import grpc
from fastapi import Request
from fastapi.responses import Response

from edge import ndjson
from edge.broker import BrokerClient, forwarded_metadata
from edge.embed import embed, embedding_size
from edge.errors import ApiError, bad_request
from edge.jobs import JobStream, run_text
from edge.ollama.protocol import (
    ChatMessage,
    ChatRequest,
    ChatResponse,
    EmbeddingsRequest,
    EmbeddingsResponse,
    EmbedRequest,
    EmbedResponse,
    Format,
    GenerateRequest,
    GenerateResponse,
    GenerationFields,
    ListModelResponse,
    ListResponse,
    ModelDetails,
    ModelOptions,
    OllamaError,
    OllamaToolCall,
    ProcessModelResponse,
    ProcessResponse,
    ReplyMessage,
    ShowRequest,
    ShowResponse,
    Stats,
    ToolCallFunction,
    VersionResponse,
)
from edge.routing import renderer
from edge.tools import Call, CallCollector, past_call, tools_pb
from mesh.version import VERSION
from velesio.v1 import common_pb2, events_pb2, inference_pb2

log = logging.getLogger(__name__)

# Go's zero time: what Ollama sends for a time it does not know (its CLI shows "Never").
NEVER = "0001-01-01T00:00:00Z"
# How long Ollama keeps a model loaded with keep_alive -1 (Go's largest duration).
FOREVER = timedelta(microseconds=(2**63 - 1) // 1000)
SAMPLING_FIELDS = (
    "temperature", "top_k", "top_p", "min_p", "typical_p", "repeat_penalty", "repeat_last_n",
    "presence_penalty", "frequency_penalty", "seed",
)  # fmt: skip
NO_IMAGES = "no model that takes images is served yet"
NO_FORMAT_WITH_TOOLS = "a format cannot be combined with tools yet; leave one of them out"
NO_THINKING = "reasoning is not streamed separately yet; leave think out or set it to false"
# Ollama's names for what a model does, from ModelInfo.capabilities.
CAPABILITIES = {"generate": "completion", "tools": "tools", "embed": "embedding"}
NOT_DONE = Stats()
# The broker names the velesio.v1 fields it refuses; an Ollama client knows them by these names.
FIELD_NAMES = (
    ("sampling.max_tokens", "options.num_predict"),
    ("sampling.json_schema", "format"),
    ("sampling.", "options."),
)

R = TypeVar("R", ChatResponse, GenerateResponse)
# One reply of a route, whole or one line of a stream: (model, new text, statistics; NOT_DONE before the end,
# tool calls; None when there are none).
Wrap = Callable[[str, str, Stats, list[OllamaToolCall] | None], R]


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def chat_reply(model: str, text: str, stats: Stats, calls: list[OllamaToolCall] | None) -> ChatResponse:
    return ChatResponse(
        model=model,
        created_at=rfc3339(datetime.now(UTC)),
        message=ReplyMessage(content=text, tool_calls=calls),
        done=stats.done_reason is not None,
        **dict(stats),
    )


def generate_reply(
    model: str, text: str, stats: Stats, calls: list[OllamaToolCall] | None
) -> GenerateResponse:
    """`calls` is always None: /api/generate sends no tools."""
    return GenerateResponse(
        model=model,
        created_at=rfc3339(datetime.now(UTC)),
        response=text,
        done=stats.done_reason is not None,
        **dict(stats),
    )


def nanoseconds(ms: float) -> int:
    return round(ms * 1_000_000)


def finished(done: events_pb2.JobDone, began_ns: int) -> Stats:
    timings, usage = done.timings, done.usage
    return Stats(  # a reply that called tools is a "stop" too, in Ollama
        done_reason="length" if done.finish_reason == common_pb2.FINISH_REASON_LENGTH else "stop",
        total_duration=time.perf_counter_ns() - began_ns,
        load_duration=nanoseconds(timings.queue_ms),
        prompt_eval_count=usage.prompt_tokens,
        prompt_eval_duration=nanoseconds(timings.prompt_ms),
        eval_count=usage.completion_tokens,
        eval_duration=nanoseconds(timings.predicted_ms),
    )


def in_ollama_terms(exc: ApiError) -> ApiError:
    for ours, theirs in FIELD_NAMES:
        if exc.message.startswith(ours):
            param = theirs + exc.param.removeprefix(ours) if exc.param else exc.param
            return replace(exc, message=theirs + exc.message.removeprefix(ours), param=param)
    return exc


# -- names: Ollama's are name:tag, Velesio's model ids have no tag ------------------------------------------


def model_id(name: str) -> str:
    return name.removesuffix(":latest")


def ollama_name(model: str) -> str:
    return model if not model or ":" in model else f"{model}:latest"


# -- requests ----------------------------------------------------------------------------------------------


def refuse(value: object, field: str, why: str) -> None:
    if value:
        raise bad_request(f"{field}: {why}", field)


def check_generation(body: GenerationFields) -> None:
    refuse(body.think, "think", NO_THINKING)
    if body.keep_alive is not None:
        log.info("ignoring keep_alive=%r: models stay loaded while their worker runs", body.keep_alive)


def json_schema(format: Format) -> str:
    if format is None or format == "":
        return ""
    if format == "json":
        return json.dumps({"type": "object"})
    return json.dumps(format)


def sampling(options: ModelOptions | None, format: Format) -> common_pb2.SamplingParams:
    params = common_pb2.SamplingParams(json_schema=json_schema(format))
    if options is None:
        return params
    if options.num_ctx is not None:
        log.info("ignoring options.num_ctx=%d: the worker sets the context size", options.num_ctx)
    if options.num_predict is not None:
        params.max_tokens = options.num_predict if options.num_predict > 0 else -1
    for name in SAMPLING_FIELDS:
        value = getattr(options, name)
        if value is not None:
            setattr(params, name, value)
    if options.stop is not None:
        params.stop.extend([options.stop] if isinstance(options.stop, str) else options.stop)
    return params


def check_chat(body: ChatRequest) -> None:
    if body.tools and json_schema(body.format):
        raise bad_request(f"format: {NO_FORMAT_WITH_TOOLS}", "format")


def chat_messages(messages: Sequence[ChatMessage]) -> list[common_pb2.ChatMessage]:
    """The conversation, its calls with ids: Ollama's clients send none, so the edge numbers the calls and
    pairs each tool message with the call it answers."""
    unanswered: list[common_pb2.ToolCall] = []  # oldest first
    converted = []
    for i, message in enumerate(messages):
        refuse(message.images, f"messages[{i}].images", NO_IMAGES)
        calls = [
            past_call(
                call.id or f"call_{i}_{j}",
                call.function.name,
                call.function.arguments,
                f"messages[{i}].tool_calls[{j}].function.arguments",
            )
            for j, call in enumerate(message.tool_calls or [])
        ]
        unanswered.extend(calls)
        converted.append(
            common_pb2.ChatMessage(
                role=message.role,
                content=message.content or "",
                name=message.tool_name or "",
                tool_calls=calls,
                tool_call_id=answered_call(message, i, unanswered) if message.role == "tool" else "",
            )
        )
    return converted


def answered_call(message: ChatMessage, index: int, unanswered: list[common_pb2.ToolCall]) -> str:
    """The id of the call a tool message answers: the one it names, else the earliest unanswered call of its
    tool, else the earliest unanswered call. The broker refuses an id that names no earlier call."""
    if message.tool_call_id:
        answered = message.tool_call_id
    else:
        candidates = [c for c in unanswered if c.name == message.tool_name] or unanswered
        if not candidates:
            raise bad_request(
                f"messages[{index}]: this tool message answers no tool call: every call of the assistant "
                "messages before it is answered already",
                f"messages[{index}]",
            )
        answered = candidates[0].id
    unanswered[:] = [c for c in unanswered if c.id != answered]
    return answered


def check_generate(body: GenerateRequest) -> None:
    refuse(body.images, "images", NO_IMAGES)
    refuse(body.suffix, "suffix", "fill-in-the-middle is not supported")
    refuse(body.template, "template", "the model's own chat template applies; send raw: true with a prompt")
    refuse(body.context, "context", "continuing from token context is not supported; use /api/chat")
    if body.raw:
        refuse(body.system, "system", "a raw prompt takes no system prompt; put it in the prompt")


# -- models ------------------------------------------------------------------------------------------------


def capabilities(model: common_pb2.ModelInfo) -> list[str]:
    return [theirs for ours, theirs in CAPABILITIES.items() if ours in model.capabilities]


def details(model: common_pb2.ModelInfo) -> ModelDetails:
    return ModelDetails(format="gguf" if model.filename.lower().endswith(".gguf") else "")


def modelfile(model: common_pb2.ModelInfo) -> str:
    return (
        f"# Modelfile of {model.id}, generated by Velesio: {model.description}\n"
        "# The chat template is Jinja (the GGUF's own), not an Ollama TEMPLATE: see `template`.\n"
        f"FROM {model.filename or model.id}\n"
        f"PARAMETER num_ctx {model.context_size}\n"
    )


def find(models: Sequence[common_pb2.ModelInfo], name: str) -> common_pb2.ModelInfo:
    wanted = model_id(name)
    for model in models:
        if model.id == wanted:
            return model
    raise ApiError(grpc.StatusCode.NOT_FOUND, f"model '{name}' not found")


def model_info(model: common_pb2.ModelInfo) -> dict[str, str | int | bool]:
    """Ollama keys this with the GGUF's architecture ("llama.context_length"), which the model list does not
    carry; "velesio" stands in, so that clients reading `<architecture>.context_length` find the context."""
    return {
        "general.architecture": "velesio",
        "general.name": model.id,
        "velesio.context_length": model.context_size,
        "velesio.test_only": model.test_only,
    }


def ollama_call(index: int, call: Call) -> OllamaToolCall:
    return OllamaToolCall(
        id=call.id or None,
        function=ToolCallFunction(index=index, name=call.name, arguments=call.parsed_arguments()),
    )


def ollama_calls(calls: Sequence[Call]) -> list[OllamaToolCall] | None:
    return [ollama_call(i, call) for i, call in enumerate(calls)] or None


class WholeCalls:
    """A job's ToolCallDelta events given back a whole call at a time, as Ollama streams calls: the worker
    writes one call after another, so a call is whole once anything else comes."""

    def __init__(self) -> None:
        self._collector = CallCollector()
        self._index: int | None = None

    def add(self, delta: events_pb2.ToolCallDelta) -> list[OllamaToolCall] | None:
        """The call made whole by this delta's start of another one, if any."""
        whole = self.flush() if self._index not in (None, delta.index) else None
        self._index = delta.index
        self._collector.add(delta)
        return whole

    def flush(self) -> list[OllamaToolCall] | None:
        if self._index is None:
            return None
        calls = [ollama_call(self._index, call) for call in self._collector.calls]
        self._collector, self._index = CallCollector(), None
        return calls


async def lines(stream: JobStream, model: str, wrap: Wrap[R], began: int) -> AsyncIterator[str]:
    """The NDJSON lines of a job: one per piece of text or whole tool call, then the statistics, or an error
    that came up."""
    calls = WholeCalls()
    try:
        async for event in stream.events():
            name = model or ollama_name(stream.model)
            if event.HasField("tool_call"):
                if whole := calls.add(event.tool_call):
                    yield ndjson.line(wrap(name, "", NOT_DONE, whole))
                continue
            text = event.token.text if event.HasField("token") else ""
            if (text or event.HasField("done")) and (whole := calls.flush()):
                yield ndjson.line(wrap(name, "", NOT_DONE, whole))
            if text:
                yield ndjson.line(wrap(name, text, NOT_DONE, None))
            elif event.HasField("done"):
                yield ndjson.line(wrap(name, "", finished(event.done, began), None))
    except ApiError as exc:
        yield ndjson.line(OllamaError(error=in_ollama_terms(exc).message))


class OllamaServing:
    def __init__(self, broker: BrokerClient) -> None:
        self.broker = broker

    # -- chat and generate -------------------------------------------------------------------------

    async def chat(self, body: ChatRequest, request: Request) -> ChatResponse | Response:
        began = time.perf_counter_ns()
        check_generation(body)
        check_chat(body)
        messages = chat_messages(body.messages)
        if not messages:
            return await self._loaded(body.model, request, chat_reply)
        call = self.broker.stub.Chat(
            inference_pb2.ChatRequest(
                model=model_id(body.model),
                messages=messages,
                sampling=sampling(body.options, body.format),
                tools=tools_pb(body.tools),
            ),
            metadata=forwarded_metadata(request),
        )
        return await self._run(call, body, chat_reply, began)

    async def generate(self, body: GenerateRequest, request: Request) -> GenerateResponse | Response:
        began = time.perf_counter_ns()
        check_generation(body)
        check_generate(body)
        if not body.prompt and not body.system:
            return await self._loaded(body.model, request, generate_reply)
        params = sampling(body.options, body.format)
        metadata = forwarded_metadata(request)
        call: Any
        if body.raw:
            call = self.broker.stub.Complete(
                inference_pb2.CompleteRequest(
                    model=model_id(body.model), prompt=body.prompt or "", sampling=params
                ),
                metadata=metadata,
            )
        else:  # Ollama templates the prompt as the user's message
            messages = [common_pb2.ChatMessage(role="system", content=body.system)] if body.system else []
            if body.prompt:
                messages.append(common_pb2.ChatMessage(role="user", content=body.prompt))
            call = self.broker.stub.Chat(
                inference_pb2.ChatRequest(model=model_id(body.model), messages=messages, sampling=params),
                metadata=metadata,
            )
        return await self._run(call, body, generate_reply, began)

    async def _run(self, call: Any, body: GenerationFields, wrap: Wrap[R], began: int) -> R | Response:
        try:
            stream = await JobStream(call).start()
            if body.stream:
                return ndjson.response(lines(stream, body.model, wrap, began))
            result = await run_text(stream)
        except ApiError as exc:
            raise in_ollama_terms(exc) from None
        model = body.model or ollama_name(result.model)
        return wrap(model, result.text, finished(result.done, began), ollama_calls(result.tool_calls))

    async def _loaded(self, name: str, request: Request, wrap: Wrap[R]) -> R:
        """Ollama's answer to a request with nothing to generate: the model is loaded (here: served)."""
        served = await self._text_models(request)
        if name:
            find(served, name)
        elif not served:
            raise ApiError(grpc.StatusCode.UNAVAILABLE, "no text worker is registered")
        return wrap(name, "", Stats(done_reason="load"), None)

    # -- embeddings ----------------------------------------------------------------------------------

    async def embed(self, body: EmbedRequest, request: Request) -> EmbedResponse:
        began = time.monotonic_ns()
        inputs = [body.input] if isinstance(body.input, str) else body.input
        if body.dimensions is not None:
            size = await embedding_size(self.broker, request, model_id(body.model))
            if size is not None and body.dimensions != size:
                message = f"this model's embeddings have {size} dimensions and cannot be shortened"
                raise bad_request(f"dimensions: {message}", "dimensions")
        reply = await embed(
            self.broker, request, model_id(body.model), inputs, field="input", truncate=body.truncate
        )
        return EmbedResponse(
            model=body.model or ollama_name(reply.model),
            embeddings=[list(e.values) for e in reply.embeddings],
            total_duration=time.monotonic_ns() - began,
            load_duration=0,
            prompt_eval_count=reply.usage.prompt_tokens,
        )

    async def embeddings(self, body: EmbeddingsRequest, request: Request) -> EmbeddingsResponse:
        if not body.prompt:  # the older route answers an empty prompt with an empty embedding
            return EmbeddingsResponse(embedding=[])
        reply = await embed(
            self.broker,
            request,
            model_id(body.model),
            [body.prompt],
            field="prompt",
            truncate=True,
            normalize=False,  # as Ollama's older route
        )
        return EmbeddingsResponse(embedding=list(reply.embeddings[0].values))

    # -- models ------------------------------------------------------------------------------------

    async def _text_models(self, request: Request) -> list[common_pb2.ModelInfo]:
        reply = await self.broker.stub.ListModels(
            inference_pb2.ListModelsRequest(kind=common_pb2.JOB_KIND_TEXT),
            metadata=forwarded_metadata(request),
        )
        return list(reply.models)

    async def tags(self, request: Request) -> ListResponse:
        return ListResponse(
            models=[
                ListModelResponse(
                    name=ollama_name(m.id), model=ollama_name(m.id), modified_at=NEVER, details=details(m)
                )
                for m in await self._text_models(request)
            ]
        )

    async def show(self, body: ShowRequest, request: Request) -> ShowResponse:
        name = body.model or body.name
        if not name:
            raise bad_request("model is required", "model")
        model = find(await self._text_models(request), name)
        return ShowResponse(
            modelfile=modelfile(model),
            parameters=f"num_ctx {model.context_size}",
            template=model.chat_template,
            details=details(model),
            model_info=model_info(model),
            capabilities=capabilities(model),
            modified_at=NEVER,
        )

    async def ps(self, request: Request) -> ProcessResponse:
        """Every served text model is loaded, and stays so while its worker runs."""
        expires_at = rfc3339(datetime.now(UTC) + FOREVER)
        return ProcessResponse(
            models=[
                ProcessModelResponse(
                    name=ollama_name(m.id),
                    model=ollama_name(m.id),
                    details=details(m),
                    expires_at=expires_at,
                    context_length=m.context_size,
                )
                for m in await self._text_models(request)
            ]
        )

    async def version(self) -> VersionResponse:
        return VersionResponse(version=VERSION)


def error_body(exc: ApiError) -> dict[str, Any]:
    """Ollama's error is one string: it names the field a message leaves out (`{"error": "field: why"}`)."""
    named = not exc.param or exc.message.startswith(exc.param)
    return OllamaError(error=exc.message if named else f"{exc.param}: {exc.message}").model_dump()


render_error = renderer(error_body)
