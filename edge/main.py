"""`velesio edge`: the REST bridge, served by uvicorn."""

from __future__ import annotations

import logging

import uvicorn

from edge.app import create_app
from edge.settings import EdgeSettings
from mesh.settings import CommonSettings
from observability.setup import setup_telemetry

log = logging.getLogger(__name__)


def main(settings: CommonSettings) -> int:
    assert isinstance(settings, EdgeSettings)
    telemetry = setup_telemetry(settings, "edge", serve_metrics=False)  # /metrics is on the HTTP port
    app = create_app(settings)
    log.info("edge on http://%s:%d -> broker %s", settings.host, settings.http_port, settings.broker_addr)
    try:
        uvicorn.run(
            app, host=settings.host, port=settings.http_port, log_config=None, timeout_graceful_shutdown=10
        )
    finally:
        telemetry.shutdown()
    return 0
