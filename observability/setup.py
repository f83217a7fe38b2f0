"""Telemetry of one process, set up once from its settings in `main()`.

Traces go to the OTLP/gRPC collector named by `otlp_endpoint` (batched, with short timeouts so that a dead
collector costs requests nothing); with no endpoint, spans are not exported at all. Metrics are kept by
the OpenTelemetry SDK and read by Prometheus from `/metrics`: the edge serves it on its HTTP port, the
broker and workers on `metrics_port`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from opentelemetry import metrics, trace
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from prometheus_client import REGISTRY, start_http_server
from prometheus_client.exposition import generate_latest

from mesh.settings import CommonSettings
from mesh.version import VERSION
from observability.logs import configure_logging
from observability.metrics import VIEWS

log = logging.getLogger(__name__)

# A span batch waits at most this long for the collector; a dead one then drops it, nothing blocks.
EXPORT_TIMEOUT_S = 2.0
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class Telemetry:
    """What `setup_telemetry` started; `shutdown()` flushes spans and stops the metrics endpoint."""

    service: str
    tracer_provider: TracerProvider | None
    meter_provider: MeterProvider
    metrics_port: int = 0
    _servers: list[object] = field(default_factory=list)

    def shutdown(self) -> None:
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()
        self.meter_provider.shutdown()
        for server in self._servers:
            server.shutdown()  # type: ignore[attr-defined]


def exposition() -> bytes:
    """The process's metrics in Prometheus text format (what `/metrics` answers)."""
    return generate_latest(REGISTRY)


def span_exporter(endpoint: str) -> BatchSpanProcessor:
    # Imported here: the OTLP exporter pulls in its own gRPC plumbing, needed only when exporting.
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    exporter = OTLPSpanExporter(endpoint=endpoint, insecure=not endpoint.startswith("https://"),
                                timeout=EXPORT_TIMEOUT_S)  # fmt: skip
    return BatchSpanProcessor(
        exporter, schedule_delay_millis=1000, export_timeout_millis=EXPORT_TIMEOUT_S * 1000
    )


def setup_telemetry(settings: CommonSettings, service: str, *, serve_metrics: bool = True) -> Telemetry:
    """Logging, the global tracer and meter providers, and (when `serve_metrics` and the settings name a
    port) the `/metrics` endpoint of process `service` ("broker", "edge", "llm-worker", "sd-worker")."""
    configure_logging(settings.log_level, settings.log_format, service)
    resource = Resource.create(
        {"service.name": f"velesio-{service}", "service.namespace": "velesio", "service.version": VERSION}
    )
    tracer_provider = None
    if settings.otlp_endpoint:
        # Without an endpoint no provider is set: spans stay non-recording (nearly free), while a caller's
        # traceparent still passes through to the broker and workers.
        tracer_provider = TracerProvider(resource=resource)
        tracer_provider.add_span_processor(span_exporter(settings.otlp_endpoint))
        trace.set_tracer_provider(tracer_provider)
        log.info("exporting traces to %s", settings.otlp_endpoint)
    meter_provider = MeterProvider(resource=resource, metric_readers=[PrometheusMetricReader()], views=VIEWS)
    metrics.set_meter_provider(meter_provider)
    telemetry = Telemetry(service, tracer_provider, meter_provider)
    if serve_metrics and settings.metrics_port:
        try:
            server, _ = start_http_server(settings.metrics_port, addr=settings.host)
        except OSError as exc:
            # A second worker on one host with the default port still serves; it only goes unscraped.
            log.error(
                "no /metrics: cannot listen on port %d (%s); set --metrics-port", settings.metrics_port, exc
            )
        else:
            telemetry._servers.append(server)
            telemetry.metrics_port = settings.metrics_port
            log.info("metrics on http://%s:%d/metrics", settings.host, settings.metrics_port)
    return telemetry
