"""OpenAI JSON <-> velesio.v1 gRPC: chat and text completions (streamed or not, n choices), models, images."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol, TypeVar

from fastapi import Request
from fastapi.responses import Response

from edge import sse
from edge.broker import BrokerClient, forwarded_metadata
from edge.embed import base64_floats, embed, embedding_size
from edge.errors import ApiError, bad_request
from edge.jobs import JobStream, TextResult, run_text
from edge.openai.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatLogprobs,
    ChatMessageIn,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    EmbeddingData,
    EmbeddingList,
    EmbeddingRequest,
    EmbeddingUsage,
    ErrorDetail,
    ErrorResponse,
    FinishReason,
    FunctionCall,
    FunctionCallDelta,
    Image,
    ImageGenerationRequest,
    ImagesResponse,
    Model,
    ModelList,
    NamedToolChoice,
    PromptTokensDetails,
    ResponseFormat,
    SamplingFields,
    StreamOptions,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
    TopLogprob,
    Usage,
)
from edge.routing import renderer
from edge.tools import Call, past_call, tools_pb
from edge.wire import Reply, token_id
from velesio.v1 import common_pb2, events_pb2, inference_pb2

IMAGE_SIZE = re.compile(r"([0-9]{1,5})x([0-9]{1,5})")
FINISH_REASONS: dict[int, FinishReason] = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_STOP_SEQUENCE: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_TOOL_CALLS: "tool_calls",
}
TOOL_CHOICES = {
    "auto": common_pb2.TOOL_CHOICE_MODE_AUTO,
    "none": common_pb2.TOOL_CHOICE_MODE_NONE,
    "required": common_pb2.TOOL_CHOICE_MODE_REQUIRED,
}


def finish_reason(done: events_pb2.JobDone) -> FinishReason:
    return FINISH_REASONS.get(done.finish_reason, "stop")


def usage(results: Sequence[TextResult]) -> Usage:
    prompt = results[0].usage.prompt_tokens if results else 0
    completion = sum(r.usage.completion_tokens for r in results)
    cached = results[0].usage.cached_tokens if results else 0
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
    )


def _grammar_schema(response_format: ResponseFormat | None) -> str:
    if response_format is None or response_format.type == "text":
        return ""
    if response_format.type == "json_object":
        return json.dumps({"type": "object"})
    if response_format.json_schema is None:
        raise bad_request("json_schema is required when type is json_schema", "response_format.json_schema")
    return json.dumps(response_format.json_schema.schema_)


def sampling(
    body: SamplingFields, *, max_tokens: int | None, logprobs: int, index: int
) -> common_pb2.SamplingParams:
    params = common_pb2.SamplingParams(stop=body.stops(), logprobs=logprobs)
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        value = getattr(body, name)
        if value is not None:
            setattr(params, name, value)
    if max_tokens is not None:
        params.max_tokens = max_tokens
    if body.seed is not None:
        params.seed = body.seed + index  # n choices with one seed: reproducible, yet different
    for token, bias in (body.logit_bias or {}).items():
        number = token_id(token)
        if number is None:
            raise bad_request(f"logit_bias keys are token ids, got {token!r}", "logit_bias")
        params.logit_bias[number] = bias
    params.json_schema = _grammar_schema(getattr(body, "response_format", None))
    return params


def chat_message(message: ChatMessageIn, index: int) -> common_pb2.ChatMessage:
    calls = [
        past_call(
            call.id,
            call.function.name,
            call.function.arguments,
            f"messages[{index}].tool_calls[{i}].function",
        )
        for i, call in enumerate(message.tool_calls or [])
    ]
    return common_pb2.ChatMessage(
        role=message.role,
        content=message.text(),
        name=message.name or "",
        tool_calls=calls,
        tool_call_id=message.tool_call_id or "",
    )


def tool_choice(choice: str | NamedToolChoice | None) -> common_pb2.ToolChoice:
    if choice is None:
        return common_pb2.ToolChoice()
    if isinstance(choice, str):
        return common_pb2.ToolChoice(mode=TOOL_CHOICES[choice])
    return common_pb2.ToolChoice(mode=common_pb2.TOOL_CHOICE_MODE_REQUIRED, function=choice.function.name)


def tool_calls(calls: Sequence[Call]) -> list[ToolCall] | None:
    return [
        ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments)) for c in calls
    ] or None


def chat_logprobs(entries: Sequence[events_pb2.TokenLogprob]) -> ChatLogprobs:
    return ChatLogprobs(
        content=[
            TokenLogprob(
                token=e.token,
                logprob=e.logprob,
                bytes=list(e.bytes),
                top_logprobs=[
                    TopLogprob(token=t.token, logprob=t.logprob, bytes=list(t.bytes)) for t in e.top_logprobs
                ],
            )
            for e in entries
        ]
    )


def completion_logprobs(entries: Sequence[events_pb2.TokenLogprob]) -> CompletionLogprobs:
    offsets, at = [], 0
    for entry in entries:
        offsets.append(at)
        at += len(entry.token)
    return CompletionLogprobs(
        tokens=[e.token for e in entries],
        token_logprobs=[e.logprob for e in entries],
        top_logprobs=[{t.token: t.logprob for t in e.top_logprobs} for e in entries],
        text_offset=offsets,
    )


@dataclass
class Envelope:
    """What every chunk of one streamed request repeats."""

    id: str
    created: int
    model: str


C = TypeVar("C", ChatChunkChoice, CompletionChoice)


class ChoiceStream(Protocol[C]):
    """How one dialect's stream turns job events into choices of chunks, and choices into a chunk."""

    def opening(self, index: int) -> C | None:
        """The choice sent before any token (the chat role), or None."""

    def token(self, index: int, token: events_pb2.TokenDelta) -> C: ...

    def tool_call(self, index: int, delta: events_pb2.ToolCallDelta) -> C | None:
        """A tool call's piece, or None where the dialect has no tool calls."""

    def finish(self, index: int, done: events_pb2.JobDone) -> C: ...

    def chunk(self, envelope: Envelope, choices: list[C], usage: Usage | None) -> Reply: ...


class ChatChoices:
    def opening(self, index: int) -> ChatChunkChoice:
        return ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=""))

    def token(self, index: int, token: events_pb2.TokenDelta) -> ChatChunkChoice:
        logprobs = chat_logprobs(token.logprobs) if token.logprobs else None
        return ChatChunkChoice(index=index, delta=ChatDelta(content=token.text), logprobs=logprobs)

    def tool_call(self, index: int, delta: events_pb2.ToolCallDelta) -> ChatChunkChoice:
        first = bool(delta.id)
        call = ToolCallDelta(
            index=delta.index,
            id=delta.id if first else None,
            type="function" if first else None,
            function=FunctionCallDelta(name=delta.name if first else None, arguments=delta.arguments),
        )
        return ChatChunkChoice(index=index, delta=ChatDelta(tool_calls=[call]))

    def finish(self, index: int, done: events_pb2.JobDone) -> ChatChunkChoice:
        return ChatChunkChoice(index=index, delta=ChatDelta(), finish_reason=finish_reason(done))

    def chunk(self, envelope: Envelope, choices: list[ChatChunkChoice], usage: Usage | None) -> Reply:
        return ChatCompletionChunk(**asdict(envelope), choices=choices, usage=usage)


@dataclass
class CompletionChoices:
    echo: str

    def opening(self, index: int) -> CompletionChoice | None:
        return CompletionChoice(index=index, text=self.echo) if self.echo else None

    def token(self, index: int, token: events_pb2.TokenDelta) -> CompletionChoice:
        logprobs = completion_logprobs(token.logprobs) if token.logprobs else None
        return CompletionChoice(index=index, text=token.text, logprobs=logprobs)

    def tool_call(self, index: int, delta: events_pb2.ToolCallDelta) -> None:
        return None  # a text completion has no tools

    def finish(self, index: int, done: events_pb2.JobDone) -> CompletionChoice:
        return CompletionChoice(index=index, text="", finish_reason=finish_reason(done))

    def chunk(self, envelope: Envelope, choices: list[CompletionChoice], usage: Usage | None) -> Reply:
        return Completion(**asdict(envelope), choices=choices, usage=usage)


class OpenAIServing:
    def __init__(self, broker: BrokerClient) -> None:
        self.broker = broker

    # -- models ------------------------------------------------------------------------------------

    async def models(self, request: Request) -> ModelList:
        reply = await self.broker.stub.ListModels(
            inference_pb2.ListModelsRequest(), metadata=forwarded_metadata(request)
        )
        return ModelList(data=[Model(id=m.id, description=m.description) for m in reply.models])

    # -- chat and text completions -----------------------------------------------------------------

    async def chat(self, body: ChatCompletionRequest, request: Request) -> ChatCompletion | Response:
        logprobs = (body.top_logprobs or 1) if body.logprobs else 0
        max_tokens = body.max_completion_tokens or body.max_tokens
        messages = [chat_message(m, i) for i, m in enumerate(body.messages)]
        options = inference_pb2.JobOptions(session_id=body.user or "")
        calls = [
            inference_pb2.ChatRequest(
                model=body.model,
                messages=messages,
                sampling=sampling(body, max_tokens=max_tokens, logprobs=logprobs, index=i),
                options=options,
                tools=tools_pb(body.tools),
                tool_choice=tool_choice(body.tool_choice),
                parallel_tool_calls=body.parallel_tool_calls,
            )
            for i in range(body.n)
        ]
        metadata = forwarded_metadata(request)
        streams = await self._start([self.broker.stub.Chat(c, metadata=metadata) for c in calls])
        envelope = Envelope(id=f"chatcmpl-{streams[0].job_id}", created=int(time.time()), model=body.model)
        if body.stream:
            return self._stream(streams, envelope, body.stream_options, ChatChoices())
        results = await asyncio.gather(*(run_text(s) for s in streams))
        envelope.model = results[0].model or body.model
        return ChatCompletion(
            **asdict(envelope),
            choices=[
                ChatChoice(
                    index=i,
                    message=AssistantMessage(
                        content=r.text if r.text or not r.tool_calls else None,
                        tool_calls=tool_calls(r.tool_calls),
                    ),
                    logprobs=chat_logprobs(r.logprobs) if body.logprobs else None,
                    finish_reason=finish_reason(r.done),
                )
                for i, r in enumerate(results)
            ],
            usage=usage(results),
        )

    async def complete(self, body: CompletionRequest, request: Request) -> Completion | Response:
        prompt = body.prompt_text()
        calls = [
            inference_pb2.CompleteRequest(
                model=body.model,
                prompt=prompt,
                sampling=sampling(
                    body, max_tokens=body.max_tokens or 16, logprobs=body.logprobs or 0, index=i
                ),
                options=inference_pb2.JobOptions(session_id=body.user or ""),
            )
            for i in range(body.n)
        ]
        metadata = forwarded_metadata(request)
        streams = await self._start([self.broker.stub.Complete(c, metadata=metadata) for c in calls])
        envelope = Envelope(id=f"cmpl-{streams[0].job_id}", created=int(time.time()), model=body.model)
        echo = prompt if body.echo else ""
        if body.stream:
            return self._stream(streams, envelope, body.stream_options, CompletionChoices(echo))
        results = await asyncio.gather(*(run_text(s) for s in streams))
        envelope.model = results[0].model or body.model
        return Completion(
            **asdict(envelope),
            choices=[
                CompletionChoice(
                    index=i,
                    text=echo + r.text,
                    logprobs=completion_logprobs(r.logprobs) if body.logprobs else None,
                    finish_reason=finish_reason(r.done),
                )
                for i, r in enumerate(results)
            ],
            usage=usage(results),
        )

    async def _start(self, calls: Sequence[Any]) -> list[JobStream]:
        streams = [JobStream(call) for call in calls]
        try:
            await asyncio.gather(*(s.start() for s in streams))
        except BaseException:
            for stream in streams:
                stream.call.cancel()
            raise
        return streams

    async def _merged(self, streams: Sequence[JobStream]) -> AsyncIterator[tuple[int, events_pb2.JobEvent]]:
        """Events of several streams as they come, tagged with the stream's index."""
        queue: asyncio.Queue[tuple[int, events_pb2.JobEvent | BaseException | None]] = asyncio.Queue()

        async def pump(index: int, stream: JobStream) -> None:
            try:
                async for event in stream.events():
                    await queue.put((index, event))
                await queue.put((index, None))
            except Exception as exc:
                await queue.put((index, exc))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        try:
            open_streams = len(streams)
            while open_streams:
                index, item = await queue.get()
                if item is None:
                    open_streams -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield index, item
        finally:
            for task in tasks:
                task.cancel()

    def _stream(
        self,
        streams: Sequence[JobStream],
        envelope: Envelope,
        options: StreamOptions | None,
        choices: ChoiceStream[C],
    ) -> Response:
        """SSE of the chunks of n merged job streams, the usage chunk when asked for, then `[DONE]`."""
        include_usage = bool(options and options.include_usage)
        absent = None if include_usage else {"usage"}  # not sent at all unless asked for

        def event(chunk_choices: list[C], usage: Usage | None = None) -> str:
            return sse.data(choices.chunk(envelope, chunk_choices, usage).model_dump_json(exclude=absent))

        async def chunks() -> AsyncIterator[str]:
            finished: list[TextResult] = []
            try:
                for index in range(len(streams)):
                    if (first := choices.opening(index)) is not None:
                        yield event([first])
                async for index, job_event in self._merged(streams):
                    envelope.model = streams[index].model or envelope.model
                    if job_event.HasField("token"):
                        yield event([choices.token(index, job_event.token)])
                    elif job_event.HasField("tool_call"):
                        if (call := choices.tool_call(index, job_event.tool_call)) is not None:
                            yield event([call])
                    elif job_event.HasField("done"):
                        finished.append(TextResult(done=job_event.done))
                        yield event([choices.finish(index, job_event.done)])
                if include_usage:
                    yield event([], usage(finished))
            except ApiError as exc:
                yield sse.data(openai_error_body(exc))
            yield sse.data("[DONE]")

        return sse.response(chunks())

    # -- embeddings --------------------------------------------------------------------------------

    async def embeddings(self, body: EmbeddingRequest, request: Request) -> EmbeddingList:
        if body.dimensions is not None:
            size = await embedding_size(self.broker, request, body.model)
            if size is not None and body.dimensions != size:
                raise bad_request(
                    f"this model's embeddings have {size} dimensions and cannot be shortened", "dimensions"
                )
        reply = await embed(self.broker, request, body.model, body.inputs(), field="input")
        encode = base64_floats if body.encoding_format == "base64" else list
        data = [EmbeddingData(index=e.index, embedding=encode(e.values)) for e in reply.embeddings]
        tokens = reply.usage.prompt_tokens
        return EmbeddingList(
            data=data, model=reply.model, usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens)
        )

    # -- images ------------------------------------------------------------------------------------

    async def images(self, body: ImageGenerationRequest, request: Request) -> ImagesResponse:
        if body.response_format != "b64_json":
            raise bad_request("only response_format b64_json is supported", "response_format")
        size = IMAGE_SIZE.fullmatch(body.size)
        if size is None:
            raise bad_request(f"size must be WIDTHxHEIGHT, got {body.size!r}", "size")
        params = common_pb2.ImageParams(
            prompt=body.prompt,
            negative_prompt=body.negative_prompt or "",
            width=int(size[1]),
            height=int(size[2]),
            batch_size=body.n,
        )
        if body.steps is not None:
            params.steps = body.steps
        if body.seed is not None:
            params.seed = body.seed
        call = self.broker.stub.GenerateImage(
            inference_pb2.GenerateImageRequest(model=body.model, params=params),
            metadata=forwarded_metadata(request),
        )
        stream = await JobStream(call).start()
        images = [e.image async for e in stream.events() if e.HasField("image")]
        return ImagesResponse(
            created=int(time.time()),
            data=[
                Image(b64_json=base64.b64encode(i.png).decode(), revised_prompt=body.prompt) for i in images
            ],
        )


ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}


def openai_error_body(exc: ApiError) -> dict[str, Any]:
    code = exc.code.name.lower()
    if exc.status == 404 and "model" in exc.message:
        code = "model_not_found"
    kind = ERROR_TYPES.get(exc.status, "server_error" if exc.status >= 500 else "invalid_request_error")
    return ErrorResponse(
        error=ErrorDetail(message=exc.message, type=kind, param=exc.param, code=code)
    ).model_dump()


render_error = renderer(openai_error_body)
