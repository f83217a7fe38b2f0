"""Every Velesio metric: its name, unit, labels and buckets, in one place.

Instruments are created on the global OpenTelemetry meter, so they record nothing until a process sets up
its meter provider (`observability.setup.setup_telemetry`). The Prometheus exposition adds `_total` to
counters and `_seconds` to instruments whose unit is "s"; `EXPOSED` lists the names as Prometheus shows
them, which is what dashboards and alert rules may use.

Labels: `kind` (text, image), `model`, `status` (succeeded, failed, cancelled), `route` (an HTTP route
template or a gRPC method), `code` (HTTP status or gRPC code name), `protocol` (http, grpc), `reason`.
Tenants and tokens are never labels.
"""

from __future__ import annotations

from opentelemetry import metrics
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View

_meter = metrics.get_meter("velesio")

# Bucket boundaries (seconds) fitted to what each histogram measures.
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
QUEUE_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30)
INTER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1)
IMAGE_STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10)
JOB_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)

# -- every process ---------------------------------------------------------------------------------------
requests = _meter.create_counter(
    "velesio_requests", unit="1", description="requests served, by protocol, route and code"
)
request_duration = _meter.create_histogram(
    "velesio_request_duration", unit="s", description="time to serve a request (a stream: until it ends)"
)

# -- broker ----------------------------------------------------------------------------------------------
jobs_submitted = _meter.create_counter("velesio_jobs_submitted", unit="1", description="jobs accepted")
jobs_finished = _meter.create_counter(
    "velesio_jobs", unit="1", description="jobs that reached a final status, by kind, model and status"
)
job_duration = _meter.create_histogram(
    "velesio_job_duration", unit="s", description="time from accepting a job to its final status"
)
queue_depth = _meter.create_gauge("velesio_queue_depth", unit="1", description="jobs waiting per queue")
queue_wait = _meter.create_histogram(
    "velesio_queue_wait", unit="s", description="time a job waited in the queue before a worker took it"
)
time_to_first_token = _meter.create_histogram(
    "velesio_time_to_first_token",
    unit="s",
    description="time from accepting a text job to its first token (queue wait included)",
)
rate_limited = _meter.create_counter(
    "velesio_rate_limit_rejections", unit="1", description="requests refused by a tenant limit, by reason"
)
workers_registered = _meter.create_gauge(
    "velesio_workers_registered", unit="1", description="workers in the registry, by kind"
)

# -- workers ---------------------------------------------------------------------------------------------
slots_busy = _meter.create_gauge("velesio_worker_slots_busy", unit="1", description="slots running a job")
slots_total = _meter.create_gauge("velesio_worker_slots_total", unit="1", description="slots of a worker")
inter_token_latency = _meter.create_histogram(
    "velesio_inter_token_latency", unit="s", description="time between two tokens of one stream"
)
prompt_tokens = _meter.create_counter("velesio_prompt_tokens", unit="1", description="prompt tokens read")
tokens_generated = _meter.create_counter("velesio_tokens_generated", unit="1", description="tokens generated")
prompt_duration = _meter.create_histogram(
    "velesio_prompt_duration", unit="s", description="worker time from a job's start to its first token"
)
images_generated = _meter.create_counter("velesio_images_generated", unit="1", description="images generated")
image_step_duration = _meter.create_histogram(
    "velesio_image_step_duration", unit="s", description="time of one denoising step"
)

_HISTOGRAM_BUCKETS = {
    "velesio_request_duration": REQUEST_BUCKETS,
    "velesio_job_duration": JOB_BUCKETS,
    "velesio_queue_wait": QUEUE_WAIT_BUCKETS,
    "velesio_time_to_first_token": TTFT_BUCKETS,
    "velesio_inter_token_latency": INTER_TOKEN_BUCKETS,
    "velesio_prompt_duration": TTFT_BUCKETS,
    "velesio_image_step_duration": IMAGE_STEP_BUCKETS,
}
VIEWS = [
    View(instrument_name=name, aggregation=ExplicitBucketHistogramAggregation(buckets))
    for name, buckets in _HISTOGRAM_BUCKETS.items()
]
_COUNTERS = [
    "velesio_requests",
    "velesio_jobs_submitted",
    "velesio_jobs",
    "velesio_rate_limit_rejections",
    "velesio_prompt_tokens",
    "velesio_tokens_generated",
    "velesio_images_generated",
]
_GAUGES = [
    "velesio_queue_depth",
    "velesio_workers_registered",
    "velesio_worker_slots_busy",
    "velesio_worker_slots_total",
]

# Every series name Prometheus shows for Velesio's own metrics.
EXPOSED: frozenset[str] = frozenset(
    [f"{name}_total" for name in _COUNTERS]
    + _GAUGES
    + [f"{name}_seconds{suffix}" for name in _HISTOGRAM_BUCKETS for suffix in ("_bucket", "_sum", "_count")]
)
