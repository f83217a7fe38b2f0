from __future__ import annotations

from pathlib import Path

from pydantic import Field

from mesh.settings import CommonSettings


class BrokerSettings(CommonSettings):
    """Options of `velesio broker`."""

    metrics_port: int = Field(
        9464, ge=0, le=65535, description="port of the Prometheus /metrics endpoint (0: none)"
    )
    grpc_port: int = Field(50051, description="port of the public gRPC API (velesio.v1.Inference)")
    api_tokens: str = Field(
        "", description="'tenant:token,...' or 'token,...'; empty allows anonymous on loopback"
    )
    api_tokens_file: Path | None = Field(None, description="file with one 'tenant:token' per line")
    broker_id: str = Field("", description="name of this replica in logs and the registry (default: random)")
    max_queue_depth: int = Field(10_000, description="jobs one (kind, model) queue holds; more are refused")
    rate_limit_per_minute: int = Field(0, description="job requests per tenant per minute (0: no limit)")
    max_active_jobs: int = Field(0, description="queued plus running jobs per tenant (0: no limit)")
    max_queued_jobs: int = Field(0, description="queued jobs per tenant (0: no limit)")
    default_timeout_s: float = Field(600.0, description="deadline of a job whose request names none")
    lease_s: float = Field(
        10.0, description="a running job whose broker stops renewing for this long is reclaimed"
    )
    max_attempts: int = Field(
        3, description="runs of a job whose worker or broker failed (a text job goes on after its output)"
    )
    event_ttl_s: float = Field(3600.0, description="how long a finished job and its events stay readable")
    max_events: int = Field(10_000, description="events kept per job stream (older ones are trimmed)")
    max_prompt_chars: int = Field(1_000_000, description="longest prompt or chat accepted, in characters")
    max_image_bytes: int = Field(
        20 * 1024 * 1024, description="largest init image or mask accepted, in bytes"
    )
    default_text_model: str = Field("", description="model of text requests that name none (default: any)")
    default_image_model: str = Field("", description="model of image requests that name none (default: any)")
    grace_s: float = Field(
        10.0, description="on SIGTERM, how long streams and running jobs may take to finish"
    )
    queue_poll_s: float = Field(
        1.0,
        gt=0,
        description="how often a waiting stream refreshes its queue position (its events, such as its start, "
        "arrive at once regardless); 64 chat streams on 8 slots: 0.25 s cost 12% of the tokens/s",
    )
