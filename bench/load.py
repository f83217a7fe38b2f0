"""Load: many streams held at once, and a deep queue (DESIGN.md, "Performance targets": 10,000 queued jobs
held with bounded memory, queue position answered in O(log n)).

Starts a private redis-server, one `velesio broker`, one echo `velesio llm-worker` (a set pace per word),
one parked echo worker (model "parked", one slot, a pace of an hour per word) and one `velesio edge`, each
its own process, and drives them from this process (one asyncio loop):

1. streams: --sse callers loop on streamed chat completions through the edge (OpenAI SSE) and --grpc
   callers loop on Inference/Chat straight to the broker, all at once, for --hold seconds after a --ramp;
   every reply must be the caller's own prompt back, whole. The RSS of every process is sampled meanwhile
   (start, peak and end of the hold window).
2. queue: one job takes the parked worker's only slot, then --jobs jobs are submitted for it and stay
   queued: Redis memory per queued job (INFO used_memory before and after), the enqueue rate, the
   latency of GetJob (which answers the queue position with one ZRANK) at depth 100 and at full depth,
   that every job is in the queue, and that one job more is refused RESOURCE_EXHAUSTED.

    python -m bench.load --sse 200 --grpc 200 --hold 60 --jobs 10000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import httpx
import psutil
import redis.asyncio

from bench.edge_overhead import CHAT_PATH, DONE_LINE, EdgeRig, chat_body, wait_edge_ready
from bench.mesh_overhead import (
    WORKER_ID,
    _channels,
    cli,
    percentile,
    report_server_errors,
    wait_ready,
    wait_worker_registered,
)
from bench.report import Figure, Outcome, Result, Target
from launcher.spawn import velesio_command
from mesh.keys import Keys
from mesh.ports import free_port
from velesio.v1 import common_pb2, inference_pb2, inference_pb2_grpc

PARKED_ID = "bench-parked"
PARKED_MODEL = "parked"
CALL_TIMEOUT_S = 120.0
SHALLOW_DEPTH = 100
TARGET_DEEP_VS_SHALLOW = 2.0  # O(log n): 100x the depth must not cost more than 2x the time
MIB = 2**20


# -- processes --------------------------------------------------------------------------------------


class LoadRig(EdgeRig):
    """redis-server, broker, echo worker (with a pace), parked worker and edge, each its own process."""

    def __init__(self, workdir: Path, args: argparse.Namespace) -> None:
        super().__init__(workdir, slots=args.sse + args.grpc + 8, log_level=args.log_level)
        self.args = args

    def __enter__(self) -> LoadRig:
        super().__enter__()
        return self

    def start(self) -> None:
        common = self.start_broker(max_queue_depth=self.args.jobs)
        self._spawn(
            "worker", "llm-worker", **common, model="echo", slots=self.slots, port=free_port(),
            worker_id=WORKER_ID, echo_delay_ms=self.args.word_ms,
        )  # fmt: skip
        self._spawn(
            "parked", "llm-worker", **common, model="echo", model_id=PARKED_MODEL, slots=1, port=free_port(),
            worker_id=PARKED_ID, echo_delay_ms=3_600_000,
        )  # fmt: skip
        port = free_port()
        self.edge_url = f"http://127.0.0.1:{port}"
        self._spawn(
            "edge", "edge", host="127.0.0.1", http_port=port, broker_addr=self.broker_address,
            log_level=self.log_level,
        )  # fmt: skip


# -- memory -----------------------------------------------------------------------------------------


@dataclass
class Memory:
    """RSS samples of every process (MiB), with the time each was taken."""

    pids: dict[str, int]
    samples: list[tuple[float, dict[str, float]]] = field(default_factory=list)

    def sample(self) -> dict[str, float]:
        found = {}
        for name, pid in self.pids.items():
            try:
                found[name] = psutil.Process(pid).memory_info().rss / MIB
            except psutil.Error:
                found[name] = math.nan
        self.samples.append((time.monotonic(), found))
        return found

    def window(self, t0: float, t1: float) -> dict[str, dict[str, float]]:
        """Per process: the first sample at or after t0, the largest in [t0, t1], the last at or before t1."""
        inside = [s for t, s in self.samples if t0 <= t <= t1]
        if not inside:
            return {}
        return {
            name: {
                "start": inside[0][name],
                "peak": max(s[name] for s in inside),
                "end": inside[-1][name],
            }
            for name in self.pids
        }


async def sample_until(memory: Memory, stop: asyncio.Event, every_s: float) -> None:
    while not stop.is_set():
        memory.sample()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)
    memory.sample()


# -- phase 1: streams -------------------------------------------------------------------------------


@dataclass
class Streams:
    """What the callers of one path saw."""

    path: str
    callers: int
    jobs: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    active: int = 0
    active_in_window: list[int] = field(default_factory=list)

    def failed(self, problem: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(problem)


JobCall = Callable[[str], Awaitable[None]]


def prompt_for(path: str, caller: int, job: int, words: int) -> str:
    """Each job its own text, so that a reply that mixed up two streams shows."""
    return f"{path} {caller} job {job} " + " ".join(f"w{i}" for i in range(words))


def sse_job(client: httpx.AsyncClient) -> JobCall:
    headers = {"content-type": "application/json", "accept": "text/event-stream"}

    async def call(prompt: str) -> None:
        text: list[str] = []
        async with client.stream(
            "POST", CHAT_PATH, content=chat_body(prompt, stream=True), headers=headers
        ) as response:
            if response.status_code != 200:
                await response.aread()
                raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
            async for line in response.aiter_lines():
                if line == DONE_LINE:
                    break
                if line.startswith("data: "):
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        raise RuntimeError(f"stream error: {chunk['error'].get('message')}")
                    text += [c.get("delta", {}).get("content") or "" for c in chunk["choices"]]
            else:
                raise RuntimeError("the stream ended without data: [DONE]")
        if "".join(text) != prompt:
            raise RuntimeError(f"reply {''.join(text)[:80]!r} is not the prompt {prompt[:80]!r}")

    return call


def grpc_job(channel: grpc.aio.Channel) -> JobCall:
    stub: inference_pb2_grpc.InferenceAsyncStub = inference_pb2_grpc.InferenceStub(channel)

    async def call(prompt: str) -> None:
        request = inference_pb2.ChatRequest(
            model="echo", messages=[common_pb2.ChatMessage(role="user", content=prompt)]
        )
        text: list[str] = []
        done = False
        async for response in stub.Chat(request, timeout=CALL_TIMEOUT_S):
            event = response.event
            if event.HasField("token"):
                text.append(event.token.text)
            elif event.HasField("error"):
                raise RuntimeError(f"job failed: {event.error.code} {event.error.message}")
            done = done or event.HasField("done")
        if not done or "".join(text) != prompt:
            raise RuntimeError(
                f"reply {''.join(text)[:80]!r} (done: {done}) is not the prompt {prompt[:80]!r}"
            )

    return call


async def _caller(
    streams: Streams, call: JobCall, caller: int, words: int, first_at: float, until: float
) -> None:
    await asyncio.sleep(max(0.0, first_at - time.monotonic()))
    job = 0
    while time.monotonic() < until:
        streams.active += 1
        try:
            await call(prompt_for(streams.path, caller, job, words))
            streams.jobs += 1
        except grpc.aio.AioRpcError as exc:
            streams.failed(f"{exc.code().name}: {exc.details()}")
        except (httpx.HTTPError, RuntimeError, ValueError, KeyError) as exc:
            streams.failed(f"{type(exc).__name__}: {exc}")
        finally:
            streams.active -= 1
        job += 1
        if streams.errors:
            await asyncio.sleep(0.05)  # do not spin on a broken setup


@dataclass
class StreamPhase:
    streams: list[Streams]
    hold_s: float
    idle_mib: dict[str, float]  # RSS of every process before the first stream
    memory: dict[str, dict[str, float]]  # process -> RSS at the start, peak and end of the hold window
    redis_used_mib: list[float] = field(default_factory=list)  # INFO used_memory at the start and end

    @property
    def errors(self) -> int:
        return sum(s.errors for s in self.streams)


async def redis_used_mib(client: redis.asyncio.Redis) -> float:
    info = await client.info("memory")
    return float(info["used_memory"]) / MIB


def _callers(
    streams: Streams, make: Callable[[int], JobCall], args: argparse.Namespace, began: float, until: float
) -> list[Coroutine[Any, Any, None]]:
    return [
        _caller(streams, make(i), i, args.words, began + random.uniform(0, args.ramp), until)
        for i in range(streams.callers)
    ]


async def hold_streams(rig: LoadRig, args: argparse.Namespace, memory: Memory) -> StreamPhase:
    """Every caller loops on its own stream for ramp + hold seconds (first requests spread over the ramp);
    jobs still running at the end finish before this returns."""
    phase = StreamPhase(
        [Streams("sse", args.sse), Streams("grpc", args.grpc)], args.hold, memory.sample(), {}
    )
    sse, grpc_streams = phase.streams
    channels = _channels(rig.broker_address, args.channels)
    limits = httpx.Limits(max_connections=args.sse + 8, max_keepalive_connections=args.sse + 8)
    timeout = httpx.Timeout(CALL_TIMEOUT_S, connect=10.0)
    began = time.monotonic()
    t0, t1 = began + args.ramp, began + args.ramp + args.hold
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_until(memory, stop, args.sample_s))
    try:
        async with (
            httpx.AsyncClient(base_url=rig.edge_url, limits=limits, timeout=timeout) as http,
            redis.asyncio.Redis.from_url(rig.redis.url) as client,
            asyncio.TaskGroup() as group,  # a failure (a process died) stops every caller
        ):
            for call in [
                *_callers(sse, lambda i: sse_job(http), args, began, t1),
                *_callers(grpc_streams, lambda i: grpc_job(channels[i % len(channels)]), args, began, t1),
                _watch(phase, t0, t1, rig, client),
            ]:
                group.create_task(call)
    except ExceptionGroup as failed:  # the watcher's: a process died, or Redis went away
        raise failed.exceptions[0] from None
    finally:
        stop.set()
        await sampler
        for channel in channels:
            await channel.close()
    phase.memory = memory.window(t0, t1)
    return phase


async def _watch(phase: StreamPhase, t0: float, t1: float, rig: LoadRig, client: redis.asyncio.Redis) -> None:
    """Counts the open streams every half second of the hold window, reads Redis memory at its start and
    end, and stops the run when a process died."""
    await asyncio.sleep(max(0.0, t0 - time.monotonic()))
    phase.redis_used_mib.append(await redis_used_mib(client))
    while time.monotonic() < t1:
        for streams in phase.streams:
            streams.active_in_window.append(streams.active)
        rig.check_alive()
        await asyncio.sleep(min(0.5, max(0.0, t1 - time.monotonic())))
    phase.redis_used_mib.append(await redis_used_mib(client))


# -- phase 2: a deep queue --------------------------------------------------------------------------


@dataclass
class QueuePhase:
    jobs: int
    submitters: int
    submit_s: float
    redis_bytes_per_job: float
    depth: int  # ZCARD of the queue at the end
    positions_ok: bool  # GetJob answered the position each job got at Submit
    refused: str  # what one job more got, e.g. "RESOURCE_EXHAUSTED: the text queue ... is full"
    get_job_ms: dict[int, list[float]]  # depth -> latencies of GetJob on the newest job
    broker_mib: tuple[float, float]  # broker RSS before and after

    @property
    def jobs_per_s(self) -> float:
        return self.jobs / self.submit_s if self.submit_s > 0 else math.nan

    def p50(self, depth: int) -> float:
        return percentile(sorted(self.get_job_ms.get(depth, [])), 50)


def _submit_request(i: int) -> inference_pb2.SubmitRequest:
    return inference_pb2.SubmitRequest(
        complete=inference_pb2.CompleteRequest(model=PARKED_MODEL, prompt=f"queued job {i}")
    )


async def _submit_range(
    stubs: Sequence[inference_pb2_grpc.InferenceAsyncStub], first: int, last: int, submitters: int
) -> dict[str, int]:
    """Submits jobs first..last-1 from `submitters` callers at once; returns job id -> queue position."""
    numbers = iter(range(first, last))
    positions: dict[str, int] = {}

    async def submitter(stub: inference_pb2_grpc.InferenceAsyncStub) -> None:
        for i in numbers:
            reply = await stub.Submit(_submit_request(i), timeout=CALL_TIMEOUT_S)
            positions[reply.job_id] = reply.queue_position

    await asyncio.gather(*(submitter(stubs[i % len(stubs)]) for i in range(submitters)))
    return positions


async def _get_job_ms(stub: inference_pb2_grpc.InferenceAsyncStub, job_id: str, calls: int) -> list[float]:
    took = []
    for _ in range(calls):
        began = time.perf_counter()
        await stub.GetJob(inference_pb2.GetJobRequest(job_id=job_id), timeout=CALL_TIMEOUT_S)
        took.append((time.perf_counter() - began) * 1000)
    return took


async def _park(stub: inference_pb2_grpc.InferenceAsyncStub) -> None:
    """One job takes the parked worker's only slot, so that what follows stays queued."""
    reply = await stub.Submit(_submit_request(-1), timeout=CALL_TIMEOUT_S)
    give_up = time.monotonic() + 30
    while True:
        job = await stub.GetJob(inference_pb2.GetJobRequest(job_id=reply.job_id), timeout=CALL_TIMEOUT_S)
        if job.job.state == common_pb2.JOB_STATE_RUNNING:
            return
        if time.monotonic() > give_up:
            raise TimeoutError("the parked worker did not take its first job in 30 s")
        await asyncio.sleep(0.05)


async def _one_more(stub: inference_pb2_grpc.InferenceAsyncStub) -> str:
    try:
        await stub.Submit(_submit_request(-2), timeout=CALL_TIMEOUT_S)
    except grpc.aio.AioRpcError as exc:
        return f"{exc.code().name}: {exc.details()}"
    return "accepted"


async def fill_queue(rig: LoadRig, args: argparse.Namespace) -> QueuePhase:
    await wait_worker_registered(rig, PARKED_ID, "the parked worker")
    broker = psutil.Process(rig.pids()["broker"])
    channels = _channels(rig.broker_address, args.channels)
    stubs: list[inference_pb2_grpc.InferenceAsyncStub] = [
        inference_pb2_grpc.InferenceStub(c) for c in channels
    ]
    try:
        async with redis.asyncio.Redis.from_url(rig.redis.url) as client:
            await _park(stubs[0])
            broker_before = broker.memory_info().rss / MIB
            used_before = float((await client.info("memory"))["used_memory"])
            shallow = min(SHALLOW_DEPTH, args.jobs)
            began = time.perf_counter()
            positions = await _submit_range(stubs, 0, shallow, args.submitters)
            submit_s = time.perf_counter() - began
            newest = max(positions, key=lambda j: positions[j])
            latencies = {shallow: await _get_job_ms(stubs[0], newest, args.position_calls)}
            began = time.perf_counter()
            positions |= await _submit_range(stubs, shallow, args.jobs, args.submitters)
            submit_s += time.perf_counter() - began
            newest = max(positions, key=lambda j: positions[j])
            latencies[args.jobs] = await _get_job_ms(stubs[0], newest, args.position_calls)
            used_after = float((await client.info("memory"))["used_memory"])
            depth = int(await client.zcard(Keys(rig.prefix).queue("text", PARKED_MODEL)))
            positions_ok = await _positions_answered(stubs[0], positions)
            refused = await _one_more(stubs[0])
    finally:
        for channel in channels:
            await channel.close()
    return QueuePhase(
        jobs=args.jobs,
        submitters=args.submitters,
        submit_s=submit_s,
        redis_bytes_per_job=(used_after - used_before) / args.jobs,
        depth=depth,
        positions_ok=positions_ok,
        refused=refused,
        get_job_ms=latencies,
        broker_mib=(broker_before, broker.memory_info().rss / MIB),
    )


async def _positions_answered(stub: inference_pb2_grpc.InferenceAsyncStub, positions: dict[str, int]) -> bool:
    """A sample of jobs: GetJob says QUEUED at the position Submit gave (nothing ahead of them left)."""
    for job_id in random.sample(sorted(positions), min(50, len(positions))):
        job = (await stub.GetJob(inference_pb2.GetJobRequest(job_id=job_id), timeout=CALL_TIMEOUT_S)).job
        if job.state != common_pb2.JOB_STATE_QUEUED or job.queue_position != positions[job_id]:
            return False
    return True


# -- the whole run ----------------------------------------------------------------------------------


@dataclass
class LoadReport:
    streams: StreamPhase
    queue: QueuePhase


async def measure(rig: LoadRig, args: argparse.Namespace) -> LoadReport:
    await wait_ready(rig)
    await wait_edge_ready(rig)
    memory = Memory({"client": os.getpid(), **rig.pids()})
    streams = await hold_streams(rig, args, memory)
    _progress_streams(streams)
    rig.check_alive()
    queue = await fill_queue(rig, args)
    return LoadReport(streams, queue)


def _progress_streams(phase: StreamPhase) -> None:
    for s in phase.streams:
        errors = f", first: {s.error_samples[0]}" if s.error_samples else ""
        print(f"  {s.path}: {s.callers} callers, {s.jobs} jobs, {s.errors} errors{errors}", file=sys.stderr)


# -- reporting --------------------------------------------------------------------------------------


def results(report: LoadReport) -> list[Result]:
    streams, queue = report.streams, report.queue
    found = [
        Result(
            "load",
            f"failed {'SSE' if s.path == 'sse' else 'gRPC'} streams, {s.callers} held {streams.hold_s:g} s"
            f" ({'through the edge' if s.path == 'sse' else 'straight to the broker'})",
            "errors",
            Figure([float(s.errors)]),
            digits=0,
            target=Target("value", "<=", 0),
        )
        for s in streams.streams
    ]
    found.append(
        Result(
            "load",
            f"Redis memory per queued job, {queue.jobs} queued",
            "bytes",
            Figure([queue.redis_bytes_per_job]),
            digits=0,
        )
    )
    found.append(
        Result(
            "load",
            f"enqueue rate, Submit from {queue.submitters} callers",
            "jobs/s",
            Figure([queue.jobs_per_s]),
            digits=0,
        )
    )
    deep, shallow = queue.p50(queue.jobs), queue.p50(min(SHALLOW_DEPTH, queue.jobs))
    found.append(
        Result(
            "load",
            f"GetJob (queue position) p50 at depth {queue.jobs}",
            "ms",
            Figure([deep]),
            digits=2,
            peer=f"the same at depth {min(SHALLOW_DEPTH, queue.jobs)}",
            peer_value=Figure([shallow]),
            ratio=Figure([deep / shallow if shallow else math.nan]),
            added=Figure([deep - shallow]),
            target=Target("ratio", "<=", TARGET_DEEP_VS_SHALLOW),
        )
    )
    return found


def render(report: LoadReport, args: argparse.Namespace) -> str:
    streams, queue = report.streams, report.queue
    lines = [
        "## Velesio load (echo engine)",
        "",
        f"- streams: {args.sse} SSE callers through the edge (POST /v1/chat/completions, stream true) and "
        f"{args.grpc} gRPC callers straight to the broker (Inference/Chat), each looping on jobs of "
        f"{args.words + 4} words at {args.word_ms:g} ms per word, held {args.hold:g} s after a "
        f"{args.ramp:g} s ramp; every reply checked against its own prompt",
        "",
        "| path | callers | jobs done | errors | open streams in the window (min / median) | first errors |",
        "|:---|---:|---:|---:|---:|:---|",
    ]
    for s in streams.streams:
        opened = sorted(s.active_in_window) or [0]
        samples = "; ".join(s.error_samples).replace("|", "/")
        lines.append(
            f"| {s.path} | {s.callers} | {s.jobs} | {s.errors} | {opened[0]} / {opened[len(opened) // 2]} "
            f"| {samples} |"
        )
    lines += [
        "",
        "RSS of every process (MiB): before the first stream, then at the start, peak and end of the "
        "hold window:",
        "",
        "| process | idle | start | peak | end | end - start |",
        "|:---|---:|---:|---:|---:|---:|",
    ]
    for name, rss in streams.memory.items():
        lines.append(
            f"| {name} | {streams.idle_mib.get(name, math.nan):.1f} | {rss['start']:.1f} | {rss['peak']:.1f} "
            f"| {rss['end']:.1f} | {rss['end'] - rss['start']:+.1f} |"
        )
    start, end = [*streams.redis_used_mib, math.nan, math.nan][:2]
    lines += [
        "",
        f"- Redis used_memory {start:.1f} MiB at the start of the window, {end:.1f} MiB at its end (the "
        "events of finished jobs stay readable for --event-ttl-s, 1 h by default, then expire)",
        "",
        f"- queue: {queue.jobs} jobs submitted for a worker whose one slot is taken, from {queue.submitters} "
        f"callers: {queue.jobs_per_s:.0f} jobs/s; Redis memory {queue.redis_bytes_per_job:.0f} bytes per "
        f"queued job (INFO used_memory before/after); depth at the end {queue.depth} "
        f"({'all there' if queue.depth == queue.jobs else 'JOBS MISSING'}); GetJob positions "
        f"{'match' if queue.positions_ok else 'DO NOT MATCH'} those Submit gave; "
        f"one job more: {queue.refused}",
        f"- broker RSS {queue.broker_mib[0]:.1f} MiB before the queue was filled, {queue.broker_mib[1]:.1f} "
        "MiB after",
        "- GetJob on the newest job (ms): "
        + "; ".join(
            f"depth {depth}: p50 {percentile(sorted(ms), 50):.2f}, p99 {percentile(sorted(ms), 99):.2f} "
            f"({len(ms)} calls)"
            for depth, ms in sorted(queue.get_job_ms.items())
        ),
    ]
    return "\n".join(lines)


# -- entry point ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.load",
        description=(
            "Hold many SSE streams (through the edge) and gRPC streams (straight to the broker) on the echo "
            "engine while sampling the RSS of every process, then queue many jobs and measure Redis memory "
            "per queued job, the enqueue rate and the queue-position latency at depth. Starts its own "
            "redis-server, broker, workers and edge on free ports and stops them at the end."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--sse", type=int, default=200, help="SSE streams through the edge at once")
    parser.add_argument("--grpc", type=int, default=200, help="gRPC streams to the broker at once")
    parser.add_argument(
        "--hold", type=float, default=60.0, help="seconds the streams are held after the ramp"
    )
    parser.add_argument("--ramp", type=float, default=5.0, help="seconds over which the streams start")
    parser.add_argument("--words", type=int, default=16, help="words of each job's prompt (plus 4)")
    parser.add_argument("--word-ms", type=float, default=250.0, help="echo worker pause before each word")
    parser.add_argument("--sample-s", type=float, default=1.0, help="seconds between RSS samples")
    parser.add_argument("--channels", type=int, default=4, help="gRPC connections of the direct callers")
    parser.add_argument("--jobs", type=int, default=10_000, help="jobs queued (also the queue's bound)")
    parser.add_argument("--submitters", type=int, default=16, help="callers submitting at once")
    parser.add_argument("--position-calls", type=int, default=200, help="GetJob calls timed at each depth")
    parser.add_argument("--log-level", default="WARNING", help="log level of the edge, broker and workers")
    parser.add_argument(
        "--logs", type=Path, default=None, metavar="DIR", help="keep the processes' logs here"
    )
    args = parser.parse_args(argv)
    if min(args.sse, args.grpc) < 0 or args.sse + args.grpc < 1 or args.jobs < 1 or args.hold <= 0:
        parser.error("--sse and --grpc must be >= 0 (not both 0), --jobs >= 1 and --hold > 0")
    return args


def run(argv: Sequence[str] | None = None) -> Outcome:
    """Measures and prints the report; returns the figures. Raises when the measurement fails."""
    args = parse_args(argv)
    print(f"starting redis-server, broker, workers and edge ({' '.join(velesio_command())})", file=sys.stderr)
    with (
        tempfile.TemporaryDirectory(prefix="velesio-bench-load-") as tmp,
        LoadRig(args.logs or Path(tmp), args) as rig,
    ):
        report = asyncio.run(measure(rig, args))
        if report.streams.errors:
            report_server_errors(rig)
    text = render(report, args)
    print(text)
    return Outcome("load", results(report), text, memory_mib=report.streams.memory)


def main(argv: Sequence[str] | None = None) -> int:
    return cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
