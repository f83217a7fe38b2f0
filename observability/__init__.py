"""Telemetry for every Velesio process: traces (OpenTelemetry, OTLP export), metrics (Prometheus
`/metrics`), structured logs; plus the Grafana dashboards and Prometheus configuration in `grafana/` and
`prometheus/`."""
