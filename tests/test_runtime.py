"""Settings, the CLI, the Redis key schema and the embedded Redis of the shared runtime."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import redis.asyncio

from launcher.cli import build_parser, settings_from_args
from launcher.embedded_redis import EmbeddedRedis
from launcher.settings import UpSettings
from mesh.keys import Keys
from mesh.settings import RedisSettings, is_loopback


def test_redis_dsn_parsed_once_into_fields() -> None:
    parsed = RedisSettings.from_dsn("rediss://user:p%40ss@redis.example:6380/3")
    assert parsed == RedisSettings("redis.example", 6380, 3, "user", "p@ss", True)
    assert parsed.url == "rediss://redis.example:6380/3"  # no credentials in what gets logged
    assert RedisSettings.from_dsn("redis://localhost") == RedisSettings("localhost", 6379, 0)
    with pytest.raises(ValueError, match=r"redis://"):
        RedisSettings.from_dsn("http://localhost:6379")


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("localhost", True),
        ("::1", True),
        ("[::1]", True),
        ("0.0.0.0", False),
        ("10.1.2.3", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_flags_override_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VELESIO_REDIS_PORT", "7001")
    monkeypatch.setenv("VELESIO_LOG_LEVEL", "DEBUG")
    args = build_parser().parse_args(["up", "--redis-port", "7002", "--data-dir", "/tmp/x"])
    settings = settings_from_args(UpSettings, args)
    assert isinstance(settings, UpSettings)
    assert settings.redis_port == 7002  # flag beats env
    assert settings.log_level == "DEBUG"  # env beats default
    assert settings.data_dir == Path("/tmp/x")


def test_help_names_every_flag_with_its_environment_variable() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "up", "--help"], capture_output=True, text=True, check=True
    )
    for name in UpSettings.model_fields:
        assert "--" + name.replace("_", "-") in result.stdout
        assert "VELESIO_" + name.upper() in result.stdout


def test_bad_flag_value_is_a_clear_usage_error() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "up", "--redis-port", "many"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "--redis-port" in result.stderr
    assert "Traceback" not in result.stderr


def test_keys_all_carry_the_prefix() -> None:
    keys = Keys("cluster-a")
    spelled = [
        keys.job("j"), keys.events("j"), keys.queue("text", "m"), keys.queues(), keys.leases(),
        keys.worker("w"), keys.workers(), keys.worker_busy("w"), keys.brokers(), keys.wake_channel(),
        keys.cancel_channel(), keys.affinity("s"), keys.tenant_rate("t", 1), keys.tenant_running("t"),
        keys.tenant_queued("t"), keys.sequence(), keys.deadlines(), keys.tenant_jobs("t"),
        keys.reader_wake("b"),
    ]  # fmt: skip
    assert all(key.startswith("cluster-a:") for key in spelled)
    assert len(set(spelled)) == len(spelled)


async def test_rig_redis_is_real_and_isolated(redis_client: redis.asyncio.Redis, keys: Keys) -> None:
    await redis_client.set(keys.job("a"), b"x")
    assert await redis_client.get(keys.job("a")) == b"x"
    assert not await redis_client.exists(Keys("someone-else").job("a"))


def test_embedded_redis_starts_persists_and_stops(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "data")
    server.start()
    try:
        import redis as sync_redis

        client = sync_redis.Redis.from_url(server.url)
        client.set("k", "v")
        client.close()
    finally:
        server.stop()
    assert server.process is not None
    assert server.process.returncode == 0
    assert any((tmp_path / "data").rglob("*.aof*"))
