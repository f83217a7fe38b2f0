"""Background loops that stop when asked, even when a library swallows task cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable

import redis

log = logging.getLogger(__name__)


async def periodic(
    interval: float, step: Callable[[], Awaitable[None]], stop: asyncio.Event, name: str
) -> None:
    """Runs `step` every `interval` seconds until `stop` is set. Redis and network errors are logged and
    retried next time; anything else is a bug and ends the loop with its traceback."""
    while not stop.is_set():
        try:
            await step()
        except (redis.RedisError, OSError) as exc:
            log.warning("%s failed: %s", name, exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)


async def finish(tasks: Iterable[asyncio.Task[None]], stop: asyncio.Event, limit_s: float = 5.0) -> None:
    """Stops background tasks: sets `stop`, cancels them, and waits (bounded) until they are done."""
    stop.set()
    pending = [t for t in tasks if not t.done()]
    for task in pending:
        task.cancel()
    if pending:
        _, stuck = await asyncio.wait(pending, timeout=limit_s)
        for task in stuck:
            log.warning("background task %s did not stop in %.0fs", task.get_name(), limit_s)
