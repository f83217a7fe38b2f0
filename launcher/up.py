"""`velesio up`: the whole stack on one machine, as one process tree.

Redis (embedded unless --redis-url), one broker, the text and image workers and the REST edge run as
child processes of this one, each the same `velesio <command>` a distributed deployment runs. `up` says
what it waits for while models load, and once every worker has registered and the edge is ready it
prints where everything is served. A child that dies is restarted with backoff (launcher/supervise.py);
Ctrl-C or SIGTERM stops them all, Redis last.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
import uuid
from collections.abc import Callable

import redis.asyncio

from launcher.embedded_redis import EmbeddedRedis
from launcher.plan import CannotStart, Plan, Proc, banner, check_exposure, check_ports, connect_host, plan
from launcher.settings import UpSettings
from launcher.supervise import Child, ChildFailed, Probe
from mesh.keys import Keys
from mesh.registry import Registry
from mesh.server import join_host_port
from mesh.settings import CommonSettings, RedisSettings
from observability.logs import configure_logging

log = logging.getLogger(__name__)

PROGRESS_S = 5.0  # how often a slow start-up says what it still waits for
EXTERNAL_REDIS_LIMIT_S = 30.0


class Stopped(Exception):
    """Ctrl-C or SIGTERM arrived."""


async def http_status(host: str, port: int, path: str, limit_s: float = 2.0) -> int:
    """The HTTP status of GET `path` (0 for an answer that is not HTTP). Plain asyncio streams, so that
    this process starts no threads (see launcher.spawn.die_with_parent)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), limit_s)
    try:
        writer.write(f"GET {path} HTTP/1.0\r\nHost: {join_host_port(host, port)}\r\n\r\n".encode())
        await writer.drain()
        status = (await asyncio.wait_for(reader.readline(), limit_s)).split()
        return int(status[1]) if len(status) > 1 and status[1].isdigit() else 0
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


class Up:
    def __init__(self, settings: UpSettings) -> None:
        self.settings = settings
        self.t0 = time.monotonic()
        self.stopping = asyncio.Event()
        self.hurry = asyncio.Event()
        self.children: list[Child] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.models: dict[str, str] = {}  # "text"/"image" -> a model id a worker serves

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:5.1f}s] {text}", flush=True)

    def _on_signal(self) -> None:
        if self.stopping.is_set():
            self.say("stopping now (SIGKILL)")
            self.hurry.set()
            return
        self.say("stopping every child (signal again to kill them at once)")
        self.stopping.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            if sig == signal.SIGHUP and signal.getsignal(sig) is signal.SIG_IGN:
                continue  # started under nohup: outlive the terminal
            loop.add_signal_handler(sig, self._on_signal)
        settings = self.settings
        embedded = None
        if not settings.redis_url:
            embedded = EmbeddedRedis(settings.data_dir / "redis", host="127.0.0.1", port=settings.redis_port)
        the_plan = plan(settings, embedded.url if embedded else settings.redis_url, uuid.uuid4().hex[:6])
        try:
            check_exposure(settings)
            check_ports(settings, the_plan, embedded.port if embedded and settings.redis_port else 0)
            client = RedisSettings.from_dsn(the_plan.redis_url).connect(max_connections=8)
        except (CannotStart, ValueError) as exc:  # ValueError: a --redis-url that is no Redis URL
            log.error("%s", exc)
            return 1
        try:
            await self._start(the_plan, embedded, client)
            self._print_banner(the_plan, embedded)
            await self._until_stopped()
            return 0
        except Stopped:
            return 0
        except (ChildFailed, TimeoutError, OSError, ValueError) as exc:  # OSError: no redis-server, data dir
            log.error("%s", exc)
            return 1
        finally:
            await self._stop_all()
            await client.aclose()
            self.say("stopped")

    async def _start(
        self, the_plan: Plan, embedded: EmbeddedRedis | None, client: redis.asyncio.Redis
    ) -> None:
        redis_shown = RedisSettings.from_dsn(the_plan.redis_url).url
        if embedded is not None:
            embedded.data_dir.mkdir(parents=True, exist_ok=True)
            self.say(f"starting Redis on {embedded.url} (data in {embedded.data_dir})")
            redis_child = self._child(
                Proc("redis", "redis", embedded.command(), "starting redis-server"),
                self._redis_probe(client),
                explain=lambda: f"its log ends:\n{embedded.log_tail()}",
            )
            await self._wait_ready([redis_child])
        else:
            self.say(f"connecting to Redis at {redis_shown}")
            await self._reach(client, redis_shown)
        registry = Registry(client, Keys(self.settings.key_prefix))
        started = []
        for proc in the_plan.processes:
            self.say(f"starting {proc.name} ({proc.doing})")
            started.append(self._child(proc, self._probe_for(proc, the_plan, registry)))
        await self._wait_ready(started)

    def _child(self, proc: Proc, probe: Probe, explain: Callable[[], str] | None = None) -> Child:
        child = Child(proc.name, proc.argv, env=proc.env, doing=proc.doing, probe=probe, explain=explain)
        child.spawn()
        self.children.append(child)
        self.tasks.append(asyncio.create_task(child.supervise(self.stopping), name=f"supervise-{proc.name}"))
        return child

    def _redis_probe(self, client: redis.asyncio.Redis) -> Probe:
        async def probe(child: Child) -> str | None:
            await client.ping()
            return "answers PING"

        return probe

    def _probe_for(self, proc: Proc, the_plan: Plan, registry: Registry) -> Probe:
        host = connect_host(self.settings.host)
        if proc.role == "broker":
            port = self.settings.grpc_port

            async def broker(child: Child) -> str | None:
                _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 2.0)
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
                return f"velesio.v1.Inference on {join_host_port(host, port)}"

            return broker
        if proc.role == "edge":
            path = "/readyz" if the_plan.has_workers else "/healthz"
            port = self.settings.http_port

            async def edge(child: Child) -> str | None:
                ok = await http_status(host, port, path) == 200
                return f"http://{join_host_port(host, port)} ({path} answers 200)" if ok else None

            return edge

        async def worker(child: Child) -> str | None:
            for info in await registry.live_workers():
                registered = info.registered_at.seconds + info.registered_at.nanos / 1e9
                if info.worker_id == proc.worker_id and registered >= child.started_wall:
                    self.models.setdefault(proc.role, info.models[0])
                    return f"registered as {info.worker_id}, serves {', '.join(info.models)}"
            return None

        return worker

    async def _reach(self, client: redis.asyncio.Redis, shown: str) -> None:
        give_up = time.monotonic() + EXTERNAL_REDIS_LIMIT_S
        while True:
            try:
                await asyncio.wait_for(client.ping(), 2.0)
                return
            except (redis.RedisError, OSError, TimeoutError) as exc:
                if time.monotonic() > give_up:
                    raise TimeoutError(f"cannot reach Redis at {shown}: {exc}") from None
            if self.stopping.is_set():
                raise Stopped
            await asyncio.sleep(0.5)

    async def _wait_ready(self, children: list[Child]) -> None:
        """Waits until every child is ready, saying every few seconds what it still waits for."""
        pending = list(children)
        said = time.monotonic()
        while pending:
            self._check_supervisors()
            for child in [c for c in pending if c.ready.is_set()]:
                pending.remove(child)
                self.say(f"{child.name} ready ({time.monotonic() - child.started_at:.1f}s): {child.serves}")
            if pending and time.monotonic() - said >= PROGRESS_S:
                said = time.monotonic()
                self.say("still waiting: " + "; ".join(self._waiting_on(c) for c in pending))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), 0.1)

    def _waiting_on(self, child: Child) -> str:
        restarted = f", restarted {child.restarts}x" if child.restarts else ""
        return f"{child.name} {child.doing} ({time.monotonic() - child.started_at:.0f}s{restarted})"

    def _check_supervisors(self) -> None:
        if self.stopping.is_set():
            raise Stopped
        for task in self.tasks:
            if task.done():
                task.result()  # raises ChildFailed

    async def _until_stopped(self) -> None:
        while True:
            self._check_supervisors()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), 0.5)

    def _print_banner(self, the_plan: Plan, embedded: EmbeddedRedis | None) -> None:
        where = f"embedded, data in {embedded.data_dir}" if embedded else "external"
        redis_line = f"{RedisSettings.from_dsn(the_plan.redis_url).url} ({where})"
        took = time.monotonic() - self.t0
        print(banner(self.settings, the_plan, self.models, redis_line, took), flush=True)

    async def _stop_all(self) -> None:
        self.stopping.set()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        order = [
            [c for c in self.children if c.name == "edge"],
            [c for c in self.children if c.name not in ("edge", "redis")],
            [c for c in self.children if c.name == "redis"],
        ]
        for group in order:
            running = [c for c in group if c.process is not None and c.process.poll() is None]
            if running:
                self.say("stopping " + ", ".join(c.name for c in running))
                await asyncio.gather(*(c.stop(self.hurry) for c in running))


def main(settings: CommonSettings) -> int:
    assert isinstance(settings, UpSettings)
    configure_logging(settings.log_level, settings.log_format, "up")
    return asyncio.run(Up(settings).run())
