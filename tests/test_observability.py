"""Telemetry end to end: one trace per request across edge, broker (and the Redis queue) and worker; spans
exported over OTLP/gRPC to a real receiver; a dead collector costs requests nothing; every metric that the
dashboards and alert rules query exists on a live `/metrics` with the labels they use."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import yaml
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from mesh.ports import free_port
from observability import dashboards
from observability.metrics import EXPOSED
from tests.conftest import StartFactory
from tests.processes import ProcessCluster, http_ok

REPO = Path(__file__).resolve().parent.parent
CHAT = {"model": "echo", "messages": [{"role": "user", "content": "trace me"}], "max_tokens": 4}


# -- one trace, in memory ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def spans() -> InMemorySpanExporter:
    """The process-wide tracer provider, recording into memory (set once: OpenTelemetry allows no reset)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    assert trace.get_tracer_provider() is provider, "another test set a tracer provider first"
    return exporter


async def _trace_of(exporter: InMemorySpanExporter, trace_id: int, names: set[str]) -> list[ReadableSpan]:
    """The finished spans of one trace, once all of `names` are among them (the worker's end last)."""
    import asyncio

    for _ in range(200):
        found = [s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id]
        if names <= {s.name for s in found}:
            return found
        await asyncio.sleep(0.02)
    raise AssertionError(f"missing spans {names - {s.name for s in found}}; have {[s.name for s in found]}")


async def test_one_rest_request_is_one_trace_across_edge_queue_and_worker(
    spans: InMemorySpanExporter,
    start_broker: StartFactory,
    start_echo_worker: StartFactory,
    edge_client: Any,
) -> None:
    broker = await start_broker()
    await start_echo_worker(echo_delay_ms=0)
    client = await edge_client(broker.address)
    caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    reply = await client.post(
        "/v1/chat/completions", json=CHAT, headers={"traceparent": f"00-{caller_trace}-00f067aa0ba902b7-01"}
    )
    assert reply.status_code == 200, reply.text

    expected = {
        "POST /v1/chat/completions",
        "velesio.v1.Inference/Chat",
        "validate",
        "enqueue",
        "queue wait",
        "dispatch",
        "velesio.v1.TextWorker/Generate",
        "prompt processing",
        "generation",
    }
    found = await _trace_of(spans, int(caller_trace, 16), expected)
    by_name = {s.name: s for s in found}

    def parent(name: str) -> str:
        """The nearest span above made by Velesio or by FastAPI's request tracing (skipping any others)."""
        span = by_name[name]
        while True:
            assert span.parent is not None, f"{name} has no Velesio parent"
            span = next(s for s in found if s.context.span_id == span.parent.span_id)
            scope = span.instrumentation_scope
            if scope is not None and scope.name.startswith(("velesio.", "fastapi")):
                return span.name

    edge = by_name["POST /v1/chat/completions"]
    assert edge.parent is not None and edge.parent.span_id == 0x00F067AA0BA902B7  # the caller's span
    assert parent("velesio.v1.Inference/Chat") == "POST /v1/chat/completions"
    for child in ("validate", "enqueue", "queue wait", "dispatch"):
        assert parent(child) == "velesio.v1.Inference/Chat"
    assert parent("velesio.v1.TextWorker/Generate") == "dispatch"
    assert parent("prompt processing") == parent("generation") == "velesio.v1.TextWorker/Generate"
    scopes = {s.name: s.instrumentation_scope.name for s in found if s.instrumentation_scope}
    assert scopes["POST /v1/chat/completions"] == "fastapi"  # the edge's request span is FastAPI's own
    assert scopes["queue wait"] == scopes["dispatch"] == "velesio.broker"
    assert scopes["generation"] == "velesio.llm_worker"
    # The queue wait covers the time from acceptance until the dispatcher claimed the job, in order.
    wait, dispatch = by_name["queue wait"], by_name["dispatch"]
    assert wait.start_time and wait.end_time and dispatch.start_time
    assert wait.start_time <= wait.end_time <= dispatch.start_time
    assert wait.attributes is not None and wait.attributes["velesio.model"] == "echo"
    assert "velesio.tenant" in wait.attributes and "velesio.job_id" in wait.attributes
    worker = by_name["velesio.v1.TextWorker/Generate"]
    assert worker.attributes is not None and worker.attributes["velesio.completion_tokens"] == 4
    assert all(s.status.is_ok or s.status.status_code.name == "UNSET" for s in found)


async def test_client_mistakes_leave_spans_unmarked_and_health_is_not_traced(
    spans: InMemorySpanExporter, start_broker: StartFactory, serve: Any
) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    import velesio.v1.inference_pb2 as pb
    import velesio.v1.inference_pb2_grpc as pb_grpc

    broker = await start_broker()
    async with grpc.aio.insecure_channel(broker.address) as channel:
        spans.clear()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await pb_grpc.InferenceStub(channel).GetJob(pb.GetJobRequest(job_id="nope"))
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    finished = spans.get_finished_spans()
    assert [s.name for s in finished] == ["velesio.v1.Inference/GetJob"]
    assert finished[0].status.status_code.name == "UNSET"  # NOT_FOUND is the caller's mistake


# -- OTLP export from real processes ------------------------------------------------------------------------


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace collector: keeps what it is sent."""

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.lock = threading.Lock()

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        with self.lock:
            self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> list[tuple[str, Any]]:
        """(service.name, span) of everything received."""
        found = []
        with self.lock:
            for request in self.requests:
                for resource_spans in request.resource_spans:
                    attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                    for scope_spans in resource_spans.scope_spans:
                        found += [(attributes["service.name"], s) for s in scope_spans.spans]
        return found


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, int]]:
    servicer = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, port
    server.stop(0)


@pytest.fixture
def cluster(redis_url: str, tmp_path: Path) -> Iterator[ProcessCluster]:
    processes = ProcessCluster(redis_url, tmp_path)
    yield processes
    processes.close()


def _stack(cluster: ProcessCluster, otlp_endpoint: str) -> str:
    """Broker, echo worker and edge as processes exporting to `otlp_endpoint`; the edge's URL."""
    flags = {"otlp_endpoint": otlp_endpoint} if otlp_endpoint else {}
    broker = cluster.broker(**flags)
    worker = cluster.text_worker(**flags)
    edge = cluster.edge(broker, **flags)
    cluster.wait_serving(broker)
    cluster.wait_registered(worker)
    cluster.wait(edge, lambda: http_ok(f"{edge.address}/readyz"))
    return edge.address


def test_spans_of_every_process_reach_an_otlp_collector(
    cluster: ProcessCluster, receiver: tuple[Receiver, int]
) -> None:
    collector, port = receiver
    edge = _stack(cluster, f"http://127.0.0.1:{port}")
    reply = httpx.post(f"{edge}/v1/chat/completions", json=CHAT, timeout=30)
    assert reply.status_code == 200, reply.text
    give_up = time.monotonic() + 20
    while time.monotonic() < give_up:
        received = collector.spans()
        roots = [s for service, s in received if service == "velesio-edge" and s.name.startswith("POST")]
        if roots:
            same = {service for service, s in received if s.trace_id == roots[0].trace_id}
            if same == {"velesio-edge", "velesio-broker", "velesio-llm-worker"}:
                return
        time.sleep(0.2)
    raise AssertionError(f"spans received: {[(service, s.name) for service, s in collector.spans()]}")


def test_a_dead_collector_does_not_slow_requests(cluster: ProcessCluster) -> None:
    """The collector accepts connections and never answers: exporting waits on it, requests must not. A
    request that waited for the export would take at least the export timeout (2 s)."""
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(64)
    try:
        edge = _stack(cluster, f"http://127.0.0.1:{hole.getsockname()[1]}")
        with httpx.Client(base_url=edge, timeout=30) as client:
            for _ in range(8):
                started = time.monotonic()
                assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
                assert time.monotonic() - started < 1.5
    finally:
        hole.close()


# -- metrics: what dashboards and alerts query exists --------------------------------------------------------

# Series of the exporters the monitoring stack runs beside Velesio, and Prometheus's own `up`.
EXTERNAL = re.compile(r"^(redis_|node_|DCGM_|up$)")
PROMQL_WORDS = {
    "sum", "max", "min", "avg", "by", "rate", "histogram_quantile", "vector", "or", "and", "unless", "le",
    "without", "count", "irate", "increase", "on", "ignoring",
}  # fmt: skip


def queries() -> list[str]:
    found = [expr for d in dashboards.DASHBOARDS for p in d.panels for expr, _ in p.targets]
    rules = yaml.safe_load((REPO / "observability/prometheus/alerts.yml").read_text())
    found += [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    return found


def names_and_labels(expr: str) -> tuple[set[str], set[str]]:
    """Metric names an expression reads, and label names it selects or groups by."""
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    labels = set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!=|!~|=)", without_strings))
    for group in re.findall(r"\bby\s*\(([^)]*)\)", without_strings):
        labels |= {label.strip() for label in group.split(",") if label.strip()}
    scrubbed = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\bby\s*\([^)]*\)", " ", without_strings)
    words = set(re.findall(r"\b[A-Za-z_][A-Za-z0-9_]*\b", scrubbed))
    return {w for w in words if w not in PROMQL_WORDS and not w.isdigit()}, labels


def test_committed_dashboards_are_the_generated_ones() -> None:
    for name, text in dashboards.rendered().items():
        committed = REPO / "observability/grafana/dashboards" / name
        assert committed.read_text() == text, f"{name} drifted: run python -m observability.dashboards"
    for name in {p.name for p in (REPO / "observability/grafana/dashboards").glob("*.json")}:
        assert name in dashboards.rendered(), f"{name} is not generated by observability/dashboards.py"
    assert all(json.loads(t)["panels"] for t in dashboards.rendered().values())


def scrape(url: str) -> dict[str, set[str]]:
    """Series name -> label names on one /metrics page."""
    series: dict[str, set[str]] = {}
    for line in httpx.get(url, timeout=10).text.splitlines():
        match = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s", line)
        if match and not line.startswith("#"):
            labels = set(re.findall(r'(\w+)="', match.group(2) or ""))
            series.setdefault(match.group(1), set()).update(labels)
    return series


def test_every_queried_metric_is_exported_with_the_labels_used(
    cluster: ProcessCluster, tmp_path_factory: pytest.TempPathFactory
) -> None:
    broker = cluster.broker(rate_limit_per_minute=4)
    text = cluster.text_worker()
    image = cluster.image_worker(tmp_path_factory.getbasetemp() / "sd-cache")
    edge = cluster.edge(broker)
    cluster.wait_serving(broker)
    cluster.wait_registered(text)
    cluster.wait_registered(image)
    cluster.wait(edge, lambda: http_ok(f"{edge.address}/readyz"))
    with httpx.Client(base_url=edge.address, timeout=60) as client:
        several_words = {**CHAT, "max_tokens": 40}  # one streamed delta per word: inter-token gaps
        assert client.post("/v1/chat/completions", json=several_words).status_code == 200
        image_body = {"prompt": "a cat", "steps": 2, "width": 64, "height": 64}
        assert client.post("/sdapi/v1/txt2img", json=image_body).status_code == 200
        codes = {client.post("/v1/chat/completions", json=CHAT).status_code for _ in range(4)}
        assert 429 in codes  # the rate limit, so its counter has a series
        client.get("/healthz")  # probes are not traffic
        for n in range(3):  # any token parses as a method; each must not become a label value
            client.request(f"FOO{n}", "/v1/models")
        edge_page = client.get("/metrics").text
    assert 'route="_OTHER unmatched"' in edge_page or 'route="_OTHER /v1/models"' in edge_page
    assert "FOO" not in edge_page and "/healthz" not in edge_page
    time.sleep(2.5)  # the broker refreshes its queue and registry gauges every 2 s
    exported: dict[str, set[str]] = {}
    for child in (broker, text, image):
        for name, labels in scrape(f"http://127.0.0.1:{child.metrics_port}/metrics").items():
            exported.setdefault(name, set()).update(labels)
    for name, labels in scrape(f"{edge.address}/metrics").items():
        exported.setdefault(name, set()).update(labels)
    assert set(exported) >= EXPOSED, f"declared but never exported: {sorted(EXPOSED - set(exported))}"
    checked = 0
    for expr in queries():
        names, labels = names_and_labels(expr)
        for name in names:
            if EXTERNAL.match(name):
                continue
            assert name in exported, f"{name!r} in {expr!r} is not on any /metrics"
            series_labels = exported[name] | {"job", "instance"}  # added by Prometheus when it scrapes
            assert labels <= series_labels | {"le"}, (
                f"{expr!r}: labels {labels - series_labels} not on {name}"
            )
            checked += 1
    assert checked > 30
    assert not any("token" in label or "tenant" in label for labels in exported.values() for label in labels)


# -- Prometheus itself evaluates every dashboard query against a live stack ----------------------------------


@pytest.mark.skipif(
    shutil.which("prometheus") is None, reason="prometheus is not installed (make install adds it)"
)
def test_prometheus_answers_every_dashboard_query_with_data(cluster: ProcessCluster, tmp_path: Path) -> None:
    assert (
        subprocess.run(
            ["promtool", "check", "rules", str(REPO / "observability/prometheus/alerts.yml")],
            capture_output=True,
        ).returncode
        == 0
    )
    broker = cluster.broker()
    text = cluster.text_worker()
    image = cluster.image_worker(tmp_path / "sd-cache")
    edge = cluster.edge(broker)
    cluster.wait_serving(broker)
    cluster.wait_registered(text)
    cluster.wait_registered(image)
    cluster.wait(edge, lambda: http_ok(f"{edge.address}/readyz"))
    targets = {
        "velesio-edge": edge.address.removeprefix("http://"),
        "velesio-broker": f"127.0.0.1:{broker.metrics_port}",
        "velesio-llm-worker": f"127.0.0.1:{text.metrics_port}",
        "velesio-sd-worker": f"127.0.0.1:{image.metrics_port}",
    }
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(REPO / "observability/prometheus/alerts.yml")],
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [target]}]}
                           for job, target in targets.items()],
    }  # fmt: skip
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    prometheus = subprocess.Popen(
        ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=log,
    )  # fmt: skip
    api = f"http://127.0.0.1:{port}/api/v1/query"
    try:
        with httpx.Client(base_url=edge.address, timeout=60) as client:
            give_up = time.monotonic() + 60
            empty = ["not yet asked"]
            while empty and time.monotonic() < give_up:
                # Traffic between scrapes, so every rate() has two samples that differ.
                assert client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 40}).status_code == 200
                body = {"prompt": "a cat", "steps": 2, "width": 64, "height": 64}
                assert client.post("/sdapi/v1/txt2img", json=body).status_code == 200
                time.sleep(1)
                empty = [expr for expr in _dashboard_queries() if not _has_data(api, expr)]
        assert not empty, f"dashboard queries without data: {empty}"
        for expr in queries():  # alert rules return data only when they fire; they must evaluate cleanly
            assert httpx.get(api, params={"query": expr}, timeout=10).json()["status"] == "success", expr
    finally:
        prometheus.terminate()
        prometheus.wait(10)
        log.close()


def _dashboard_queries() -> list[str]:
    return [
        expr
        for d in dashboards.DASHBOARDS
        for p in d.panels
        for expr, _ in p.targets
        if not any(EXTERNAL.match(name) for name in names_and_labels(expr)[0])
    ]


def _has_data(api: str, expr: str) -> bool:
    try:
        reply = httpx.get(api, params={"query": expr}, timeout=10).json()
    except httpx.HTTPError:
        return False
    return reply.get("status") == "success" and bool(reply["data"]["result"])


# -- logs --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("log_content", [False, True])
def test_json_logs_carry_job_tenant_and_trace_and_no_prompt_unless_asked(
    cluster: ProcessCluster, log_content: bool
) -> None:
    secret_prompt = "the launch code is 0451"
    broker = cluster.broker(api_tokens="studio:tok-123", log_format="json", log_content=log_content)
    worker = cluster.text_worker(log_format="json")
    edge = cluster.edge(broker, log_format="json")
    cluster.wait_serving(broker)
    cluster.wait_registered(worker)
    cluster.wait(edge, lambda: http_ok(f"{edge.address}/healthz"))
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    reply = httpx.post(
        f"{edge.address}/v1/chat/completions",
        json={**CHAT, "messages": [{"role": "user", "content": secret_prompt}]},
        headers={"authorization": "Bearer tok-123", "traceparent": f"00-{trace_id}-b7ad6b7169203331-01"},
        timeout=30,
    )
    assert reply.status_code == 200, reply.text
    lines = [json.loads(line) for line in broker.log_text().splitlines() if line.startswith("{")]
    queued = [entry for entry in lines if entry["message"].startswith("job queued")]
    assert len(queued) == 1, lines
    assert queued[0]["tenant"] == "studio" and len(queued[0]["job_id"]) == 32
    assert queued[0]["trace_id"] == trace_id
    everything = broker.log_text() + worker.log_text() + edge.log_text()
    assert (secret_prompt in everything) is log_content
    assert "tok-123" not in everything
