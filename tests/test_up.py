"""`velesio up` as a user runs it: a process tree that serves, and leaves nothing behind on SIGTERM."""

from __future__ import annotations

import asyncio
import base64
import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mesh.embedded_redis import free_port
from tests.helpers import collect, complete, inference, text_of
from velesio.v1 import inference_pb2

pytestmark = pytest.mark.slow


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False).stdout
    return [int(p) for p in out.split()]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


async def _wait_serving(address: str, limit_s: float = 60) -> None:
    loop = asyncio.get_running_loop()
    give_up = loop.time() + limit_s
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if loop.time() > give_up:
                raise TimeoutError(f"nothing serving on {address}")
            await asyncio.sleep(0.2)


async def test_up_serves_and_stops_cleanly(tmp_path: Path) -> None:
    port, http_port = free_port(), free_port()
    address = f"127.0.0.1:{port}"
    log_path = tmp_path / "up.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mesh.cli", "up", "--grpc-port", str(port), "--http-port", str(http_port),
            "--llm-model", "echo", "--data-dir", str(tmp_path),
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        await _wait_serving(address)
        channel, stub = inference(address)
        async with channel:
            models = inference_pb2.ListModelsRequest()
            for _ in range(300):  # the workers register a moment after the broker serves
                if len((await stub.ListModels(models)).models) == 2:
                    break
                await asyncio.sleep(0.1)
            events = await collect(stub.Complete(complete("hello from up")))
            assert text_of(events) == "hello from up"
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}") as client:
            chat = {"model": "echo", "messages": [{"role": "user", "content": "hi over REST"}]}
            for _ in range(100):
                try:
                    reply = await client.post("/v1/chat/completions", json=chat)
                    break
                except httpx.TransportError:
                    await asyncio.sleep(0.1)
            assert reply.json()["choices"][0]["message"]["content"] == "hi over REST"
            image = {"model": "tiny", "prompt": "a red cube", "size": "64x64", "steps": 2}
            reply = await client.post("/v1/images/generations", json=image, timeout=60)
            png = base64.b64decode(reply.json()["data"][0]["b64_json"])
            assert png.startswith(b"\x89PNG")
        children = _children(proc.pid)
        assert len(children) >= 5  # redis-server, broker, edge, llm-worker, sd-worker
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert "Velesio is up." in log_path.read_text()
    assert not [pid for pid in children if _alive(pid)], "a child outlived `velesio up`"
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0, "the gRPC port is still open"
