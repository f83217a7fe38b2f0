from __future__ import annotations

from pydantic import Field

from mesh.settings import CommonSettings


class EdgeSettings(CommonSettings):
    """Options of `velesio edge`."""

    http_port: int = Field(8000, description="port of the REST API")
    broker_addr: str = Field("127.0.0.1:50051", description="gRPC address of a broker (or a load balancer)")
    cors_origins: str = Field("", description="comma-separated origins allowed by CORS ('*' for any)")
    max_body_bytes: int = Field(64 * 1024 * 1024, description="largest request body accepted")
    request_timeout_s: float = Field(600.0, description="longest a request may take end to end")
