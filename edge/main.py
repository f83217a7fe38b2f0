"""`velesio edge`: the REST bridge, served by uvicorn."""

from __future__ import annotations

import logging

import uvicorn

from edge.app import create_app
from edge.settings import EdgeSettings
from mesh.logs import configure_logging
from mesh.settings import CommonSettings

log = logging.getLogger(__name__)


def main(settings: CommonSettings) -> int:
    assert isinstance(settings, EdgeSettings)
    configure_logging(settings.log_level, settings.log_format, "edge")
    app = create_app(settings)
    log.info("edge on http://%s:%d -> broker %s", settings.host, settings.http_port, settings.broker_addr)
    uvicorn.run(
        app, host=settings.host, port=settings.http_port, log_config=None, timeout_graceful_shutdown=10
    )
    return 0
