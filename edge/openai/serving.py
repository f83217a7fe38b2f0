"""OpenAI JSON <-> velesio.v1 gRPC: chat and text completions (streamed or not, n choices), models, images."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from edge import sse
from edge.broker import BrokerClient, forwarded_metadata
from edge.errors import ApiError, bad_request
from edge.jobs import JobStream, TextResult, run_text
from edge.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ImageGenerationRequest,
    ResponseFormat,
    SamplingFields,
)
from edge.routing import renderer, token_id
from velesio.v1 import common_pb2, events_pb2, inference_pb2

IMAGE_SIZE = re.compile(r"([0-9]{1,5})x([0-9]{1,5})")
FINISH_REASONS = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_STOP_SEQUENCE: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
}


def finish_reason(done: events_pb2.JobDone) -> str:
    return FINISH_REASONS.get(done.finish_reason, "stop")


def usage(results: Sequence[TextResult]) -> dict[str, Any]:
    prompt = results[0].usage.prompt_tokens if results else 0
    completion = sum(r.usage.completion_tokens for r in results)
    cached = results[0].usage.cached_tokens if results else 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


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


def chat_logprobs(entries: Sequence[events_pb2.TokenLogprob]) -> dict[str, Any]:
    def one(token: str, logprob: float, raw: bytes) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(raw)}

    return {
        "content": [
            one(e.token, e.logprob, e.bytes)
            | {"top_logprobs": [one(t.token, t.logprob, t.bytes) for t in e.top_logprobs]}
            for e in entries
        ]
    }


def completion_logprobs(entries: Sequence[events_pb2.TokenLogprob]) -> dict[str, Any]:
    offsets, at = [], 0
    for entry in entries:
        offsets.append(at)
        at += len(entry.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{t.token: t.logprob for t in e.top_logprobs} for e in entries],
        "text_offset": offsets,
    }


class OpenAIServing:
    def __init__(self, broker: BrokerClient) -> None:
        self.broker = broker

    # -- models ------------------------------------------------------------------------------------

    async def models(self, request: Request) -> dict[str, Any]:
        reply = await self.broker.stub.ListModels(
            inference_pb2.ListModelsRequest(), metadata=forwarded_metadata(request)
        )
        return {
            "object": "list",
            "data": [
                {
                    "id": m.id,
                    "object": "model",
                    "created": 0,
                    "owned_by": "velesio",
                    "description": m.description,
                }
                for m in reply.models
            ],
        }

    # -- chat and text completions -----------------------------------------------------------------

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        logprobs = (body.top_logprobs or 1) if body.logprobs else 0
        max_tokens = body.max_completion_tokens or body.max_tokens
        messages = [
            common_pb2.ChatMessage(role=m.role, content=m.text(), name=m.name or "") for m in body.messages
        ]
        options = inference_pb2.JobOptions(session_id=body.user or "")
        calls = [
            inference_pb2.ChatRequest(
                model=body.model,
                messages=messages,
                sampling=sampling(body, max_tokens=max_tokens, logprobs=logprobs, index=i),
                options=options,
            )
            for i in range(body.n)
        ]
        metadata = forwarded_metadata(request)
        streams = await self._start([self.broker.stub.Chat(c, metadata=metadata) for c in calls])
        envelope = {"id": f"chatcmpl-{streams[0].job_id}", "created": int(time.time()), "model": body.model}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return sse.response(self._chat_chunks(streams, envelope, include_usage))
        results = await asyncio.gather(*(run_text(s) for s in streams))
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": r.text},
                "logprobs": chat_logprobs(r.logprobs) if body.logprobs else None,
                "finish_reason": finish_reason(r.done),
            }
            for i, r in enumerate(results)
        ]
        envelope["model"] = results[0].model or body.model
        return JSONResponse(
            envelope | {"object": "chat.completion", "choices": choices, "usage": usage(results)}
        )

    async def complete(self, body: CompletionRequest, request: Request) -> Response:
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
        envelope = {"id": f"cmpl-{streams[0].job_id}", "created": int(time.time()), "model": body.model}
        echo = prompt if body.echo else ""
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return sse.response(self._completion_chunks(streams, envelope, include_usage, echo))
        results = await asyncio.gather(*(run_text(s) for s in streams))
        choices = [
            {
                "index": i,
                "text": echo + r.text,
                "logprobs": completion_logprobs(r.logprobs) if body.logprobs else None,
                "finish_reason": finish_reason(r.done),
            }
            for i, r in enumerate(results)
        ]
        envelope["model"] = results[0].model or body.model
        return JSONResponse(
            envelope | {"object": "text_completion", "choices": choices, "usage": usage(results)}
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

    async def _chunks(
        self,
        streams: Sequence[JobStream],
        envelope: dict[str, Any],
        include_usage: bool,
        object_name: str,
        shape: Any,
    ) -> AsyncIterator[str]:
        base = envelope | {"object": object_name} | ({"usage": None} if include_usage else {})
        finished: list[TextResult] = []
        try:
            for index in range(len(streams)):
                first = shape(index, None, None)
                if first is not None:
                    yield sse.data(base | {"choices": [first]})
            async for index, event in self._merged(streams):
                base["model"] = streams[index].model or base["model"]
                if event.HasField("token"):
                    yield sse.data(base | {"choices": [shape(index, event.token, None)]})
                elif event.HasField("done"):
                    finished.append(TextResult(done=event.done))
                    yield sse.data(base | {"choices": [shape(index, None, event.done)]})
            if include_usage:
                yield sse.data(base | {"choices": [], "usage": usage(finished)})
        except ApiError as exc:
            yield sse.data(openai_error_body(exc))
        yield sse.data("[DONE]")

    def _chat_chunks(
        self, streams: Sequence[JobStream], envelope: dict[str, Any], include_usage: bool
    ) -> AsyncIterator[str]:
        def shape(
            index: int, token: events_pb2.TokenDelta | None, done: events_pb2.JobDone | None
        ) -> dict[str, Any]:
            if token is None and done is None:
                return {
                    "index": index,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            if done is not None:
                return {"index": index, "delta": {}, "logprobs": None, "finish_reason": finish_reason(done)}
            assert token is not None
            logprobs = chat_logprobs(token.logprobs) if token.logprobs else None
            return {
                "index": index,
                "delta": {"content": token.text},
                "logprobs": logprobs,
                "finish_reason": None,
            }

        return self._chunks(streams, envelope, include_usage, "chat.completion.chunk", shape)

    def _completion_chunks(
        self, streams: Sequence[JobStream], envelope: dict[str, Any], include_usage: bool, echo: str
    ) -> AsyncIterator[str]:
        def shape(
            index: int, token: events_pb2.TokenDelta | None, done: events_pb2.JobDone | None
        ) -> dict[str, Any] | None:
            if token is None and done is None:
                return (
                    {"index": index, "text": echo, "logprobs": None, "finish_reason": None} if echo else None
                )
            if done is not None:
                return {"index": index, "text": "", "logprobs": None, "finish_reason": finish_reason(done)}
            assert token is not None
            logprobs = completion_logprobs(token.logprobs) if token.logprobs else None
            return {"index": index, "text": token.text, "logprobs": logprobs, "finish_reason": None}

        return self._chunks(streams, envelope, include_usage, "text_completion", shape)

    # -- images ------------------------------------------------------------------------------------

    async def images(self, body: ImageGenerationRequest, request: Request) -> dict[str, Any]:
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
        return {
            "created": int(time.time()),
            "data": [
                {"b64_json": base64.b64encode(i.png).decode(), "revised_prompt": body.prompt} for i in images
            ],
        }


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
    return {
        "error": {
            "message": exc.message,
            "type": ERROR_TYPES.get(
                exc.status, "server_error" if exc.status >= 500 else "invalid_request_error"
            ),
            "param": exc.param,
            "code": code,
        }
    }


render_error = renderer(openai_error_body)
