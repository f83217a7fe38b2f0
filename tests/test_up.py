"""`velesio up` as a user runs it: a process tree that says when it is ready, serves chats and images over
REST and gRPC, restarts a child that dies, and leaves no process or port behind on SIGTERM."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import psutil
import pytest
import redis.asyncio

from launcher.embedded_redis import EmbeddedRedis
from launcher.plan import CannotStart, banner, check_exposure, check_ports, plan
from launcher.settings import UpSettings
from launcher.supervise import Backoff
from mesh.keys import Keys
from mesh.ports import free_port
from mesh.registry import Registry
from tests.helpers import bearer, collect, eventually, inference, text_of
from velesio.v1 import common_pb2, inference_pb2

READY = "Velesio is up"
TOKEN = "s3cret-up-token"
START_LIMIT_S = 240.0


def free_ports(count: int) -> int:
    """The first of `count` consecutive free ports."""
    for _ in range(200):
        first = free_port()
        if first + count > 65535:
            continue
        taken = []
        try:
            for port in range(first, first + count):
                sock = socket.socket()
                taken.append(sock)
                sock.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for sock in taken:
                sock.close()
    raise RuntimeError("no run of free ports")


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def role(process: psutil.Process) -> str:
    """The velesio subcommand a child runs (`.../velesio broker ...` or `python -m launcher.cli broker ...`),
    else its process name."""
    command = process.cmdline()
    for i, arg in enumerate(command[:-1]):
        if Path(arg).name == "velesio" or arg == "launcher.cli":
            return command[i + 1]
    return process.name()


@dataclass
class RunningUp:
    process: asyncio.subprocess.Process
    log: Path
    grpc_port: int
    http_port: int
    redis_port: int
    metrics_port: int

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    async def wait_for(self, pattern: str, after: int = 0, limit_s: float = START_LIMIT_S) -> int:
        """Waits until `pattern` (a regex) appears in the output after offset `after`; returns where it
        ends. Fails at once, with the output, when `velesio up` exits first."""
        give_up = time.monotonic() + limit_s
        while True:
            found = re.search(pattern, self.output()[after:])
            if found:
                return after + found.end()
            if self.process.returncode is not None:
                raise AssertionError(f"velesio up exited with {self.process.returncode}:\n{self.output()}")
            if time.monotonic() > give_up:
                raise AssertionError(f"no {pattern!r} in {limit_s}s:\n{self.output()[-6000:]}")
            await asyncio.sleep(0.2)

    def children(self) -> dict[str, psutil.Process]:
        return {role(p): p for p in psutil.Process(self.process.pid).children()}

    async def stop(self, limit_s: float = 60) -> int:
        self.process.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.process.wait(), limit_s)


@pytest.fixture
async def start_up(tmp_path: Path) -> AsyncIterator[object]:
    """`await start_up(*flags)` runs `velesio up` on free ports; whatever is left is killed afterwards."""
    started: list[RunningUp] = []

    async def start(*flags: str) -> RunningUp:
        ports = {"grpc": free_port(), "http": free_port(), "redis": free_port(), "metrics": free_ports(4)}
        log = tmp_path / f"up-{len(started)}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("VELESIO_")}
        env["VELESIO_TORCH_THREADS"] = "1"  # the image worker: 2 threads on a busy 2-core box crawl
        with log.open("wb") as out:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "launcher.cli", "up", "--data-dir", str(tmp_path / "data"),
                "--grpc-port", str(ports["grpc"]), "--http-port", str(ports["http"]),
                "--redis-port", str(ports["redis"]), "--metrics-port", str(ports["metrics"]), *flags,
                stdout=out, stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip
        up = RunningUp(process, log, ports["grpc"], ports["http"], ports["redis"], ports["metrics"])
        started.append(up)
        return up

    yield start
    for up in started:
        await kill_tree(up.process)


async def kill_tree(process: asyncio.subprocess.Process) -> None:
    """Kills what is left of a `velesio up` and its children (a test that failed midway)."""
    if process.returncode is None:
        root = psutil.Process(process.pid)
        for member in [root, *root.children(recursive=True)]:
            member.kill()
        await process.wait()


async def chat_over_grpc(
    address: str, model: str, metadata: Sequence[tuple[str, str]] = (), max_tokens: int = 8
) -> str:
    channel, stub = inference(address)
    async with channel:
        request = inference_pb2.ChatRequest(
            model=model,
            messages=[common_pb2.ChatMessage(role="user", content="Name a colour.")],
            sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0),
        )
        events = await collect(stub.Chat(request, metadata=metadata, timeout=60))
    assert events[-1].WhichOneof("event") == "done", events[-1]
    return text_of(events)


async def run_example(command: str) -> str:
    """Runs one printed example command in a shell, with TOKEN set as the banner asks."""
    env = {
        **os.environ,
        "TOKEN": TOKEN,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    proc = await asyncio.create_subprocess_shell(
        command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, f"{command}\n{err.decode()}"
    return out.decode()


@pytest.mark.slow
@pytest.mark.timeout(420)
async def test_up_serves_chat_and_images_over_rest_and_grpc_then_stops_cleanly(start_up: object) -> None:
    up: RunningUp = await start_up("--api-tokens", f"alice:{TOKEN}")  # type: ignore[operator]
    await up.wait_for(READY)
    # Ready means ready: no retry loops below.
    output = up.output()
    for said in (
        "starting Redis on redis://127.0.0.1:",
        "starting llm-worker (loading the packaged SmolLM2-135M-Instruct model)",
        "starting sd-worker (generating the tiny random-weight pipeline",
    ):
        assert said in output
    assert re.search(r"llm-worker ready \(\d+\.\ds\): registered as text-\w+-0, serves \S+", output)
    banner_text = output[output.index(READY) :]
    assert f"REST API   {up.http}" in banner_text and f"{up.http}/docs" in banner_text
    assert f"gRPC API   {up.grpc_address}" in banner_text
    metrics_urls = re.findall(r"(http://\S+/metrics)  \((\S+)\)", banner_text)
    assert [name for _, name in metrics_urls] == ["broker", "llm-worker", "sd-worker", "edge"]
    assert [url for url, _ in metrics_urls[:3]] == [
        f"http://127.0.0.1:{up.metrics_port + i}/metrics" for i in range(3)
    ]
    text_model = re.search(r"models .*?(\S+) \(text\)", banner_text)
    assert text_model is not None
    model = text_model.group(1)

    headers = {"authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(base_url=up.http, headers=headers, timeout=120) as client:
        chat = {"model": model, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8}
        reply = await client.post("/v1/chat/completions", json=chat)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"].strip()
        assert 0 < reply.json()["usage"]["completion_tokens"] <= 8
        image = {"prompt": "a red cube", "steps": 2, "width": 64, "height": 64, "seed": 1}
        reply = await client.post("/sdapi/v1/txt2img", json=image)
        assert reply.status_code == 200, reply.text
        assert base64.b64decode(reply.json()["images"][0]).startswith(b"\x89PNG")
        assert (
            await client.post("/v1/chat/completions", json=chat, headers={"authorization": ""})
        ).status_code == 401
        for url, name in metrics_urls:
            scraped = await client.get(url)
            assert scraped.status_code == 200 and "# TYPE" in scraped.text, (name, scraped.status_code)

    assert await chat_over_grpc(up.grpc_address, model, bearer(TOKEN))
    channel, stub = inference(up.grpc_address)
    async with channel:
        params = common_pb2.ImageParams(prompt="a red cube", steps=2, width=64, height=64, seed=1)
        events = await collect(stub.GenerateImage(inference_pb2.GenerateImageRequest(params=params),
                                                  metadata=bearer(TOKEN), timeout=120))  # fmt: skip
    pngs = [e.image.png for e in events if e.HasField("image")]
    assert len(pngs) == 1 and pngs[0].startswith(b"\x89PNG")

    examples = [
        line.strip() for line in banner_text.splitlines() if line.strip().startswith(("curl ", "grpcurl "))
    ]
    assert len(examples) == 2 and all('-H "authorization: Bearer $TOKEN"' in e for e in examples), examples
    if shutil.which("curl") and shutil.which("grpcurl", path=str(Path(sys.executable).parent)):
        assert '"content"' in await run_example(examples[0])
        assert '"token"' in await run_example(examples[1])

    children = up.children()
    assert sorted(children) == ["broker", "edge", "llm-worker", "redis-server", "sd-worker"]
    for process in children.values():
        assert TOKEN not in " ".join(process.cmdline()), f"the token shows in `ps` for {role(process)}"
    every = [p for child in children.values() for p in [child, *child.children(recursive=True)]]

    assert await up.stop() == 0
    assert not [p for p in every if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], (
        "a child outlived up"
    )
    ports = [up.grpc_port, up.http_port, up.redis_port, *(up.metrics_port + i for i in range(3))]
    assert not [port for port in ports if listening(port)], "a port is still open"


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_a_child_that_dies_is_reported_and_restarted(start_up: object) -> None:
    up: RunningUp = await start_up("--llm-model", "echo", "--no-sd")  # type: ignore[operator]
    seen = await up.wait_for(READY)
    assert await chat_over_grpc(up.grpc_address, "echo", max_tokens=64) == "Name a colour."

    for name in ("broker", "llm-worker", "redis-server"):
        victim = up.children()[name]
        victim.kill()
        label = "redis" if name == "redis-server" else name
        seen = await up.wait_for(
            rf"{label} exited with code -9 \(SIGKILL\) after [\d.]+s; restarting it", seen
        )
        seen = await up.wait_for(rf"{label} is back after its restart", seen, limit_s=60)
        assert up.children()[name].pid != victim.pid
        if name != "redis-server":
            assert await chat_over_grpc(up.grpc_address, "echo", max_tokens=64) == "Name a colour."
    # After the Redis restart the workers register again and the broker dispatches again (it reconnects).
    give_up = time.monotonic() + 30
    while True:
        try:
            assert await chat_over_grpc(up.grpc_address, "echo", max_tokens=64) == "Name a colour."
            break
        except (grpc.aio.AioRpcError, AssertionError) as exc:
            if time.monotonic() > give_up:
                raise AssertionError(f"no chat after the Redis restart: {exc}") from exc
            await asyncio.sleep(0.5)

    children = list(up.children().values())
    assert await up.stop() == 0
    assert not [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not listening(up.grpc_port) and not listening(up.http_port) and not listening(up.redis_port)


@pytest.mark.slow
async def test_up_on_an_existing_redis_with_two_text_workers(start_up: object, redis_url: str) -> None:
    keys = Keys(f"test-up-{uuid.uuid4().hex[:8]}")
    flags = (
        "--redis-url",
        redis_url,
        "--key-prefix",
        keys.prefix,
        "--llm-model",
        "echo",
        "--llm-workers",
        "2",
    )
    up: RunningUp = await start_up(*flags, "--no-sd", "--no-edge")  # type: ignore[operator]
    await up.wait_for(READY)
    output = up.output()
    assert f"connecting to Redis at {redis_url}" in output and "starting Redis" not in output
    assert "REST API" not in output and "velesio.v1.Inference/Chat" in output
    metrics_urls = re.findall(r"(http://\S+/metrics)  \((\S+)\)", output)
    assert metrics_urls == [
        (f"http://127.0.0.1:{up.metrics_port + i}/metrics", name)
        for i, name in enumerate(["broker", "llm-worker-0", "llm-worker-1"])
    ]
    async with httpx.AsyncClient(timeout=30) as client:
        for url, _ in metrics_urls:
            assert (await client.get(url)).status_code == 200
    store = redis.asyncio.Redis.from_url(redis_url)
    try:
        workers = await Registry(store, keys).live_workers()
        assert sorted(w.worker_id[-2:] for w in workers) == ["-0", "-1"]
        processes = psutil.Process(up.process.pid).children()
        assert sorted(role(p) for p in processes) == ["broker", "llm-worker", "llm-worker"]
        assert all("--threads" in p.cmdline() for p in processes if role(p) == "llm-worker")
        assert await chat_over_grpc(up.grpc_address, "echo", max_tokens=64) == "Name a colour."
        assert await up.stop() == 0
        assert await store.ping(), "an existing Redis is not ours to stop"
        assert await Registry(store, keys).live_workers() == []
    finally:
        async for key in store.scan_iter(match=f"{keys.prefix}:*"):
            await store.delete(key)
        await store.aclose()


@pytest.mark.slow
async def test_sigterm_during_start_up_stops_what_was_started(start_up: object) -> None:
    up: RunningUp = await start_up("--llm-model", "echo")  # type: ignore[operator]
    await up.wait_for(r"starting edge", limit_s=60)
    await eventually(lambda: asyncio.sleep(0, len(up.children()) == 5), limit_s=10)
    children = list(up.children().values())
    assert await up.stop() == 0
    assert READY not in up.output()
    assert not [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not listening(up.grpc_port) and not listening(up.redis_port)


@pytest.mark.slow
async def test_a_worker_that_cannot_start_ends_up_with_an_error(start_up: object, tmp_path: Path) -> None:
    missing = tmp_path / "missing.gguf"
    up: RunningUp = await start_up("--llm-model", str(missing), "--no-sd", "--no-edge")  # type: ignore[operator]
    assert await asyncio.wait_for(up.process.wait(), 90) == 1
    assert "llm-worker cannot start as configured (exit code 2)" in up.output()
    assert READY not in up.output()
    assert not listening(up.grpc_port) and not listening(up.redis_port)


async def test_a_port_in_use_is_named_before_anything_starts(start_up: object) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        up: RunningUp = await start_up("--llm-model", "echo", "--http-port", str(port))  # type: ignore[operator]
        assert await asyncio.wait_for(up.process.wait(), 30) == 1
    assert (
        f"port {port} (the REST edge) is in use on 127.0.0.1; choose another with --http-port" in up.output()
    )
    assert "starting" not in up.output()


def test_children_get_their_own_metrics_ports_flags_and_secrets_by_environment() -> None:
    settings = UpSettings(
        metrics_port=9600, llm_workers=2, api_tokens="alice:tok", otlp_endpoint="http://127.0.0.1:4317",
        log_content=True, redis_url="redis://:pw@127.0.0.1:6400/0",
    )  # fmt: skip
    the_plan = plan(settings, settings.redis_url, "t")
    by_name = {p.name: p for p in the_plan.processes}
    assert list(by_name) == ["broker", "llm-worker-0", "llm-worker-1", "sd-worker", "edge"]
    for name, port in [("broker", 9600), ("llm-worker-0", 9601), ("llm-worker-1", 9602), ("sd-worker", 9603)]:
        argv = by_name[name].argv
        assert argv[argv.index("--metrics-port") + 1] == str(port)
        assert by_name[name].metrics_url.endswith(f":{port}/metrics")
    assert "--metrics-port" not in by_name["edge"].argv  # the edge serves /metrics on its HTTP port
    assert {by_name["llm-worker-0"].worker_id, by_name["llm-worker-1"].worker_id} == {"text-t-0", "text-t-1"}
    for proc in the_plan.processes:
        joined = " ".join(proc.argv)
        assert "--otlp-endpoint http://127.0.0.1:4317" in joined and "--log-content" in joined
        assert "tok" not in joined and "pw" not in joined, "secrets never go on a command line"
        assert proc.env["VELESIO_REDIS_URL"] == "redis://:pw@127.0.0.1:6400/0"
        assert ("VELESIO_API_TOKENS" in proc.env) == (proc.name == "broker")

    off = plan(UpSettings(metrics_port=0, sd=False), "redis://127.0.0.1:1/0", "t")
    for proc in off.processes[:-1]:
        assert proc.argv[proc.argv.index("--metrics-port") + 1] == "0" and not proc.metrics_url


def test_ports_that_collide_are_refused() -> None:
    settings = UpSettings(metrics_port=9600, grpc_port=9601)
    with pytest.raises(
        CannotStart, match=r"port 9601 is wanted twice: by the broker's gRPC API and the llm-worker's"
    ):
        check_ports(settings, plan(settings, "redis://127.0.0.1:1/0", "t"))


def test_listening_beyond_loopback_without_tokens_is_refused_before_anything_starts() -> None:
    with pytest.raises(CannotStart, match=r"refusing to listen on 0\.0\.0\.0 without API tokens"):
        check_exposure(UpSettings(host="0.0.0.0"))
    with pytest.raises(CannotStart, match="--api-tokens"):
        check_exposure(UpSettings(host="0.0.0.0", api_tokens="alice:"))
    check_exposure(UpSettings(host="0.0.0.0", api_tokens="alice:tok"))
    check_exposure(UpSettings(host="127.0.0.1"))


def test_examples_carry_the_token_header_only_when_tokens_are_set() -> None:
    for tokens, header in (("", False), ("tok", True)):
        settings = UpSettings(api_tokens=tokens)
        the_plan = plan(settings, "redis://127.0.0.1:1/0", "t")
        text = banner(settings, the_plan, {"text": "m", "image": "tiny"}, "redis://127.0.0.1:1/0", 1.0)
        commands = [line for line in text.splitlines() if line.strip().startswith(("curl", "grpcurl"))]
        assert [c.split()[0] for c in commands] == ["curl", "grpcurl"]
        assert "/v1/chat/completions" in commands[0] and "velesio.v1.Inference/Chat" in commands[1]
        assert all(("authorization: Bearer $TOKEN" in c) == header for c in commands)


def test_backoff_doubles_up_to_its_cap_and_starts_over_after_a_healthy_run() -> None:
    backoff = Backoff(first_s=1, max_s=30, healthy_s=60)
    assert [backoff.after_exit(0.5) for _ in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    assert backoff.after_exit(61) == 1
    assert backoff.after_exit(1) == 2


def test_paths_handed_to_children_are_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """redis-server enters its --dir before it opens its --logfile: relative paths broke `make up`."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tokens.txt").write_text("alice:tok\n")
    (tmp_path / "model.gguf").write_bytes(b"")
    (tmp_path / "tiny").mkdir()  # a folder named like a preset: the preset name stays a name
    (tmp_path / "models" / "sd").mkdir(parents=True)
    settings = UpSettings(api_tokens_file=Path("tokens.txt"), llm_model="model.gguf", sd_model="models/sd")
    assert settings.data_dir == tmp_path / ".velesio"
    by_name = {p.name: p.argv for p in plan(settings, "redis://127.0.0.1:1/0", "t").processes}
    broker, text, image = by_name["broker"], by_name["llm-worker"], by_name["sd-worker"]
    assert broker[broker.index("--api-tokens-file") + 1] == str(tmp_path / "tokens.txt")
    assert text[text.index("--model") + 1] == str(tmp_path / "model.gguf")
    assert image[image.index("--model") + 1] == str(tmp_path / "models" / "sd")
    assert UpSettings().sd_model == "tiny" and UpSettings().llm_model == "default"

    command = EmbeddedRedis(Path(".velesio/redis")).command()
    for flag in ("--dir", "--logfile"):
        assert Path(command[command.index(flag) + 1]).is_absolute(), flag
    assert command[command.index("--logfile") + 1] == str(tmp_path / ".velesio" / "redis" / "redis.log")
