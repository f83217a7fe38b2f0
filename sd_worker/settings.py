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
        description="the model served when a request names none: a diffusers folder (StableDiffusionPipeline "
        "layout), a single .safetensors/.ckpt checkpoint (needs --checkpoint-config), a name from "
        "--models-dir (default: its first model), or a preset with random weights that draws noise: 'tiny' "
        "(small, for tests; the default without --models-dir) or 'sd15-random' (full SD 1.5 size, for "
        "benchmarks)",
    )
    model_id: str = Field(
        "", description="name clients use for --model (default: the preset, folder or file name)"
    )
    models_dir: Path | None = Field(
        None,
        description="folder of more models to serve by name, loaded when a request asks for one: "
        "diffusers folders (named by folder, lower case) and .safetensors/.ckpt files (named by file stem)",
    )
    checkpoint_config: Path | None = Field(
        None,
        description="local diffusers folder whose configs (model_index.json, unet/, vae/, text_encoder/, "
        "tokenizer/, scheduler/; weights not needed) describe the single-file checkpoints, so that they "
        "load offline",
    )
    vae: Path | None = Field(
        None,
        description="VAE used instead of each model's own: a diffusers AutoencoderKL folder or a single "
        ".safetensors/.ckpt file (A1111 or diffusers key names)",
    )
    model_cache_mb: int = Field(
        0,
        ge=0,
        description="memory the loaded models may hold together, in MiB of weights; the least recently used "
        "one is unloaded to make room (0: only the model in use stays loaded)",
    )
    lora_dir: Path | None = Field(None, description="folder of LoRA .safetensors files, used by file stem")
    cache_dir: Path | None = Field(
        None,
        description="where generated files go (the presets' tokenizer, model hashes; default: a temp folder)",
    )
    slots: int = Field(
        1,
        ge=1,
        description="jobs accepted at once; they run one after another (with 2, the next job starts while "
        "the last one's PNGs are written)",
    )
    torch_threads: int = Field(0, ge=0, description="CPU threads torch uses (0: torch's default)")
    device: str = Field(
        "auto", description="'auto' (CUDA with fp16 when present, else CPU float32), 'cpu', 'cuda'"
    )
    max_size: int = Field(2048, ge=8, description="largest width or height accepted, in pixels")
    max_steps: int = Field(150, ge=1, description="most denoising steps a job may ask for")
    max_batch: int = Field(8, ge=1, description="most images per batch (batch_size) and batches (n_iter)")
