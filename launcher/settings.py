"""Options of `velesio up`, read by the launcher (`launcher.up`) and its plan (`launcher.plan`)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

from mesh.settings import CommonSettings, absolute, absolute_if_path


class UpSettings(CommonSettings):
    """Options of `velesio up`."""

    redis_url: str = Field("", description="use this Redis instead of starting an embedded one")
    redis_port: int = Field(0, description="port of the embedded Redis (0: any free port)")
    data_dir: Path = Field(Path(".velesio"), description="folder for the embedded Redis's data and logs")
    grpc_port: int = Field(50051, description="port of the broker's public gRPC API")
    http_port: int = Field(8000, description="port of the REST edge (OpenAI, llama.cpp, A1111, native JSON)")
    metrics_port: int = Field(
        9464,
        ge=0,
        le=65535,
        description="first Prometheus /metrics port: the broker's; text worker i gets this +1+i, the image "
        "worker the next one (0: none). The edge serves /metrics on its HTTP port",
    )
    edge: bool = Field(True, description="run the REST edge")
    api_tokens: str = Field("", description="'tenant:token,...' or 'token,...' (required off loopback)")
    api_tokens_file: Path | None = Field(None, description="file with one 'tenant:token' per line")
    llm: bool = Field(True, description="run text workers")
    llm_workers: int = Field(
        1, ge=1, description="text workers to run; each gets its own metrics port and cores / N threads"
    )
    llm_model: str = Field(
        "default",
        description="text worker model: 'default' (the packaged SmolLM2), a GGUF path, or 'echo' (test)",
    )
    llm_slots: int = Field(8, ge=1, description="jobs each text worker serves at once")
    sd: bool = Field(True, description="run an image worker")
    sd_model: str = Field(
        "tiny", description="image worker model: 'tiny' (random weights, test) or a diffusers folder"
    )

    # Children get absolute paths: a relative one would name another file once a child changes directory.
    @field_validator("data_dir", "api_tokens_file")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        return None if value is None else absolute(value)

    @field_validator("llm_model", "sd_model")
    @classmethod
    def _absolute_model(cls, value: str) -> str:
        return absolute_if_path(value)
