"""The Grafana dashboards, written as data: `python -m observability.dashboards` writes them as JSON into
`observability/grafana/dashboards/`, where Grafana's provisioning reads them (a test keeps the committed
JSON equal to this source). Every query uses only metric names from `observability.metrics` or from the
exporters the monitoring compose file runs (redis_exporter, node_exporter, DCGM)."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "grafana" / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}


@dataclass(frozen=True)
class Panel:
    title: str
    targets: tuple[tuple[str, str], ...]  # (PromQL, legend)
    unit: str = "short"
    description: str = ""
    kind: str = "timeseries"


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    description: str
    panels: tuple[Panel, ...]
    tags: tuple[str, ...] = field(default=("velesio",))


def quantiles(
    metric: str, by: str = "", selector: str = "", window: str = "5m"
) -> tuple[tuple[str, str], ...]:
    group = f"le, {by}" if by else "le"
    legend = f"{{{{{by}}}}} " if by else ""
    return tuple(
        (
            f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{selector}[{window}])))",
            f"{legend}p{int(q * 100)}",
        )
        for q in (0.5, 0.95)
    )


HTTP = '{protocol="http"}'
GRPC = '{protocol="grpc"}'
SERVER_FAULT = 'code=~"5..|INTERNAL|UNKNOWN|UNAVAILABLE|DATA_LOSS|DEADLINE_EXCEEDED"'

OVERVIEW = Dashboard(
    "velesio-overview",
    "Velesio / Overview",
    "Traffic, errors, latency, time to first token, tokens/s, queues and slots of the whole cluster.",
    (
        Panel(
            "Requests/s by route",
            (("sum by (route) (rate(velesio_requests_total[1m]))", "{{route}}"),),
            "reqps",
        ),
        Panel(
            "Server errors (share of requests)",
            (
                (
                    f"(sum(rate(velesio_requests_total{{{SERVER_FAULT}}}[5m])) or vector(0))"
                    " / sum(rate(velesio_requests_total[5m]))",
                    "errors",
                ),
            ),
            "percentunit",
        ),
        Panel(
            "Responses by code",
            (("sum by (protocol, code) (rate(velesio_requests_total[5m]))", "{{protocol}} {{code}}"),),
            "reqps",
        ),
        Panel("HTTP latency", quantiles("velesio_request_duration_seconds", selector=HTTP), "s"),
        Panel("gRPC latency", quantiles("velesio_request_duration_seconds", selector=GRPC), "s"),
        Panel(
            "Time to first token",
            quantiles("velesio_time_to_first_token_seconds"),
            "s",
            "From accepting a text job to its first token, queue wait included.",
        ),
        Panel(
            "Tokens/s",
            (
                ("sum(rate(velesio_tokens_generated_total[1m]))", "generated"),
                ("sum(rate(velesio_prompt_tokens_total[1m]))", "prompt"),
            ),
            "short",
        ),
        Panel(
            "Queue depth", (("max by (kind, model) (velesio_queue_depth)", "{{kind}} {{model}}"),), "short"
        ),
        Panel("Queue wait", quantiles("velesio_queue_wait_seconds", by="kind"), "s"),
        Panel(
            "Worker slots",
            (
                ("sum by (kind) (velesio_worker_slots_busy)", "{{kind}} busy"),
                ("sum by (kind) (velesio_worker_slots_total)", "{{kind}} total"),
            ),
            "short",
        ),
        Panel(
            "Jobs finished by status",
            (("sum by (status) (rate(velesio_jobs_total[5m]))", "{{status}}"),),
            "ops",
        ),
        Panel("Workers registered", (("max by (kind) (velesio_workers_registered)", "{{kind}}"),), "short"),
        Panel(
            "Rate-limit rejections",
            (("sum by (reason) (rate(velesio_rate_limit_rejections_total[5m])) or vector(0)", "{{reason}}"),),
            "ops",
        ),
    ),
)

LLM = Dashboard(
    "velesio-llm",
    "Velesio / LLM",
    "Text generation per model: time to first token, token pace, throughput, slots.",
    (
        Panel(
            "Time to first token by model", quantiles("velesio_time_to_first_token_seconds", by="model"), "s"
        ),
        Panel("Inter-token latency", quantiles("velesio_inter_token_latency_seconds", by="model"), "s"),
        Panel("Prompt processing (worker)", quantiles("velesio_prompt_duration_seconds", by="model"), "s"),
        Panel(
            "Tokens generated/s by model",
            (("sum by (model) (rate(velesio_tokens_generated_total[1m]))", "{{model}}"),),
            "short",
        ),
        Panel(
            "Prompt tokens/s by model",
            (("sum by (model) (rate(velesio_prompt_tokens_total[1m]))", "{{model}}"),),
            "short",
        ),
        Panel(
            "Text slots",
            (
                ('sum by (model) (velesio_worker_slots_busy{kind="text"})', "{{model}} busy"),
                ('sum by (model) (velesio_worker_slots_total{kind="text"})', "{{model}} total"),
            ),
            "short",
        ),
        Panel(
            "Text jobs by status",
            (('sum by (status) (rate(velesio_jobs_total{kind="text"}[5m]))', "{{status}}"),),
            "ops",
        ),
        Panel("Text job duration", quantiles("velesio_job_duration_seconds", selector='{kind="text"}'), "s"),
    ),
)

IMAGES = Dashboard(
    "velesio-images",
    "Velesio / Images",
    "Image generation: images per minute, denoising step time, queue and slots.",
    (
        Panel(
            "Images/min by model",
            (("sum by (model) (rate(velesio_images_generated_total[5m])) * 60", "{{model}}"),),
            "short",
        ),
        Panel("Denoising step time", quantiles("velesio_image_step_duration_seconds", by="model"), "s"),
        Panel(
            "Image job duration", quantiles("velesio_job_duration_seconds", selector='{kind="image"}'), "s"
        ),
        Panel(
            "Image queue depth",
            (('max by (model) (velesio_queue_depth{kind="image"})', "{{model}}"),),
            "short",
        ),
        Panel("Image queue wait", quantiles("velesio_queue_wait_seconds", selector='{kind="image"}'), "s"),
        Panel(
            "Image slots",
            (
                ('sum by (model) (velesio_worker_slots_busy{kind="image"})', "{{model}} busy"),
                ('sum by (model) (velesio_worker_slots_total{kind="image"})', "{{model}} total"),
            ),
            "short",
        ),
    ),
)

INFRA = Dashboard(
    "velesio-infra",
    "Velesio / Redis and hosts",
    "Redis (redis_exporter), hosts (node_exporter), GPUs (DCGM exporter) and the Velesio processes.",
    (
        Panel(
            "Velesio process memory",
            (('process_resident_memory_bytes{job=~"velesio.*"}', "{{job}} {{instance}}"),),
            "bytes",
        ),
        Panel(
            "Velesio process CPU",
            (('rate(process_cpu_seconds_total{job=~"velesio.*"}[1m])', "{{job}} {{instance}}"),),
            "percentunit",
        ),
        Panel("Redis memory", (("redis_memory_used_bytes", "{{instance}}"),), "bytes"),
        Panel("Redis commands/s", (("rate(redis_commands_processed_total[1m])", "{{instance}}"),), "ops"),
        Panel("Redis clients", (("redis_connected_clients", "{{instance}}"),), "short"),
        Panel(
            "Host CPU busy",
            (('1 - avg by (instance) (rate(node_cpu_seconds_total{mode="idle"}[1m]))', "{{instance}}"),),
            "percentunit",
        ),
        Panel("Host memory available", (("node_memory_MemAvailable_bytes", "{{instance}}"),), "bytes"),
        Panel("GPU utilisation", (("DCGM_FI_DEV_GPU_UTIL", "{{Hostname}} GPU {{gpu}}"),), "percent"),
        Panel("GPU memory used", (("DCGM_FI_DEV_FB_USED", "{{Hostname}} GPU {{gpu}}"),), "decmbytes"),
    ),
)

DASHBOARDS = (OVERVIEW, LLM, IMAGES, INFRA)


def render(dashboard: Dashboard) -> dict[str, Any]:
    panels = []
    for index, panel in enumerate(dashboard.panels):
        panels.append(
            {
                "id": index + 1,
                "type": panel.kind,
                "title": panel.title,
                "description": panel.description,
                "datasource": DATASOURCE,
                "gridPos": {"h": 8, "w": 12, "x": 12 * (index % 2), "y": 8 * (index // 2)},
                "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
                "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
                "targets": [
                    {
                        "refId": chr(ord("A") + n),
                        "datasource": DATASOURCE,
                        "expr": expr,
                        "legendFormat": legend,
                    }
                    for n, (expr, legend) in enumerate(panel.targets)
                ],
            }
        )
    return {
        "uid": dashboard.uid,
        "title": dashboard.title,
        "description": dashboard.description,
        "tags": list(dashboard.tags),
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "panels": panels,
    }


def rendered() -> dict[str, str]:
    """File name -> JSON text of every dashboard."""
    return {f"{d.uid}.json": json.dumps(render(d), indent=2) + "\n" for d in DASHBOARDS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in rendered().items():
        (args.out / name).write_text(text)
        print(f"wrote {args.out / name}")


if __name__ == "__main__":
    main()
