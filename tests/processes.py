"""A cluster of real `velesio` processes (broker, echo text worker, tiny image worker, edge) on the test
Redis, for synchronous tests that drive it from outside over real sockets: the fuzzers, and the security
checks that also read what the processes log."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from launcher.spawn import Spawned, spawn, velesio_argv
from mesh.keys import Keys
from mesh.ports import free_port
from tests.helpers import CHILD_ENV

START_LIMIT_S = 60.0
# The image worker accepts only cheap images, so whatever a fuzzer asks for is quick to make (or refused).
CHEAP_IMAGES = {"max_size": 128, "max_steps": 2, "max_batch": 2, "torch_threads": 1}


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log: Path
    address: str
    metrics_port: int

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class ProcessCluster:
    """`velesio` child processes under one key prefix of the test Redis; `close()` stops them all."""

    redis_url: str
    logs: Path
    log_level: str = "INFO"
    keys: Keys = field(default_factory=lambda: Keys(prefix=f"proc-{uuid.uuid4().hex[:12]}"))
    children: list[Child] = field(default_factory=list)
    _spawned: list[Spawned] = field(default_factory=list)

    def spawn(self, name: str, command: str, address: str, **flags: object) -> Child:
        metrics_port = free_port()
        options = {
            "redis_url": self.redis_url,
            "key_prefix": self.keys.prefix,
            "log_level": self.log_level,
            "metrics_port": metrics_port,
            **flags,
        }
        spawned = spawn(name, velesio_argv(command, **options), self.logs / f"{name}.log", env=CHILD_ENV)
        self._spawned.append(spawned)
        child = Child(name, spawned.process, spawned.log, address, metrics_port)
        self.children.append(child)
        return child

    def broker(self, name: str = "broker", **flags: object) -> Child:
        port = free_port()
        return self.spawn(name, "broker", f"127.0.0.1:{port}", grpc_port=port, grace_s=1, **flags)

    def text_worker(self, name: str = "text", **flags: object) -> Child:
        port = free_port()
        options: dict[str, object] = {"model": "echo", "echo_delay_ms": 0, "worker_id": name, **flags}
        return self.spawn(name, "llm-worker", f"127.0.0.1:{port}", port=port, grace_s=1, **options)

    def image_worker(self, cache_dir: Path, name: str = "image", **flags: object) -> Child:
        port = free_port()
        options = {"cache_dir": cache_dir, "worker_id": name, **CHEAP_IMAGES, **flags}
        return self.spawn(name, "sd-worker", f"127.0.0.1:{port}", port=port, grace_s=1, **options)

    def edge(self, broker: Child, name: str = "edge", **flags: object) -> Child:
        port = free_port()
        options: dict[str, object] = {"broker_addr": broker.address, "http_port": port, **flags}
        return self.spawn(name, "edge", f"http://127.0.0.1:{port}", **options)

    def wait(self, child: Child, ready: Callable[[], bool], limit_s: float = START_LIMIT_S) -> None:
        give_up = time.monotonic() + limit_s
        while not ready():
            if child.process.poll() is not None:
                raise AssertionError(f"{child.name} exited ({child.process.returncode}):\n{child.log_text()}")
            if time.monotonic() > give_up:
                raise AssertionError(f"{child.name} not ready in {limit_s}s:\n{child.log_text()[-3000:]}")
            time.sleep(0.05)

    def wait_serving(self, child: Child) -> None:
        self.wait(child, lambda: grpc_serving(child.address))

    def wait_registered(self, child: Child) -> None:
        with redis.Redis.from_url(self.redis_url) as client:
            self.wait(child, lambda: bool(client.exists(self.keys.worker(child.name))))

    def wait_http(self, child: Child) -> None:
        self.wait(child, lambda: http_ok(f"{child.address}/healthz"))

    def close(self) -> None:
        """SIGTERM (so logs show the shutdown too), then SIGKILL what is still running."""
        for child in self.children:
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        for spawned in self._spawned:
            spawned.stop(10)


def grpc_serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=0.5)
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=0.5).status_code == 200
    except httpx.HTTPError:
        return False


@dataclass(frozen=True)
class Cluster:
    processes: ProcessCluster
    broker: Child
    edge: Child | None

    @property
    def keys(self) -> Keys:
        return self.processes.keys

    @property
    def edge_url(self) -> str:
        assert self.edge is not None
        return self.edge.address


@contextlib.contextmanager
def running_cluster(
    redis_url: str,
    logs: Path,
    *,
    tokens: str,
    log_level: str = "INFO",
    broker: dict[str, Any] | None = None,
    edge: dict[str, Any] | None = None,
    with_edge: bool = True,
    with_image_worker: bool = True,
) -> Iterator[Cluster]:
    """Broker, echo text worker, tiny image worker and edge (each of the last two unless told not to), all
    started at once and ready (workers registered, the edge answering) when this yields."""
    processes = ProcessCluster(redis_url, logs, log_level)
    try:
        the_broker = processes.broker(api_tokens=tokens, **(broker or {}))
        workers = [processes.text_worker()]
        if with_image_worker:
            workers.append(processes.image_worker(logs / "sd-cache"))
        the_edge = processes.edge(the_broker, **(edge or {})) if with_edge else None
        processes.wait_serving(the_broker)
        for worker in workers:
            processes.wait_registered(worker)
        if the_edge is not None:
            processes.wait_http(the_edge)
        yield Cluster(processes, the_broker, the_edge)
    finally:
        processes.close()
        with redis.Redis.from_url(redis_url) as client:
            for key in client.scan_iter(match=f"{processes.keys.prefix}:*"):
                client.delete(key)
