from __future__ import annotations

from pydantic import Field

from mesh.settings import CommonSettings


class TextWorkerSettings(CommonSettings):
    """Options of `velesio llm-worker`."""

    port: int = Field(0, description="gRPC port (0: any free port; the registry tells brokers which)")
    advertise_addr: str = Field("", description="host:port brokers dial (default: --host and the bound port)")
    worker_id: str = Field("", description="name in the registry (default: text-<random>)")
    model: str = Field("echo", description="'echo' (test engine, no model) or a GGUF file path")
    model_id: str = Field("", description="model name clients use (default: derived from the model)")
    slots: int = Field(4, description="jobs served at once")
    echo_delay_ms: float = Field(20.0, description="echo engine: pause before each streamed word")
    heartbeat_s: float = Field(
        3.0, description="registration TTL; the worker drops out this long after it dies"
    )
    grace_s: float = Field(10.0, description="on SIGTERM, how long running jobs may take to finish")
