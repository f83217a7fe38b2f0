"""The test rig: one real redis-server per test run, per-test key prefixes, and real gRPC servers on
127.0.0.1:0 built by the same bootstrap the services use."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import typing
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
import redis.asyncio

from launcher.embedded_redis import EmbeddedRedis
from mesh.keys import Keys
from mesh.server import GrpcServer, Service

if TYPE_CHECKING:
    import httpx


@pytest.fixture(scope="session", autouse=True)
def no_default_metrics_ports() -> Iterator[None]:
    """Processes the tests spawn serve no /metrics unless a test gives them a port: the default ports
    (9464...) would collide between the brokers and workers of one test."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VELESIO_METRICS_PORT", "0")
        yield


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), persist=False)
    server.start()
    yield server.url
    server.stop()


@pytest.fixture
def keys() -> Keys:
    """A key schema under a prefix of this test's own, so tests never see each other's keys."""
    return Keys(prefix=f"test-{uuid.uuid4().hex[:12]}")


@pytest.fixture
async def redis_client(redis_url: str, keys: Keys) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(redis_url)
    yield client
    async for key in client.scan_iter(match=f"{keys.prefix}:*"):
        await client.delete(key)
    await client.aclose()


@dataclass
class Served:
    server: GrpcServer
    channel: grpc.aio.Channel

    @property
    def address(self) -> str:
        return self.server.address


ServeFactory = Callable[..., Awaitable[Served]]


@pytest.fixture
async def serve() -> AsyncIterator[ServeFactory]:
    """`await serve([Service(...)], **GrpcServer kwargs)` starts a real server and opens a channel to it."""
    started: list[Served] = []

    async def start(services: Sequence[Service], **kwargs: Any) -> Served:
        server = GrpcServer(services, host="127.0.0.1", port=0, **kwargs)
        await server.start()
        served = Served(server, grpc.aio.insecure_channel(server.address))
        started.append(served)
        return served

    yield start
    for served in started:
        await served.channel.close()
        await served.server.stop(0)


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


# -- a cluster in this process: brokers and echo workers on one Redis, under this test's key prefix --------


@dataclass
class Started:
    address: str
    task: asyncio.Task[None]

    async def stop(self) -> None:
        if not self.task.done():
            self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


StartFactory = Callable[..., Awaitable[Started]]


async def _start(serve_fn: Callable[..., Coroutine[Any, Any, None]], settings: Any) -> Started:
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def on_ready(address: str) -> None:
        ready.set_result(address)

    task: asyncio.Task[None] = asyncio.create_task(serve_fn(settings, on_ready))
    waiting: list[asyncio.Future[Any]] = [task, ready]
    done, _ = await asyncio.wait(waiting, timeout=20, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()  # raises what made it stop
    return Started(await asyncio.wait_for(ready, 1), task)


@contextlib.asynccontextmanager
async def _starter(
    process: str, redis_url: str, keys: Keys, defaults: dict[str, Any]
) -> AsyncIterator[StartFactory]:
    """A factory that runs `process` ("broker.main", "llm_worker.main", ...) in this event loop on the test's
    Redis and key prefix, with `defaults` and per-call overrides; everything it started stops at the end."""
    module = importlib.import_module(process)
    settings_cls = typing.get_type_hints(module.serve)["settings"]
    started: list[Started] = []

    async def start(**overrides: Any) -> Started:
        options = {"redis_url": redis_url, "key_prefix": keys.prefix, "grace_s": 1.0} | defaults | overrides
        replica = await _start(module.serve, settings_cls(**options))
        started.append(replica)
        return replica

    try:
        yield start
    finally:
        for replica in reversed(started):
            await replica.stop()


@pytest.fixture
async def start_broker(redis_url: str, keys: Keys) -> AsyncIterator[StartFactory]:
    """`await start_broker(**BrokerSettings overrides)` runs a broker replica in this event loop."""
    async with _starter("broker.main", redis_url, keys, {"grpc_port": 0}) as start:
        yield start


@pytest.fixture
async def start_echo_worker(redis_url: str, keys: Keys) -> AsyncIterator[StartFactory]:
    """`await start_echo_worker(**TextWorkerSettings overrides)` runs an echo text worker in this loop."""
    async with _starter("llm_worker.main", redis_url, keys, {"model": "echo"}) as start:
        yield start


EdgeFactory = Callable[..., Awaitable["httpx.AsyncClient"]]


@pytest.fixture
async def edge_client(start_broker: StartFactory) -> AsyncIterator[EdgeFactory]:
    """`await edge_client(broker_address, **EdgeSettings overrides)`: an httpx client bound to the edge app
    in-process (lifespan run), talking gRPC to that broker."""
    import httpx

    from edge.app import create_app
    from edge.settings import EdgeSettings

    stack = contextlib.AsyncExitStack()

    async def make(broker_address: str, **overrides: Any) -> httpx.AsyncClient:
        app = create_app(EdgeSettings(broker_addr=broker_address, **overrides))
        await stack.enter_async_context(app.router.lifespan_context(app))
        transport = httpx.ASGITransport(app=app)
        return await stack.enter_async_context(httpx.AsyncClient(transport=transport, base_url="http://edge"))

    yield make
    await stack.aclose()


EdgeProcessFactory = Callable[..., Awaitable[str]]


@pytest.fixture
async def start_edge_process(tmp_path: Path) -> AsyncIterator[EdgeProcessFactory]:
    """`await start_edge_process(broker_address, ready="/healthz", **EdgeSettings options)`: a real
    `velesio edge` process, once `ready` answers 200; returns its base URL. Fails with its log if it
    exits or is not ready in time."""
    from launcher.spawn import AsyncSpawned, spawn_async, velesio_argv
    from mesh.ports import free_port
    from tests.helpers import CHILD_ENV, until_http_ok

    started: list[AsyncSpawned] = []

    async def start(broker_address: str, ready: str = "/healthz", **options: object) -> str:
        port = free_port()
        argv = velesio_argv("edge", http_port=port, broker_addr=broker_address, metrics_port=0, **options)
        edge = await spawn_async(f"edge-{port}", argv, tmp_path / f"edge-{port}.log", env=CHILD_ENV)
        started.append(edge)
        base = f"http://127.0.0.1:{port}"
        await until_http_ok(edge, base + ready)
        return base

    yield start
    for edge in started:
        await edge.stop()


@pytest.fixture
async def start_sd_worker(
    redis_url: str, keys: Keys, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[StartFactory]:
    """`await start_sd_worker(**ImageWorkerSettings overrides)`: a tiny-pipeline image worker in this loop."""
    defaults = {"torch_threads": 1, "cache_dir": tmp_path_factory.getbasetemp() / "sd-cache"}
    async with _starter("sd_worker.main", redis_url, keys, defaults) as start:
        yield start


@pytest.fixture
async def start_llm_worker(redis_url: str, keys: Keys) -> AsyncIterator[StartFactory]:
    """`await start_llm_worker(**TextWorkerSettings overrides)` runs a llama.cpp text worker on the packaged
    SmolLM2 model in this loop (2 threads, as the test machine has 2 cores)."""
    async with _starter("llm_worker.main", redis_url, keys, {"model": "smollm2", "threads": 2}) as start:
        yield start


@pytest.fixture
async def failing_edge(serve: ServeFactory) -> AsyncIterator[httpx.AsyncClient]:
    """The edge in front of a broker whose every call fails with the code the request's model (or job id)
    names."""
    import httpx

    from edge.app import create_app
    from edge.settings import EdgeSettings
    from tests.test_edge_status_codes import FailingBroker
    from velesio.v1 import inference_pb2_grpc

    servicer = FailingBroker()  # type: ignore[abstract]
    served = await serve(
        [
            Service(
                "velesio.v1.Inference",
                lambda s: inference_pb2_grpc.add_InferenceServicer_to_server(servicer, s),
            )
        ]
    )
    app = create_app(EdgeSettings(broker_addr=served.address))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://edge") as client,
    ):
        yield client
