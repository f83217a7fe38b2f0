"""`velesio up`: the whole stack on one machine, as one process tree."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

from pydantic import Field

from mesh.embedded_redis import EmbeddedRedis
from mesh.logs import configure_logging
from mesh.settings import CommonSettings

log = logging.getLogger(__name__)


class UpSettings(CommonSettings):
    """Options of `velesio up`."""

    redis_url: str = Field("", description="use this Redis instead of starting an embedded one")
    redis_port: int = Field(0, description="port of the embedded Redis (0: any free port)")
    data_dir: Path = Field(Path(".velesio"), description="folder for the embedded Redis's data and logs")


def main(settings: CommonSettings) -> int:
    assert isinstance(settings, UpSettings)
    configure_logging(settings.log_level, settings.log_format, "up")
    embedded: EmbeddedRedis | None = None
    redis_url = settings.redis_url
    if not redis_url:
        embedded = EmbeddedRedis(settings.data_dir / "redis", host="127.0.0.1", port=settings.redis_port)
        embedded.start()
        redis_url = embedded.url
        log.info("embedded Redis on %s, data in %s", redis_url, embedded.data_dir)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"Velesio is up.\n  Redis: {redis_url}\nPress Ctrl-C to stop.", flush=True)
    try:
        stop.wait()
    finally:
        if embedded is not None:
            embedded.stop()
    return 0
