"""Typed settings shared by every Velesio process.

Each process has one `pydantic_settings.BaseSettings` subclass of `CommonSettings`, built once in its
`main()` from flags and `VELESIO_*` environment variables and passed into constructors.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

import redis.asyncio
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

LogFormat = Literal["text", "json"]


@dataclass(frozen=True)
class RedisSettings:
    """A Redis connection string parsed once into typed fields."""

    host: str = "127.0.0.1"
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = None
    ssl: bool = False

    @classmethod
    def from_dsn(cls, dsn: str) -> RedisSettings:
        parts = urlsplit(dsn)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError(f"redis URL must start with redis:// or rediss://, got {dsn!r}")
        path = parts.path.lstrip("/")
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 6379,
            db=int(path) if path else 0,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            ssl=parts.scheme == "rediss",
        )

    def connect(self, max_connections: int = 1000) -> redis.asyncio.Redis:
        """A client whose pool waits for a free connection instead of failing when all are in use (under a
        burst, many calls wait on Redis at once)."""
        pool = redis.asyncio.BlockingConnectionPool(
            max_connections=max_connections,
            timeout=30,
            connection_class=redis.asyncio.SSLConnection if self.ssl else redis.asyncio.Connection,
            host=self.host,
            port=self.port,
            db=self.db,
            username=self.username,
            password=self.password,
            health_check_interval=30,
            socket_keepalive=True,
        )
        return redis.asyncio.Redis.from_pool(pool)  # the client owns the pool: aclose() closes it

    @property
    def url(self) -> str:
        """The URL without credentials, safe to log."""
        return f"{'rediss' if self.ssl else 'redis'}://{self.host}:{self.port}/{self.db}"


def absolute(path: Path) -> Path:
    """`path` from the current directory (and `~`), so that it means the same to a child process that starts
    elsewhere or changes directory (redis-server enters its --dir before it opens its --logfile)."""
    return path.expanduser().absolute()


def absolute_if_path(value: str) -> str:
    """A model option is a preset name ("default", "tiny") or a file or folder: an existing path becomes
    absolute. A bare name stays a name even where a folder of that name exists."""
    path = Path(value).expanduser()
    named_as_path = value.startswith("~") or path.name != value or bool(path.suffix)
    return str(path.absolute()) if named_as_path and path.exists() else value


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class CommonSettings(BaseSettings):
    """Options every Velesio process takes."""

    model_config = SettingsConfigDict(env_prefix="VELESIO_", extra="ignore", frozen=True)

    host: str = Field("127.0.0.1", description="address to listen on")
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis shared by brokers and workers")
    key_prefix: str = Field(
        "velesio", description="prefix of every Redis key, to share one Redis between clusters"
    )
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING or ERROR")
    log_format: LogFormat = Field("text", description="text, or json for one JSON object per line")
    log_content: bool = Field(
        False, description="log prompts and generated text (off: only sizes are logged)"
    )
    otlp_endpoint: str = Field(
        "", description="OTLP/gRPC collector for traces, e.g. http://127.0.0.1:4317 (empty: no export)"
    )
    metrics_port: int = Field(
        0, ge=0, le=65535, description="port of this process's Prometheus /metrics endpoint (0: none)"
    )

    @property
    def redis(self) -> RedisSettings:
        return RedisSettings.from_dsn(self.redis_url)
