"""Edge overhead: what the REST edge adds on top of calling the broker over gRPC (DESIGN.md, "edge").

Starts a private redis-server, one `velesio broker`, one `velesio llm-worker --model echo
--echo-delay-ms 0` and one `velesio edge` as separate processes (the rig of bench/mesh_overhead.py plus
the edge), and drives them from this process (one asyncio loop). Each caller loops on one chat job with
the same one-message conversation, over one of three paths, measured one after the other, never at once:

- rest: POST /v1/chat/completions with "stream": false through the edge (httpx.AsyncClient, keep-alive
  pool sized to the callers), read and parse the whole JSON reply;
- sse: the same with "stream": true, read and parse every `data:` chunk up to `data: [DONE]`;
- grpc (the peer): velesio.v1.Inference/Chat on the broker directly (grpc.aio), read to the done event.

"Added latency" = edge path latency - gRPC latency at the same number of callers in the same repeat,
and the throughput ratio is edge/gRPC.

    python -m bench.edge_overhead --duration 3 --repeats 3

The load generator, the edge, the broker, the worker and redis-server all share this machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import fastapi
import grpc.aio
import httpx
import uvicorn

from bench.mesh_overhead import (
    CALL_TIMEOUT_S,
    MODEL,
    PROCESSES,
    READY_TIMEOUT_S,
    JobCall,
    Phase,
    Rig,
    Row,
    _channels,
    add_load_arguments,
    check_load_arguments,
    cli,
    cpu_probe,
    describe_machine,
    process_cpu_s,
    progress,
    report_server_errors,
    run_phase,
    wait_ready,
)
from bench.report import Outcome, Result, callers, paired
from launcher.spawn import velesio_command
from mesh.ports import free_port
from velesio.v1 import common_pb2, inference_pb2, inference_pb2_grpc

PEER = "grpc"
EDGE_PATHS = ("rest", "sse")
TARGETS = (*EDGE_PATHS, PEER)
CPU_PROCESSES = ("client", "edge", "broker", "worker", "redis")
CHAT_PATH = "/v1/chat/completions"
DONE_LINE = "data: [DONE]"


# -- processes --------------------------------------------------------------------------------------


class EdgeRig(Rig):
    """The mesh_overhead rig (redis-server, broker, echo worker) plus one `velesio edge` in front of the
    broker. Stops the edge first, then the rest as Rig does."""

    def __init__(self, workdir: Path, *, slots: int, log_level: str) -> None:
        super().__init__(workdir, slots=slots, log_level=log_level)
        self.edge_url = ""

    def __enter__(self) -> EdgeRig:
        super().__enter__()
        return self

    def start(self) -> None:
        super().start()
        port = free_port()
        self.edge_url = f"http://127.0.0.1:{port}"
        self._spawn(
            "edge", "edge", host="127.0.0.1", http_port=port, broker_addr=self.broker_address,
            log_level=self.log_level,
        )  # fmt: skip

    def stop(self) -> None:
        # Rig.stop goes through children in order: the edge (the broker's client) goes first.
        self.children.sort(key=lambda child: child.name != "edge")
        super().stop()


async def wait_edge_ready(rig: EdgeRig, limit_s: float = READY_TIMEOUT_S) -> None:
    """Waits until the edge's /readyz says the broker answers and a text worker is there."""
    give_up = time.monotonic() + limit_s
    async with httpx.AsyncClient(base_url=rig.edge_url, timeout=2.0) as client:
        while True:
            rig.check_alive()
            try:
                if (await client.get("/readyz")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > give_up:
                raise TimeoutError(f"the edge was not ready in {limit_s:.0f} s")
            await asyncio.sleep(0.1)


# -- one job, through the edge or straight to the broker --------------------------------------------


def chat_body(prompt: str, *, stream: bool) -> bytes:
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "stream": stream}
    return json.dumps(body).encode()


def _http_error(response: httpx.Response) -> RuntimeError:
    return RuntimeError(f"HTTP {response.status_code}: {response.text[:300]}")


def rest_call(client: httpx.AsyncClient, prompt: str) -> JobCall:
    """Non-streaming chat completion: the reply is parsed and must carry a finish_reason."""
    body = chat_body(prompt, stream=False)
    headers = {"content-type": "application/json"}

    async def call() -> float | None:
        began = time.perf_counter()
        try:
            response = await client.post(CHAT_PATH, content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise RuntimeError(f"{type(exc).__name__}: {exc}") from exc
        if response.status_code != 200:
            raise _http_error(response)
        reply = response.json()
        finished = reply["choices"][0]["finish_reason"] is not None
        return time.perf_counter() - began if finished else None

    return call


def sse_call(client: httpx.AsyncClient, prompt: str) -> JobCall:
    """Streaming chat completion: every chunk is parsed; the job counts once `data: [DONE]` arrives
    after a chunk with a finish_reason."""
    body = chat_body(prompt, stream=True)
    headers = {"content-type": "application/json", "accept": "text/event-stream"}

    async def call() -> float | None:
        began = time.perf_counter()
        finished = False
        try:
            async with client.stream("POST", CHAT_PATH, content=body, headers=headers) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise _http_error(response)
                async for line in response.aiter_lines():
                    if line == DONE_LINE:
                        return time.perf_counter() - began if finished else None
                    if line.startswith("data: "):
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            raise RuntimeError(f"stream error: {chunk['error'].get('message')}")
                        finished = finished or any(c.get("finish_reason") for c in chunk["choices"])
        except httpx.HTTPError as exc:
            raise RuntimeError(f"{type(exc).__name__}: {exc}") from exc
        return None

    return call


def grpc_call(channel: grpc.aio.Channel, prompt: str) -> JobCall:
    """Inference/Chat on the broker: what the edge sends it for the same request (no options set)."""
    stub: inference_pb2_grpc.InferenceAsyncStub = inference_pb2_grpc.InferenceStub(channel)
    request = inference_pb2.ChatRequest(
        model=MODEL,
        messages=[common_pb2.ChatMessage(role="user", content=prompt)],
        sampling=common_pb2.SamplingParams(),
        options=inference_pb2.JobOptions(),
    )

    async def call() -> float | None:
        began = time.perf_counter()
        took: float | None = None
        async for response in stub.Chat(request, timeout=CALL_TIMEOUT_S):
            which = response.event.WhichOneof("event")
            if which == "done":
                took = time.perf_counter() - began
            elif which == "error":
                raise RuntimeError(f"job failed: {response.event.error.message}")
        return took

    return call


async def check_paths(edge_url: str, channel: grpc.aio.Channel, prompt: str) -> None:
    """One job each way before measuring; the non-streaming reply must echo the prompt."""
    async with httpx.AsyncClient(base_url=edge_url, timeout=CALL_TIMEOUT_S) as client:
        headers = {"content-type": "application/json"}
        response = await client.post(CHAT_PATH, content=chat_body(prompt, stream=False), headers=headers)
        if response.status_code != 200:
            raise _http_error(response)
        content = response.json()["choices"][0]["message"]["content"]
        if content != prompt:
            raise RuntimeError(f"rest: the echo worker answered {content!r}, expected {prompt!r}")
        if await sse_call(client, prompt)() is None:
            raise RuntimeError("sse: the stream ended without a finish_reason and [DONE]")
    if await grpc_call(channel, prompt)() is None:
        raise RuntimeError("grpc: the stream ended without a done event")


# -- the whole measurement --------------------------------------------------------------------------


async def _edge_cpu(pid: int, t0: float, t1: float) -> float:
    """CPU seconds the edge used between perf_counter times t0 and t1 (the measured window)."""
    await asyncio.sleep(max(0.0, t0 - time.perf_counter()))
    before = process_cpu_s(pid)
    await asyncio.sleep(max(0.0, t1 - time.perf_counter()))
    return process_cpu_s(pid) - before


async def measure_path(
    rig: EdgeRig,
    target: str,
    concurrency: int,
    repeat: int,
    channels: Sequence[grpc.aio.Channel],
    args: argparse.Namespace,
) -> Phase:
    """One window of one path at one number of callers; phase.cpu_s also holds the edge's CPU."""
    async with contextlib.AsyncExitStack() as stack:
        if target == PEER:
            calls = [grpc_call(channels[i % len(channels)], args.prompt) for i in range(concurrency)]
        else:
            limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
            client = await stack.enter_async_context(
                httpx.AsyncClient(base_url=rig.edge_url, limits=limits, timeout=CALL_TIMEOUT_S)
            )
            make = rest_call if target == "rest" else sse_call
            calls = [make(client, args.prompt) for _ in range(concurrency)]
        t0 = time.perf_counter() + args.warmup
        edge_cpu = asyncio.create_task(_edge_cpu(rig.pids()["edge"], t0, t0 + args.duration))
        phase = await run_phase(
            target, calls, repeat=repeat, warmup=args.warmup, duration=args.duration, probe=cpu_probe(rig)
        )
        phase.cpu_s["edge"] = await edge_cpu
    return phase


async def measure(rig: EdgeRig, args: argparse.Namespace) -> list[Phase]:
    await wait_ready(rig)
    await wait_edge_ready(rig)
    channels = _channels(rig.broker_address, args.channels)
    try:
        await check_paths(rig.edge_url, channels[0], args.prompt)
        phases: list[Phase] = []
        for repeat in range(args.repeats):
            for index, concurrency in enumerate(args.concurrency):
                # Rotate which path goes first, so that slow drift of the machine favours none.
                shift = (repeat + index) % len(TARGETS)
                for target in (*TARGETS[shift:], *TARGETS[:shift]):
                    phase = await measure_path(rig, target, concurrency, repeat, channels, args)
                    phases.append(phase)
                    progress(phase, args.repeats, "req/s")
                    rig.check_alive()
                    await asyncio.sleep(args.pause)
        return phases
    finally:
        for channel in channels:
            await channel.close()


# -- reporting --------------------------------------------------------------------------------------


def _cpu_ms_per_job(phase: Phase, process: str) -> float:
    if process == "total":
        return sum(_cpu_ms_per_job(phase, p) for p in CPU_PROCESSES)
    return phase.cpu_s[process] * 1000 / phase.jobs if phase.jobs else math.nan


def _others_cpus(phase: Phase) -> float:
    """CPUs kept busy by processes other than the five measured ones (noise on a shared machine)."""
    ours = sum(phase.cpu_s[p] for p in (*PROCESSES, "edge"))
    return max(0.0, phase.cpu_s["machine"] - ours) / phase.duration_s


def build_levels(phases: Sequence[Phase], concurrency_levels: Sequence[int]) -> list[Row]:
    levels = []
    for concurrency in concurrency_levels:
        level = Row(concurrency, {})
        for repeat in sorted({p.repeat for p in phases if p.concurrency == concurrency}):
            found = {p.target: p for p in phases if p.concurrency == concurrency and p.repeat == repeat}
            if set(found) != set(TARGETS):
                continue
            peer = found[PEER]
            for target, phase in found.items():
                level[f"{target}_per_s"].values.append(phase.jobs_per_s)
                level[f"{target}_p50_ms"].values.append(phase.p(50))
                level[f"{target}_p99_ms"].values.append(phase.p(99))
                level[f"{target}_errors"].values.append(phase.errors)
                level[f"{target}_others_cpus"].values.append(_others_cpus(phase))
                for process in (*CPU_PROCESSES, "total"):
                    level[f"{target}_cpu_{process}"].values.append(_cpu_ms_per_job(phase, process))
                if target != PEER:
                    ratio = phase.jobs_per_s / peer.jobs_per_s if peer.jobs else math.nan
                    level[f"{target}_ratio"].values.append(ratio)
                    level[f"{target}_added_p50_ms"].values.append(phase.p(50) - peer.p(50))
                    level[f"{target}_added_p99_ms"].values.append(phase.p(99) - peer.p(99))
        levels.append(level)
    return levels


def throughput_table(levels: Sequence[Row]) -> list[str]:
    lines = [
        "| callers | gRPC req/s | REST req/s | REST/gRPC | SSE req/s | SSE/gRPC |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for level in levels:
        cells = [
            str(level.concurrency),
            level["grpc_per_s"].cell(0),
            level["rest_per_s"].cell(0),
            level["rest_ratio"].cell(2),
            level["sse_per_s"].cell(0),
            level["sse_ratio"].cell(2),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def latency_table(levels: Sequence[Row]) -> list[str]:
    lines = [
        "| callers | path | p50 ms | p99 ms | added p50 ms | added p99 ms |",
        "|---:|:---|---:|---:|---:|---:|",
    ]
    for level in levels:
        for target in TARGETS:
            added = [level[f"{target}_added_{q}_ms"].cell(2) for q in ("p50", "p99")]
            if target == PEER:
                added = ["(peer)", "(peer)"]
            cells = [level[f"{target}_p50_ms"].cell(2), level[f"{target}_p99_ms"].cell(2), *added]
            lines.append(f"| {level.concurrency} | {target} | " + " | ".join(cells) + " |")
    return lines


def cpu_table(levels: Sequence[Row]) -> list[str]:
    names = (*CPU_PROCESSES, "total")
    lines = [
        "| callers | path | " + " | ".join(f"{n} ms/req" for n in names) + " | other processes, CPUs |",
        "|---:|:---|" + "---:|" * (len(names) + 1),
    ]
    for level in levels:
        for target in TARGETS:
            cells = [f"{level[f'{target}_cpu_{n}'].median:.2f}" for n in names]
            cells.append(f"{level[f'{target}_others_cpus'].median:.2f}")
            lines.append(f"| {level.concurrency} | {target} | " + " | ".join(cells) + " |")
    return lines


def errors_line(levels: Sequence[Row]) -> str:
    total = {t: sum(sum(level[f"{t}_errors"].values) for level in levels) for t in TARGETS}
    return "failed requests in measured windows: " + ", ".join(f"{t} {n:.0f}" for t, n in total.items())


def header(machine: dict[str, Any], args: argparse.Namespace) -> list[str]:
    words = len(args.prompt.split())
    return [
        "## Velesio edge overhead (REST edge vs gRPC broker, echo engine, --echo-delay-ms 0)",
        "",
        f"- machine: nproc {machine['nproc']} (usable {machine['usable_cpus']}, cgroup limit "
        f"{machine['cgroup_cpu_limit']}), CPU {machine['cpu_model']}, {machine['platform']}, "
        f"load average (1 min) {machine['load_average_1m']:.2f} at start, "
        f"{machine.get('load_average_1m_end', math.nan):.2f} at end",
        f"- versions: Python {machine['python']}, grpcio {machine['grpcio']}, "
        f"protobuf {machine['protobuf']}, httpx {machine['httpx']}, fastapi {machine['fastapi']}, "
        f"uvicorn {machine['uvicorn']}, redis-server {machine['redis_server']}, velesio {machine['velesio']}",
        f"- run: callers {', '.join(map(str, args.concurrency))}; {args.repeats} repeat(s) of "
        f"{args.duration:g} s per level and path after {args.warmup:g} s warm-up, paths one after the "
        f"other; one user message {args.prompt!r} ({words} words -> {words} deltas + done); "
        f"{args.channels} gRPC channel(s) for the peer (the edge holds one); httpx pool = callers; "
        f"worker slots {args.slots}; edge/broker/worker log level {args.log_level}",
        "- rest = client -> edge POST /v1/chat/completions (stream false) -> broker Inference/Chat -> "
        "Redis -> echo worker; sse = the same with stream true, read to `data: [DONE]`; "
        "grpc (peer) = the same client calling the broker's Inference/Chat directly; "
        "added = edge path - grpc",
        f"- note: the load generator (this process, httpx and grpc.aio on one asyncio loop), the edge, the "
        f"broker, the worker and redis-server all share these {machine['usable_cpus']} CPUs; figures are "
        "median (min..max) over repeats",
    ]


def render(machine: dict[str, Any], args: argparse.Namespace, phases: Sequence[Phase]) -> str:
    levels = build_levels(phases, args.concurrency)
    lines = [
        *header(machine, args),
        "",
        "Throughput (completed requests per second; ratio = edge path / gRPC peer, same repeat):",
        "",
        *throughput_table(levels),
        "",
        "Latency to the last event (ms; added = edge path minus gRPC peer, same callers and repeat):",
        "",
        *latency_table(levels),
        "",
        f"- {errors_line(levels)}",
        "",
        "CPU per completed request in the measured windows, by process (ms, median over repeats; client = "
        "this load generator; the last column is how many CPUs other processes kept busy meanwhile):",
        "",
        *cpu_table(levels),
    ]
    return "\n".join(lines)


# -- entry point ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.edge_overhead",
        description=(
            "Measure the REST edge's overhead with the zero-cost echo engine: requests/s and p50/p99 added "
            "latency of POST /v1/chat/completions (non-streaming and SSE) through `velesio edge`, against "
            "the broker's gRPC Inference/Chat called directly, at several numbers of concurrent callers. "
            "Starts its own redis-server, broker, echo worker and edge processes on free ports and stops "
            "them at the end."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_load_arguments(parser, levels="1,8,32", channels=1, who="the edge, broker and worker")
    args = parser.parse_args(argv)
    check_load_arguments(parser, args)
    return args


def write_json(
    path: Path, machine: dict[str, Any], args: argparse.Namespace, phases: Sequence[Phase]
) -> None:
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    raw = {
        "machine": machine,
        "options": options,
        "phases": [{**p.summary(), "latencies_ms": [round(x, 4) for x in p.latencies_ms]} for p in phases],
    }
    path.write_text(json.dumps(raw, indent=1, allow_nan=True) + "\n")


def results(levels: Sequence[Row]) -> list[Result]:
    """Requests/s of each edge path against gRPC at every number of callers, and the latency each path
    adds at the fewest callers. DESIGN.md sets no target for the edge: these are for reading."""
    found = []
    lowest = min(levels, key=lambda level: level.concurrency)
    for level in levels:
        for target in EDGE_PATHS:
            value, peer, ratio, added = paired(
                list(zip(level[f"{target}_per_s"].values, level["grpc_per_s"].values, strict=True))
            )
            what = "REST (JSON)" if target == "rest" else "SSE"
            found.append(
                Result(
                    "edge_overhead",
                    f"{what} chat requests, {callers(level.concurrency)}",
                    "req/s",
                    value,
                    digits=0,
                    peer="broker gRPC Inference/Chat",
                    peer_value=peer,
                    ratio=ratio,
                    added=added,
                )
            )
    for target in EDGE_PATHS:
        value, peer, ratio, added = paired(
            list(zip(lowest[f"{target}_p50_ms"].values, lowest["grpc_p50_ms"].values, strict=True))
        )
        what = "REST (JSON)" if target == "rest" else "SSE"
        found.append(
            Result(
                "edge_overhead",
                f"{what} p50 latency, {callers(lowest.concurrency)}",
                "ms",
                value,
                digits=2,
                peer="broker gRPC Inference/Chat",
                peer_value=peer,
                ratio=ratio,
                added=added,
            )
        )
    return found


def run(argv: Sequence[str] | None = None) -> Outcome:
    """Measures and prints the report; returns the figures. Raises when the measurement fails."""
    args = parse_args(argv)
    machine = describe_machine()
    machine |= {"httpx": httpx.__version__, "fastapi": fastapi.__version__, "uvicorn": uvicorn.__version__}
    command = " ".join(velesio_command())
    print(f"starting redis-server, broker, echo worker and edge ({command})", file=sys.stderr)
    with (
        tempfile.TemporaryDirectory(prefix="velesio-bench-") as tmp,
        EdgeRig(args.logs or Path(tmp), slots=args.slots, log_level=args.log_level) as rig,
    ):
        phases = asyncio.run(measure(rig, args))
        if any(phase.errors for phase in phases):
            report_server_errors(rig)
    machine["load_average_1m_end"] = os.getloadavg()[0]
    report = render(machine, args, phases)
    print(report)
    if args.json is not None:
        write_json(args.json, machine, args, phases)
        print(f"\nraw numbers written to {args.json}", file=sys.stderr)
    return Outcome("edge_overhead", results(build_levels(phases, args.concurrency)), report)


def main(argv: Sequence[str] | None = None) -> int:
    return cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
