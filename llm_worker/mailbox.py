"""How the event loops and the engine thread talk: messages in through one thread-safe queue, results
out through `loop.call_soon_threadsafe`, batched to one wake-up per loop per engine step."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llm_worker.llama_model import LlamaModel
from llm_worker.sampling import Grammar
from llm_worker.types import Delta, Finished, GenerateRequest
from mesh.errors import VelesioError

Item = Delta | Finished | VelesioError


@dataclass(frozen=True)
class Sink:
    """Where one request's results go: an asyncio queue in the loop that waits on it."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Item]


@dataclass(frozen=True)
class Submit:
    rid: int
    request: GenerateRequest
    prompt: str
    is_chat: bool
    grammar: Grammar | None
    sink: Sink


@dataclass(frozen=True)
class Cancel:
    rid: int


@dataclass(frozen=True)
class Call:
    """Run `fn(model)` on the engine thread and settle `future` (in `loop`) with its result."""

    fn: Callable[[LlamaModel], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]


class Stop:
    """Finish: fail what is still running, free llama.cpp's memory, end the thread."""


Message = Submit | Cancel | Call | Stop


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def settle_threadsafe(
    loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], result: Any, error: BaseException | None
) -> None:
    with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits any more
        loop.call_soon_threadsafe(_settle, future, result, error)


def _deliver(items: list[tuple[asyncio.Queue[Item], Item]]) -> None:
    for target, item in items:
        target.put_nowait(item)


class Outbox:
    """Results gathered during one engine step, handed to their loops together by `flush()`."""

    def __init__(self) -> None:
        self._pending: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Item], Item]]] = {}

    def put(self, sink: Sink, item: Item) -> None:
        self._pending.setdefault(sink.loop, []).append((sink.queue, item))

    def flush(self) -> None:
        for loop, items in self._pending.items():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_deliver, items)
        self._pending = {}
