"""`velesio up`: the whole stack on one machine, as one process tree.

Redis (embedded unless --redis-url), one broker and the workers run as child processes of this one,
each the same `velesio <command>` a distributed deployment runs. Ctrl-C or SIGTERM stops them all.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field

from mesh.embedded_redis import EmbeddedRedis
from mesh.logs import configure_logging
from mesh.server import join_host_port
from mesh.settings import CommonSettings

log = logging.getLogger(__name__)


class UpSettings(CommonSettings):
    """Options of `velesio up`."""

    redis_url: str = Field("", description="use this Redis instead of starting an embedded one")
    redis_port: int = Field(0, description="port of the embedded Redis (0: any free port)")
    data_dir: Path = Field(Path(".velesio"), description="folder for the embedded Redis's data and logs")
    grpc_port: int = Field(50051, description="port of the broker's public gRPC API")
    http_port: int = Field(8000, description="port of the REST edge (OpenAI, llama.cpp, native JSON)")
    edge: bool = Field(True, description="run the REST edge")
    api_tokens: str = Field("", description="'tenant:token,...' or 'token,...' (required off loopback)")
    llm: bool = Field(True, description="run a text worker")
    llm_model: str = Field(
        "default",
        description="text worker model: 'default' (the packaged SmolLM2), a GGUF path, or 'echo' (test)",
    )
    llm_slots: int = Field(4, description="jobs the text worker serves at once")
    sd: bool = Field(True, description="run an image worker")
    sd_model: str = Field(
        "tiny", description="image worker model: 'tiny' (random weights, test) or a diffusers folder"
    )


@dataclass
class Child:
    name: str
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None

    def start(self, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(self.argv, env=env, stdin=subprocess.DEVNULL)

    def stop(self, timeout: float = 15.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0fs; killing it", self.name, timeout)
            self.process.kill()
            self.process.wait()


def children(settings: UpSettings, redis_url: str) -> list[Child]:
    velesio = [sys.executable, "-m", "mesh.cli"]
    common = [
        "--redis-url",
        redis_url,
        "--key-prefix",
        settings.key_prefix,
        "--log-level",
        settings.log_level,
    ]
    common += ["--log-format", settings.log_format]
    found = [
        Child(
            "broker",
            [*velesio, "broker", *common, "--host", settings.host, "--grpc-port", str(settings.grpc_port)]
            + (["--api-tokens", settings.api_tokens] if settings.api_tokens else []),
        )
    ]
    if settings.edge:
        broker_addr = join_host_port(
            "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host, settings.grpc_port
        )
        edge = [*velesio, "edge", *common, "--host", settings.host, "--http-port", str(settings.http_port)]
        found.append(Child("edge", [*edge, "--broker-addr", broker_addr]))
    if settings.llm:
        worker = [
            *velesio,
            "llm-worker",
            *common,
            "--model",
            settings.llm_model,
            "--slots",
            str(settings.llm_slots),
        ]
        found.append(Child("llm-worker", worker))
    if settings.sd:
        found.append(Child("sd-worker", [*velesio, "sd-worker", *common, "--model", settings.sd_model]))
    return found


def main(settings: CommonSettings) -> int:
    assert isinstance(settings, UpSettings)
    configure_logging(settings.log_level, settings.log_format, "up")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    embedded: EmbeddedRedis | None = None
    redis_url = settings.redis_url
    if not redis_url:
        embedded = EmbeddedRedis(settings.data_dir / "redis", host="127.0.0.1", port=settings.redis_port)
        embedded.start()
        redis_url = embedded.url
        log.info("embedded Redis on %s, data in %s", redis_url, embedded.data_dir)
    running = children(settings, redis_url)
    env = dict(os.environ)
    failed = False
    try:
        for child in running:
            child.start(env)
        grpc_address = join_host_port(settings.host, settings.grpc_port)
        http = f"http://{join_host_port(settings.host, settings.http_port)}"
        print(
            f"Velesio is up.\n  gRPC API:  {grpc_address}  (velesio.v1.Inference)\n"
            + (f"  REST API:  {http}  (docs: {http}/docs)\n" if settings.edge else "")
            + f"  Redis:     {redis_url}\n  try:       grpcurl -plaintext {grpc_address} list\n"
            + (f"             curl {http}/v1/models\n" if settings.edge else "")
            + "Press Ctrl-C to stop.",
            flush=True,
        )
        while not stop.wait(0.5):
            dead = [c for c in running if c.process is not None and c.process.poll() is not None]
            if dead:
                for child in dead:
                    log.error(
                        "%s exited with code %s; stopping",
                        child.name,
                        child.process.returncode if child.process else "?",
                    )
                failed = True
                break
    finally:
        for child in reversed(running):
            child.stop()
        if embedded is not None:
            embedded.stop()
    return 1 if failed else 0
