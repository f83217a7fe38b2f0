"""Reading a broker job stream the way every dialect needs it: events with errors as `ApiError`, or the
whole text result at once. The stream is cancelled (and with it the job) when the reader stops early."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from edge.errors import ApiError
from edge.tools import Call, CallCollector
from velesio.v1 import common_pb2, events_pb2


class JobStream:
    """One streaming call to the broker. `await start()` reads up to the first event, so that errors the
    broker finds before queueing (bad input, auth, limits) become HTTP errors rather than stream errors."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self._first: events_pb2.JobEvent | None = None
        self.job_id = ""
        self.model = ""

    async def _read(self) -> events_pb2.JobEvent | None:
        try:
            response = await self.call.read()
        except grpc.aio.AioRpcError as exc:
            raise ApiError.from_rpc(exc) from None
        if response is grpc.aio.EOF:
            return None
        event: events_pb2.JobEvent = response.event
        self.job_id = event.job_id or self.job_id
        if event.HasField("started"):
            self.model = event.started.model
        return event

    async def start(self) -> JobStream:
        self._first = await self._read()
        return self

    async def events(self) -> AsyncIterator[events_pb2.JobEvent]:
        """Every event up to and including done; an error event raises ApiError."""
        try:
            event = self._first if self._first is not None else await self._read()
            self._first = None
            while event is not None:
                if event.HasField("error"):
                    raise ApiError.from_event(event.error.code, event.error.message)
                yield event
                if event.HasField("done"):
                    return
                event = await self._read()
            raise ApiError(grpc.StatusCode.UNAVAILABLE, "the broker ended the stream early")
        finally:
            self.call.cancel()  # no-op once the call has finished; cancels the job when we stop early


@dataclass
class TextResult:
    job_id: str = ""
    model: str = ""
    text: str = ""
    done: events_pb2.JobDone = field(default_factory=events_pb2.JobDone)
    logprobs: list[events_pb2.TokenLogprob] = field(default_factory=list)
    tool_calls: list[Call] = field(default_factory=list)

    @property
    def usage(self) -> common_pb2.Usage:
        return self.done.usage


async def run_text(stream: JobStream) -> TextResult:
    result = TextResult()
    parts = []
    calls = CallCollector()
    async for event in stream.events():
        if event.HasField("token"):
            parts.append(event.token.text)
            result.logprobs.extend(event.token.logprobs)
        elif event.HasField("tool_call"):
            calls.add(event.tool_call)
        elif event.HasField("done"):
            result.done = event.done
    result.text = "".join(parts)
    result.tool_calls = calls.calls
    result.job_id, result.model = stream.job_id, stream.model
    return result
