from __future__ import annotations

from pathlib import Path

from pydantic import Field

from mesh.worker import WorkerSettings


class ImageWorkerSettings(WorkerSettings):
    """Options of `velesio sd-worker`."""

    metrics_port: int = Field(
        9466, ge=0, le=65535, description="port of the Prometheus /metrics endpoint (0: none)"
    )
    model: str = Field(
        "tiny",
        description="a diffusers folder (StableDiffusionPipeline layout), or 'tiny': a small random-weight "
        "SD 1.x pipeline generated locally for tests (draws noise)",
    )
    model_id: str = Field("", description="model name clients use (default: 'tiny' or the folder name)")
    lora_dir: Path | None = Field(None, description="folder of LoRA .safetensors files, used by file stem")
    cache_dir: Path | None = Field(None, description="where generated files (the tiny tokenizer) go")
    slots: int = Field(1, ge=1, description="jobs accepted at once; they run one after another")
    torch_threads: int = Field(0, ge=0, description="CPU threads torch uses (0: torch's default)")
    device: str = Field(
        "auto", description="'auto' (CUDA with fp16 when present, else CPU float32), 'cpu', 'cuda'"
    )
    max_size: int = Field(2048, ge=8, description="largest width or height accepted, in pixels")
    max_steps: int = Field(150, ge=1, description="most denoising steps a job may ask for")
    max_batch: int = Field(8, ge=1, description="most images per batch (batch_size) and batches (n_iter)")
