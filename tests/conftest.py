"""The test rig: one real redis-server per test run, per-test key prefixes, and real gRPC servers on
127.0.0.1:0 built by the same bootstrap the services use."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio

from mesh.embedded_redis import EmbeddedRedis
from mesh.keys import Keys
from mesh.server import GrpcServer, Service


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
