"""Child processes that `velesio up` keeps running.

Each child is a command line with a readiness probe. A child that dies is reported (name, exit code) and
started again after an exponential backoff, which starts over once a child has run healthily for a while.
Stopping sends SIGTERM, then SIGKILL after a grace period. Children run in process groups of their own, so
a terminal's Ctrl-C reaches only `velesio up`, which then stops them in order (Redis last); on Linux each
child also gets SIGTERM from the kernel should `velesio up` itself die without stopping it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

import redis

from launcher.spawn import popen

log = logging.getLogger(__name__)

POLL_S = 0.2
PROBE_S = 0.5
PROBE_LIMIT_S = 3.0
# The exit code of a child that cannot run as configured (a bad flag, a model that does not load):
# restarting it would fail the same way, so before it was ever ready it ends `velesio up` instead.
CONFIG_ERROR = 2
# A child that exits this many times in a row without ever having been ready will not start as configured
# (a corrupt data file, a binary for another CPU, a GPU it cannot use): up stops and says so.
MAX_FAILED_STARTS = 3

# What the child serves once it is ready, in a few words; None while it is not ready yet.
Probe = Callable[["Child"], Awaitable[str | None]]


class ChildFailed(Exception):
    """A child cannot start as configured; `velesio up` stops."""


@dataclass
class Backoff:
    """Delays between restarts: `first_s`, doubling up to `max_s`; back to `first_s` after a run of at
    least `healthy_s`."""

    first_s: float = 1.0
    max_s: float = 30.0
    healthy_s: float = 60.0

    def __post_init__(self) -> None:
        self._next = self.first_s

    def after_exit(self, ran_s: float) -> float:
        if ran_s >= self.healthy_s:
            self._next = self.first_s
        delay = self._next
        self._next = min(self._next * 2, self.max_s)
        return delay


def exit_text(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"code {code} ({signal.Signals(-code).name})"
    return f"code {code}"


class Child:
    """One supervised process: `supervise()` starts it, restarts it when it dies, and reports when it is
    ready; `stop()` ends it."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        doing: str,
        probe: Probe,
        backoff: Backoff | None = None,
        grace_s: float = 15.0,
        explain: Callable[[], str] | None = None,
    ) -> None:
        self.name = name
        self.explain = explain  # where the reason of a failed start is, when the child logs elsewhere
        self.argv = list(argv)
        self.env = dict(env)
        self.doing = doing  # what it is busy with until ready, for progress lines
        self.probe = probe
        self.backoff = backoff or Backoff()
        self.grace_s = grace_s
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0  # time.monotonic() of the current process's start
        self.started_wall = 0.0  # time.time() of the same, to compare with what the child wrote to Redis
        self.restarts = 0
        self.ready = asyncio.Event()
        self.serves = ""
        self._ever_ready = False
        self._failed_starts = 0

    def spawn(self) -> None:
        self.ready.clear()
        self.started_at, self.started_wall = time.monotonic(), time.time()
        self.process = popen(self.argv, env=self.env, new_group=True, with_parent=True)

    async def supervise(self, stopping: asyncio.Event) -> None:
        """Keeps the child running until `stopping` is set; raises ChildFailed for a configuration error."""
        while not stopping.is_set():
            if self.process is None:
                self.spawn()
            code = await self._run_until_exit(stopping)
            if code is None:
                return
            ran_s = time.monotonic() - self.started_at
            self.process = None
            if not self._ever_ready:
                self._failed_starts += 1
                if code == CONFIG_ERROR or self._failed_starts >= MAX_FAILED_STARTS:
                    detail = self.explain() if self.explain is not None else "see above"
                    raise ChildFailed(
                        f"{self.name} cannot start as configured (exit {exit_text(code)}); it was never "
                        f"ready in {self._failed_starts} start(s): {detail}"
                    )
            delay = self.backoff.after_exit(ran_s)
            self.restarts += 1
            log.error(
                "%s exited with %s after %.1fs; restarting it in %.0fs (restart %d)",
                self.name, exit_text(code), ran_s, delay, self.restarts,
            )  # fmt: skip
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), delay)

    async def _run_until_exit(self, stopping: asyncio.Event) -> int | None:
        """Waits for the process to exit (its code) or for `stopping` (None), probing until it is ready."""
        assert self.process is not None
        next_probe = 0.0
        while not stopping.is_set():
            code = self.process.poll()
            if code is not None:
                return code
            if not self.ready.is_set() and time.monotonic() >= next_probe:
                await self._probe()
                next_probe = time.monotonic() + PROBE_S
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), POLL_S)
        return None

    async def _probe(self) -> None:
        try:
            serves = await asyncio.wait_for(self.probe(self), PROBE_LIMIT_S)
        except (redis.RedisError, OSError, TimeoutError):
            return
        if serves is None or self.process is None or self.process.poll() is not None:
            return
        self.serves = serves
        took = time.monotonic() - self.started_at
        if self._ever_ready:
            log.warning("%s is back after its restart: %s (ready in %.1fs)", self.name, serves, took)
        self._ever_ready = True
        self.ready.set()

    async def stop(self, hurry: asyncio.Event) -> None:
        """SIGTERM, then SIGKILL after `grace_s` or as soon as `hurry` is set."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        while process.poll() is None:
            if hurry.is_set() or time.monotonic() > deadline:
                log.warning("%s did not stop in time; killing it", self.name)
                process.kill()
                process.wait()
                break
            await asyncio.sleep(0.05)
        code = process.returncode
        if code not in (0, -signal.SIGTERM, -signal.SIGKILL):
            log.warning("%s stopped with %s", self.name, exit_text(code))
