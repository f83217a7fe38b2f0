"""Small helpers for tests that talk to a real cluster."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import grpc
import httpx
from hypothesis import HealthCheck, settings

from launcher.spawn import AsyncSpawned, clean_env
from velesio.v1 import common_pb2, events_pb2, inference_pb2, inference_pb2_grpc

Metadata = Sequence[tuple[str, str]]
REPO = Path(__file__).resolve().parent.parent
# What `velesio` children of the tests get: no VELESIO_* from the shell, and this working tree's code
# whatever the installed package maps.
CHILD_ENV = clean_env({"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.getenv("PYTHONPATH")]))})


def bearer(token: str) -> Metadata:
    return (("authorization", f"Bearer {token}"),)


def inference(address: str) -> tuple[grpc.aio.Channel, inference_pb2_grpc.InferenceAsyncStub]:
    channel = grpc.aio.insecure_channel(address)
    return channel, inference_pb2_grpc.InferenceStub(channel)


def complete(prompt: str, **sampling: object) -> inference_pb2.CompleteRequest:
    return inference_pb2.CompleteRequest(prompt=prompt, sampling=common_pb2.SamplingParams(**sampling))  # type: ignore[arg-type]


def kinds(events: Sequence[events_pb2.JobEvent]) -> list[str]:
    return [str(e.WhichOneof("event")) for e in events]


def text_of(events: Sequence[events_pb2.JobEvent]) -> str:
    return "".join(e.token.text for e in events if e.HasField("token"))


async def next_event(call: Any) -> events_pb2.JobEvent:
    """The next event of a streaming call; fails at the end of the stream."""
    response = await call.read()
    assert response is not grpc.aio.EOF, "the stream ended"
    event: events_pb2.JobEvent = response.event
    return event


async def collect(call: Any) -> list[events_pb2.JobEvent]:
    """The remaining events of a streaming call (any of the *Response types that wrap a JobEvent)."""
    events = []
    while (response := await call.read()) is not grpc.aio.EOF:
        events.append(response.event)
    return events


async def until_http_ok(process: AsyncSpawned, url: str, limit_s: float = 60.0) -> None:
    """Waits until GET `url` answers 200; fails with the process's log if it exits or the time runs out."""
    give_up = time.monotonic() + limit_s
    async with httpx.AsyncClient(timeout=2.0) as client:
        while True:
            if not process.alive():
                code = process.process.returncode
                raise AssertionError(f"{process.name} exited ({code}):\n{process.log_text(3000)}")
            with contextlib.suppress(httpx.TransportError):
                if (await client.get(url)).status_code == 200:
                    return
            if time.monotonic() > give_up:
                log = process.log_text(3000)
                raise AssertionError(f"{process.name}: {url} not 200 in {limit_s} s:\n{log}")
            await asyncio.sleep(0.05)


async def eventually(
    check: Callable[[], Awaitable[bool]], limit_s: float = 5.0, interval: float = 0.02
) -> None:
    give_up = time.monotonic() + limit_s
    while not await check():
        if time.monotonic() > give_up:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)


def api_routes(routes: list[Any]) -> list[Any]:
    """Every FastAPI APIRoute among `routes`, included routers walked into (e.g. `create_app(...).routes`)."""
    from fastapi.routing import APIRoute

    found: list[Any] = []
    for route in routes:
        if isinstance(route, APIRoute):
            found.append(route)
        elif hasattr(route, "original_router"):  # an included router
            found += api_routes(list(route.original_router.routes))
    return found


# The fuzzers' profile: short and derandomized in CI; VELESIO_FUZZ_EXAMPLES raises it (`make fuzz`).
FUZZ_EXAMPLES = int(os.environ.get("VELESIO_FUZZ_EXAMPLES", "25"))
FUZZ = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


class Serving(Protocol):
    async def serve(self, stop: asyncio.Event) -> None: ...


@contextlib.asynccontextmanager
async def serving(component: Serving, stop_within_s: float = 5.0) -> AsyncIterator[None]:
    """Runs `component.serve(stop)` (the relay, the reader) for the block, then stops it and waits."""
    stop = asyncio.Event()
    task = asyncio.create_task(component.serve(stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, stop_within_s)
