"""Mesh overhead: what the broker adds on top of a zero-cost engine (DESIGN.md, "Performance targets").

Starts a private redis-server, one `velesio broker` and one `velesio llm-worker --echo-delay-ms 0` as
separate processes, as in production, and drives them from this process with grpc.aio callers (one
asyncio loop). Each caller loops: Inference/Complete with a short prompt, read to the done event.

The peer, measured in the same run with the same prompt and the same number of callers, is the same
echo worker called directly (velesio.v1.TextWorker/Generate on its registered address). So
"added latency" = whole-stack latency - direct-worker latency, and the throughput ratio is stack/peer.

    python -m bench.mesh_overhead --duration 3 --repeats 3

Targets (DESIGN.md): >= 500 jobs/s end to end on 2 cores; p50 added latency <= 5 ms.
The load generator, the broker, the worker and redis-server all share this machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.report import Figure as Figure
from bench.report import Outcome, Result, Target, callers, cpu_model, cpu_quota, paired
from launcher.embedded_redis import EmbeddedRedis, find_redis_server
from launcher.spawn import Spawned, clean_env, spawn, velesio_argv, velesio_command
from mesh.ports import free_port
from mesh.version import VERSION
from velesio.v1 import inference_pb2, inference_pb2_grpc, workers_pb2, workers_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parent.parent
WORKER_ID = "bench-echo"
BROKER_ID = "bench-broker"
MODEL = "echo"
TARGET_JOBS_PER_S = 500.0
TARGET_ADDED_P50_MS = 5.0
CALL_TIMEOUT_S = 30.0
READY_TIMEOUT_S = 60.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
PROCESSES = ("client", "broker", "worker", "redis")

# Seconds since the call started at which the done event arrived; None when the job failed.
JobCall = Callable[[], Awaitable[float | None]]
Probe = Callable[[], dict[str, float]]


# -- processes --------------------------------------------------------------------------------------


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return math.nan
    fields = stat.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def system_busy_s() -> float:
    """CPU seconds the whole machine spent busy (all processes, all CPUs), from /proc/stat."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return math.nan
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in first[1:9])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


class Rig:
    """redis-server + one broker + one echo worker, each its own process. `with Rig(...)` stops them all
    (SIGTERM, then SIGKILL) on the way out, also after an exception or Ctrl-C."""

    def __init__(self, workdir: Path, *, slots: int, log_level: str, brokers: int = 1) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.slots = slots
        self.brokers = brokers
        self.log_level = log_level
        self.prefix = f"bench-{uuid.uuid4().hex[:8]}"
        self.redis = EmbeddedRedis(workdir / "redis", persist=False)
        self.broker_address = ""  # the first broker's
        self.broker_addresses: list[str] = []
        self.children: list[Spawned] = []

    def __enter__(self) -> Rig:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        common = self.start_broker()
        self._spawn(
            "worker", "llm-worker", **common, port=free_port(), worker_id=WORKER_ID, model=MODEL,
            slots=self.slots, echo_delay_ms=0,
        )  # fmt: skip

    def start_broker(self, **extra: object) -> dict[str, object]:
        """Starts Redis and the brokers (with `extra` options); returns the options every process shares."""
        self.redis.start()
        common: dict[str, object] = dict(
            redis_url=self.redis.url, key_prefix=self.prefix, host="127.0.0.1", grace_s=1,
            log_level=self.log_level, metrics_port=0,
        )  # fmt: skip
        for index in range(self.brokers):
            broker_port = free_port()
            self.broker_addresses.append(f"127.0.0.1:{broker_port}")
            name, broker_id = (
                ("broker", BROKER_ID) if index == 0 else (f"broker-{index + 1}", f"{BROKER_ID}-{index + 1}")
            )
            self._spawn(name, "broker", **common, grpc_port=broker_port, broker_id=broker_id, **extra)
        self.broker_address = self.broker_addresses[0]
        return common

    def _spawn(self, name: str, command: str, **options: object) -> None:
        """`velesio <command>` with `options` (settings field names), its log in <workdir>/<name>.log."""
        # A session of its own: Ctrl-C reaches only this process, which then stops the children.
        argv = velesio_argv(command, **options)
        log = self.workdir / f"{name}.log"
        self.children.append(
            spawn(name, argv, log, env=clean_env(), cwd=REPO_ROOT, new_session=True, with_parent=True)
        )

    def check_alive(self) -> None:
        for child in self.children:
            if not child.alive():
                code, tail = child.process.returncode, child.log_text(3000)
                raise RuntimeError(f"{child.name} exited with {code}; its log ends:\n{tail}")

    def pids(self) -> dict[str, int]:
        found = {child.name: child.process.pid for child in self.children}
        if self.redis.process is not None:
            found["redis"] = self.redis.process.pid
        return found

    def stop(self) -> None:
        """Stops everything; Ctrl-C is ignored meanwhile so that no child is left behind."""
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for child in self.children:  # broker first: it stops dispatching before the worker goes
                child.stop(10)
            self.redis.stop()
        finally:
            signal.signal(signal.SIGINT, previous)


def cpu_probe(rig: Rig) -> Probe:
    pids = rig.pids()

    def probe() -> dict[str, float]:
        times = os.times()
        found = {"client": times.user + times.system}
        for name in ("worker", "redis"):
            found[name] = process_cpu_s(pids[name]) if name in pids else math.nan
        found["broker"] = sum(process_cpu_s(pid) for name, pid in pids.items() if name.startswith("broker"))
        found["machine"] = system_busy_s()
        return found

    return probe


# -- readiness --------------------------------------------------------------------------------------


async def _serving(channel: grpc.aio.Channel, service: str) -> bool:
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
    except grpc.aio.AioRpcError:
        return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


async def _echo_worker_address(stub: inference_pb2_grpc.InferenceAsyncStub) -> str | None:
    """The echo worker's registered address once the broker lists the echo model, else None."""
    try:
        models = await stub.ListModels(inference_pb2.ListModelsRequest(), timeout=2.0)
        if not any(m.id == MODEL for m in models.models):
            return None
        cluster = await stub.GetCluster(inference_pb2.GetClusterRequest(), timeout=2.0)
    except grpc.aio.AioRpcError:
        return None
    return next((w.address for w in cluster.workers if w.worker_id == WORKER_ID), None)


async def wait_ready(rig: Rig, limit_s: float = READY_TIMEOUT_S) -> str:
    """Waits until the broker is SERVING and lists the echo model, and the worker is SERVING; returns
    the worker's address as the registry has it."""
    give_up = time.monotonic() + limit_s
    async with grpc.aio.insecure_channel(rig.broker_address) as channel:
        stub: inference_pb2_grpc.InferenceAsyncStub = inference_pb2_grpc.InferenceStub(channel)
        while True:
            rig.check_alive()
            if await _serving(channel, "velesio.v1.Inference"):
                address = await _echo_worker_address(stub)
                if address is not None:
                    async with grpc.aio.insecure_channel(address) as worker:
                        if await _serving(worker, "velesio.v1.TextWorker"):
                            return address
            if time.monotonic() > give_up:
                raise TimeoutError(f"the broker and the echo worker were not ready in {limit_s:.0f} s")
            await asyncio.sleep(0.1)


async def wait_worker_registered(
    rig: Rig, worker_id: str, what: str, limit_s: float = READY_TIMEOUT_S
) -> None:
    """Waits until the broker is SERVING and its GetCluster lists `worker_id`."""
    give_up = time.monotonic() + limit_s
    async with grpc.aio.insecure_channel(rig.broker_address) as channel:
        stub: inference_pb2_grpc.InferenceAsyncStub = inference_pb2_grpc.InferenceStub(channel)
        while True:
            rig.check_alive()
            if await _serving(channel, "velesio.v1.Inference"):
                try:
                    cluster = await stub.GetCluster(inference_pb2.GetClusterRequest(), timeout=2.0)
                except grpc.aio.AioRpcError:
                    cluster = inference_pb2.GetClusterResponse()
                if any(w.worker_id == worker_id for w in cluster.workers):
                    return
            if time.monotonic() > give_up:
                raise TimeoutError(f"the broker and {what} were not ready in {limit_s:.0f} s")
            await asyncio.sleep(0.2)


# -- one job, through the stack or straight to the worker --------------------------------------------


def _channels(address: str, count: int) -> list[grpc.aio.Channel]:
    # A local subchannel pool gives each channel its own connection (gRPC shares them otherwise).
    return [
        grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(count)
    ]


def stack_call(channel: grpc.aio.Channel, prompt: str) -> JobCall:
    stub: inference_pb2_grpc.InferenceAsyncStub = inference_pb2_grpc.InferenceStub(channel)
    request = inference_pb2.CompleteRequest(model=MODEL, prompt=prompt)

    async def call() -> float | None:
        began = time.perf_counter()
        took: float | None = None
        async for response in stub.Complete(request, timeout=CALL_TIMEOUT_S):
            which = response.event.WhichOneof("event")
            if which == "done":
                took = time.perf_counter() - began
            elif which == "error":
                raise RuntimeError(f"job failed: {response.event.error.message}")
        return took

    return call


def peer_call(channel: grpc.aio.Channel, prompt: str) -> JobCall:
    stub: workers_pb2_grpc.TextWorkerAsyncStub = workers_pb2_grpc.TextWorkerStub(channel)
    counter = iter(range(sys.maxsize))

    async def call() -> float | None:
        # What the broker sends the worker for a Complete with default options.
        request = workers_pb2.TextWorkerGenerateRequest(
            job_id=f"peer-{next(counter)}", model=MODEL, prompt=prompt, cache_prompt=True
        )
        began = time.perf_counter()
        took: float | None = None
        async for response in stub.Generate(request, timeout=CALL_TIMEOUT_S):
            if response.WhichOneof("event") == "done":
                took = time.perf_counter() - began
        return took

    return call


async def check_echo(stack: JobCall, peer: JobCall) -> None:
    """One job each way before measuring, so that a broken setup fails loudly instead of timing errors."""
    for name, call in (("stack", stack), ("peer", peer)):
        if await call() is None:
            raise RuntimeError(f"{name}: the stream ended without a done event")


# -- one measured phase -----------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of already sorted values."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


@dataclass
class Phase:
    target: str  # "stack" (client -> broker -> worker) or "peer" (client -> worker)
    concurrency: int
    repeat: int
    duration_s: float
    errors: int
    first_error: str
    latencies_ms: list[float]
    cpu_s: dict[str, float]  # CPU seconds each process used during the measured window

    @property
    def jobs(self) -> int:
        return len(self.latencies_ms)

    @property
    def jobs_per_s(self) -> float:
        return self.jobs / self.duration_s

    def p(self, q: float) -> float:
        return percentile(sorted(self.latencies_ms), q)

    def cpu_ms_per_job(self, process: str) -> float:
        return self.cpu_s[process] * 1000 / self.jobs if self.jobs else math.nan

    def summary(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "concurrency": self.concurrency,
            "repeat": self.repeat,
            "jobs": self.jobs,
            "errors": self.errors,
            "first_error": self.first_error,
            "jobs_per_s": self.jobs_per_s,
            "p50_ms": self.p(50),
            "p99_ms": self.p(99),
            "cpu_s": self.cpu_s,
        }


async def run_phase(
    target: str, calls: Sequence[JobCall], *, repeat: int, warmup: float, duration: float, probe: Probe
) -> Phase:
    """Every call loops on its own job for `warmup + duration` seconds; the jobs that end inside the
    last `duration` seconds count. Jobs in flight at the end finish before this returns."""
    t0 = time.perf_counter() + warmup
    t1 = t0 + duration
    latencies: list[float] = []
    errors: list[str] = []

    async def caller(call: JobCall) -> None:
        while time.perf_counter() < t1:
            try:
                took = await call()
                problem = "" if took is not None else "stream ended without a done event"
            except grpc.aio.AioRpcError as exc:
                took, problem = None, f"{exc.code().name}: {exc.details()}"
            except RuntimeError as exc:
                took, problem = None, str(exc)
            if t0 <= time.perf_counter() <= t1:
                if took is None:
                    errors.append(problem)
                else:
                    latencies.append(took * 1000)
            if took is None:
                await asyncio.sleep(0.01)  # do not spin on a broken setup

    async def sample() -> dict[str, float]:
        await asyncio.sleep(t0 - time.perf_counter())
        before = probe()
        await asyncio.sleep(t1 - time.perf_counter())
        after = probe()
        return {name: after[name] - before[name] for name in (*PROCESSES, "machine")}

    sampler = asyncio.create_task(sample())
    await asyncio.gather(*(caller(call) for call in calls))
    cpu = await sampler
    first = errors[0] if errors else ""
    return Phase(target, len(calls), repeat, duration, len(errors), first, latencies, cpu)


# -- the whole measurement --------------------------------------------------------------------------


async def measure(rig: Rig, args: argparse.Namespace) -> list[Phase]:
    worker_address = await wait_ready(rig)
    # Callers take the brokers' channels in turn: with several brokers each serves its share of them.
    per_broker = [_channels(address, args.channels) for address in rig.broker_addresses]
    stack_channels = [channel for group in zip(*per_broker, strict=True) for channel in group]
    peer_channels = _channels(worker_address, args.channels)
    try:
        await check_echo(stack_call(stack_channels[0], args.prompt), peer_call(peer_channels[0], args.prompt))
        phases: list[Phase] = []
        probe = cpu_probe(rig)
        for repeat in range(args.repeats):
            for index, concurrency in enumerate(args.concurrency):
                # Alternate which side goes first, so that slow drift of the machine favours neither.
                order = ("stack", "peer") if (repeat + index) % 2 == 0 else ("peer", "stack")
                for target in order:
                    channels, make = (
                        (stack_channels, stack_call) if target == "stack" else (peer_channels, peer_call)
                    )
                    calls = [make(channels[i % len(channels)], args.prompt) for i in range(concurrency)]
                    phase = await run_phase(
                        target, calls, repeat=repeat, warmup=args.warmup, duration=args.duration, probe=probe
                    )
                    phases.append(phase)
                    progress(phase, args.repeats)
                    rig.check_alive()
                    await asyncio.sleep(args.pause)
        return phases
    finally:
        for channel in [*stack_channels, *peer_channels]:
            await channel.close()


def progress(phase: Phase, repeats: int, unit: str = "jobs/s") -> None:
    """One line on stderr per measured phase, as a run goes."""
    errors = f", {phase.errors} errors (first: {phase.first_error})" if phase.errors else ""
    print(
        f"  repeat {phase.repeat + 1}/{repeats}  callers {phase.concurrency:>3}  {phase.target:<5}  "
        f"{phase.jobs_per_s:8.1f} {unit}  p50 {phase.p(50):7.2f} ms  p99 {phase.p(99):7.2f} ms{errors}",
        file=sys.stderr,
        flush=True,
    )


# -- reporting --------------------------------------------------------------------------------------


@dataclass
class Row:
    """Figures over the repeats at one number of callers, keyed by name (e.g. "stack_p50_ms")."""

    concurrency: int
    figures: dict[str, Figure]

    def __getitem__(self, name: str) -> Figure:
        return self.figures.setdefault(name, Figure())


def _pairs(phases: Sequence[Phase], concurrency: int) -> Iterator[tuple[Phase, Phase]]:
    """(stack, peer) of each repeat at one concurrency."""
    level = [p for p in phases if p.concurrency == concurrency]
    for repeat in sorted({p.repeat for p in level}):
        found = {p.target: p for p in level if p.repeat == repeat}
        if "stack" in found and "peer" in found:
            yield found["stack"], found["peer"]


def build_rows(phases: Sequence[Phase], levels: Sequence[int]) -> list[Row]:
    rows = []
    for concurrency in levels:
        row = Row(concurrency, {})
        for stack, peer in _pairs(phases, concurrency):
            row["stack_jobs_per_s"].values.append(stack.jobs_per_s)
            row["peer_jobs_per_s"].values.append(peer.jobs_per_s)
            row["ratio"].values.append(stack.jobs_per_s / peer.jobs_per_s if peer.jobs else math.nan)
            for side, phase in (("stack", stack), ("peer", peer)):
                row[f"{side}_p50_ms"].values.append(phase.p(50))
                row[f"{side}_p99_ms"].values.append(phase.p(99))
                row[f"{side}_errors"].values.append(phase.errors)
                for process in (*PROCESSES, "total"):
                    row[f"{side}_cpu_{process}"].values.append(_cpu_per_job(phase, process))
                row[f"{side}_others_cpus"].values.append(_others_cpus(phase))
            row["added_p50_ms"].values.append(stack.p(50) - peer.p(50))
            row["added_p99_ms"].values.append(stack.p(99) - peer.p(99))
        rows.append(row)
    return rows


def _cpu_per_job(phase: Phase, process: str) -> float:
    if process == "total":
        return sum(phase.cpu_ms_per_job(p) for p in PROCESSES)
    return phase.cpu_ms_per_job(process)


def _others_cpus(phase: Phase) -> float:
    """CPUs kept busy by processes other than the four measured ones (noise on a shared machine)."""
    ours = sum(phase.cpu_s[p] for p in PROCESSES)
    return max(0.0, phase.cpu_s["machine"] - ours) / phase.duration_s


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def latency_table(rows: Sequence[Row]) -> list[str]:
    lines = [
        "| callers | stack jobs/s | peer jobs/s | stack/peer | stack p50 ms | stack p99 ms | peer p50 ms "
        f"| peer p99 ms | added p50 ms | added p99 ms | >= {TARGET_JOBS_PER_S:.0f} jobs/s "
        f"| added p50 <= {TARGET_ADDED_P50_MS:.0f} ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|:---:|",
    ]
    for row in rows:
        cells = [
            str(row.concurrency),
            row["stack_jobs_per_s"].cell(0),
            row["peer_jobs_per_s"].cell(0),
            row["ratio"].cell(2),
            *(row[name].cell(2) for name in ("stack_p50_ms", "stack_p99_ms", "peer_p50_ms", "peer_p99_ms")),
            row["added_p50_ms"].cell(2),
            row["added_p99_ms"].cell(2),
            _verdict(row["stack_jobs_per_s"].median >= TARGET_JOBS_PER_S),
            _verdict(row["added_p50_ms"].median <= TARGET_ADDED_P50_MS),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def cpu_table(rows: Sequence[Row]) -> list[str]:
    names = (*PROCESSES, "total")
    lines = [
        "| callers | path | " + " | ".join(f"{n} ms/job" for n in names) + " | other processes, CPUs |",
        "|---:|:---|" + "---:|" * (len(names) + 1),
    ]
    for row in rows:
        for side in ("stack", "peer"):
            cells = [f"{row[f'{side}_cpu_{n}'].median:.2f}" for n in names]
            cells.append(f"{row[f'{side}_others_cpus'].median:.2f}")
            lines.append(f"| {row.concurrency} | {side} | " + " | ".join(cells) + " |")
    return lines


def verdicts(rows: Sequence[Row], brokers: int = 1) -> list[str]:
    best = max(rows, key=lambda r: r["stack_jobs_per_s"].median)
    lowest = min(rows, key=lambda r: r.concurrency)
    throughput, added = best["stack_jobs_per_s"].median, lowest["added_p50_ms"].median
    return [
        f"- throughput: best end-to-end rate {throughput:.0f} jobs/s (at {best.concurrency} callers) "
        f"vs target >= {TARGET_JOBS_PER_S:.0f}: **{_verdict(throughput >= TARGET_JOBS_PER_S)}**",
        f"- added latency: p50 {added:.2f} ms at {lowest.concurrency} caller(s)"
        f"{' (broker cost alone, no queueing)' if lowest.concurrency == 1 else ''} "
        f"vs target <= {TARGET_ADDED_P50_MS:.0f} ms: "
        f"**{_verdict(added <= TARGET_ADDED_P50_MS)}**",
        "- at more callers the added latency also holds the wait behind the other callers "
        "(Little's law: latency ~ callers / jobs/s), so it grows wherever the stack's rate is below "
        "the peer's.",
        *_capacity(best, brokers),
    ]


def _capacity(row: Row, brokers: int) -> list[str]:
    """What the CPU figures imply, client excluded: the load generator shares the cores here."""
    broker = row["stack_cpu_broker"].median
    server = sum(row[f"stack_cpu_{p}"].median for p in ("broker", "worker", "redis"))
    client = row["stack_cpu_client"].median
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    each = broker / brokers
    return [
        f"- CPU at {row.concurrency} callers: {brokers} broker(s) {broker:.2f} ms/job together, "
        f"{each:.2f} ms per job of the whole stack in each; broker + worker + redis "
        f"{server:.2f} ms/job, so at most {cpus * 1000 / server:.0f} jobs/s on {cpus} CPUs given to the "
        f"server side alone, and at most {brokers * 1000 / broker:.0f} jobs/s for {brokers} broker "
        f"replica(s) of one asyncio thread each; the load generator itself spends {client:.2f} ms/job here.",
    ]


def errors_line(rows: Sequence[Row]) -> str:
    total = {side: sum(sum(r[f"{side}_errors"].values) for r in rows) for side in ("stack", "peer")}
    return f"failed jobs in measured windows: stack {total['stack']:.0f}, peer {total['peer']:.0f}"


# -- machine ----------------------------------------------------------------------------------------


def redis_version() -> str:
    try:
        found = subprocess.run(
            [find_redis_server(), "--version"], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return next((part[2:] for part in found.stdout.split() if part.startswith("v=")), found.stdout.strip())


def describe_machine() -> dict[str, Any]:
    from google.protobuf import __version__ as protobuf_version
    from google.protobuf.internal import api_implementation

    return {
        "nproc": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cgroup_cpu_limit": cpu_quota(),
        "cpu_model": cpu_model(),
        "platform": platform.platform(),
        "load_average_1m": os.getloadavg()[0],
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "protobuf": f"{protobuf_version} ({api_implementation.Type()})",
        "redis_server": redis_version(),
        "velesio": VERSION,
    }


def header(machine: dict[str, Any], args: argparse.Namespace) -> list[str]:
    words = len(args.prompt.split())
    return [
        "## Velesio mesh overhead (echo engine, --echo-delay-ms 0)",
        "",
        f"- machine: nproc {machine['nproc']} (usable {machine['usable_cpus']}, cgroup limit "
        f"{machine['cgroup_cpu_limit']}), CPU {machine['cpu_model']}, {machine['platform']}, "
        f"load average (1 min) {machine['load_average_1m']:.2f} at start, "
        f"{machine.get('load_average_1m_end', math.nan):.2f} at end",
        f"- versions: Python {machine['python']}, grpcio {machine['grpcio']}, "
        f"protobuf {machine['protobuf']}, "
        f"redis-server {machine['redis_server']}, velesio {machine['velesio']}",
        f"- run: callers {', '.join(map(str, args.concurrency))}; {args.repeats} repeat(s) of "
        f"{args.duration:g} s per level after {args.warmup:g} s warm-up; prompt {args.prompt!r} "
        f"({words} words -> {words} deltas + done); {args.channels} client channel(s) per path; "
        f"worker slots {args.slots}; {args.brokers} broker(s); broker/worker log level {args.log_level}",
        "- stack = client -> broker (Inference/Complete) -> Redis queue + event stream -> echo worker; "
        "peer = the same client calling the same worker directly (TextWorker/Generate)",
        f"- note: the load generator (this process, grpc.aio, one asyncio loop), the broker, the worker "
        f"and redis-server all share these {machine['usable_cpus']} CPUs, so both the stack and the "
        "peer are bounded by the client's own CPU too; figures are median (min..max) over repeats",
    ]


# -- entry point ------------------------------------------------------------------------------------


def counts(text: str) -> list[int]:
    """An argparse type: comma-separated counts of callers or streams, e.g. 1,8,64."""
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected numbers like 1,8,64, got {text!r}") from exc
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("counts must be >= 1")
    return levels


def add_load_arguments(parser: argparse.ArgumentParser, *, levels: str, channels: int, who: str) -> None:
    """The options every load benchmark here shares (duration, repeats, callers, prompt, ...)."""
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per level and path")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each window")
    parser.add_argument("--repeats", type=int, default=3, help="runs of every level; figures are medians")
    parser.add_argument(
        "--concurrency", type=counts, default=levels, help="comma-separated numbers of callers"
    )
    parser.add_argument("--prompt", default="the quick brown fox", help="prompt each job sends")
    parser.add_argument("--channels", type=int, default=channels, help="gRPC connections of the direct path")
    parser.add_argument("--slots", type=int, default=64, help="slots of the echo worker")
    parser.add_argument("--log-level", default="INFO", help=f"log level of {who} (INFO is their default)")
    parser.add_argument("--pause", type=float, default=0.3, help="seconds of rest between phases")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write raw numbers here")
    parser.add_argument("--logs", type=Path, default=None, metavar="DIR", help=f"keep the logs of {who} here")


def check_load_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.duration <= 0 or args.warmup < 0 or args.repeats < 1 or args.channels < 1:
        parser.error("--duration must be > 0, --warmup >= 0, --repeats >= 1, --channels >= 1")
    if args.slots < max(args.concurrency):
        parser.error(f"--slots {args.slots} is below the largest caller count {max(args.concurrency)}")
    if not args.prompt.strip():
        parser.error("--prompt must not be empty")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.mesh_overhead",
        description=(
            "Measure the broker's overhead with the zero-cost echo engine: end-to-end jobs/s and p50/p99 "
            "added latency (whole stack minus the same worker called directly), at several numbers of "
            "concurrent callers. Starts its own redis-server, broker and echo worker processes on free "
            "ports and stops them at the end. Targets (DESIGN.md): >= 500 jobs/s end to end on 2 cores, "
            "p50 added latency <= 5 ms."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_load_arguments(parser, levels="1,8,64", channels=2, who="the broker and worker")
    parser.add_argument(
        "--brokers",
        type=int,
        default=1,
        help="broker replicas on the one Redis; the stack's callers are spread over them",
    )
    args = parser.parse_args(argv)
    check_load_arguments(parser, args)
    if args.brokers < 1:
        parser.error("--brokers must be >= 1")
    return args


def report_server_errors(rig: Rig, lines: int = 60) -> None:
    """Some jobs failed: show what the broker and the worker logged about it."""
    for child in rig.children:
        logged = child.log_text(200_000).splitlines()
        first = next((i for i, line in enumerate(logged) if "ERROR" in line or "Traceback" in line), None)
        if first is not None:
            excerpt = "\n".join(logged[first : first + lines])
            print(f"--- {child.name} log, from its first error:\n{excerpt}", file=sys.stderr)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def write_json(
    path: Path, machine: dict[str, Any], args: argparse.Namespace, phases: Sequence[Phase]
) -> None:
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    raw = {
        "machine": machine,
        "options": options,
        "targets": {"jobs_per_s": TARGET_JOBS_PER_S, "added_p50_ms": TARGET_ADDED_P50_MS},
        "phases": [{**p.summary(), "latencies_ms": [round(x, 4) for x in p.latencies_ms]} for p in phases],
        "rows": [
            {
                "concurrency": r.concurrency,
                **{k: asdict(f) | {"median": f.median} for k, f in r.figures.items()},
            }
            for r in build_rows(phases, args.concurrency)
        ],
    }
    path.write_text(json.dumps(raw, indent=1, allow_nan=True) + "\n")


def results(rows: Sequence[Row]) -> list[Result]:
    """Throughput at every number of callers (the best one held against the target), and the latency
    the broker adds at the fewest callers."""
    best = max(rows, key=lambda r: r["stack_jobs_per_s"].median)
    lowest = min(rows, key=lambda r: r.concurrency)
    found = []
    for row in rows:
        value, peer, ratio, added = paired(
            list(zip(row["stack_jobs_per_s"].values, row["peer_jobs_per_s"].values, strict=True))
        )
        found.append(
            Result(
                "mesh_overhead",
                f"echo jobs end to end, {callers(row.concurrency)}",
                "jobs/s",
                value,
                digits=0,
                peer="the echo worker called directly",
                peer_value=peer,
                ratio=ratio,
                added=added,
                target=Target("value", ">=", TARGET_JOBS_PER_S) if row is best else None,
            )
        )
    value, peer, ratio, added = paired(
        list(zip(lowest["stack_p50_ms"].values, lowest["peer_p50_ms"].values, strict=True))
    )
    found.append(
        Result(
            "mesh_overhead",
            f"p50 latency of an echo job, {callers(lowest.concurrency)}",
            "ms",
            value,
            digits=2,
            peer="the echo worker called directly",
            peer_value=peer,
            ratio=ratio,
            added=added,
            target=Target("added", "<=", TARGET_ADDED_P50_MS),
        )
    )
    return found


def run(argv: Sequence[str] | None = None) -> Outcome:
    """Measures and prints the report; returns the figures. Raises when the measurement fails."""
    args = parse_args(argv)
    machine = describe_machine()
    print(f"starting redis-server, broker and echo worker ({' '.join(velesio_command())})", file=sys.stderr)
    with (
        tempfile.TemporaryDirectory(prefix="velesio-bench-") as tmp,
        Rig(args.logs or Path(tmp), slots=args.slots, log_level=args.log_level, brokers=args.brokers) as rig,
    ):
        phases = asyncio.run(measure(rig, args))
        if any(phase.errors for phase in phases):
            report_server_errors(rig)
    machine["load_average_1m_end"] = os.getloadavg()[0]
    rows = build_rows(phases, args.concurrency)
    report = [
        *header(machine, args),
        "",
        *latency_table(rows),
        "",
        *verdicts(rows, args.brokers),
        f"- {errors_line(rows)}",
        "",
        "CPU per completed job in the measured windows, by process (ms, median over repeats; client = this "
        "load generator; the last column is how many CPUs other processes on the machine kept busy "
        "meanwhile, i.e. noise):",
        "",
        *cpu_table(rows),
    ]
    print("\n".join(report))
    if args.json is not None:
        write_json(args.json, machine, args, phases)
        print(f"\nraw numbers written to {args.json}", file=sys.stderr)
    return Outcome("mesh_overhead", results(rows), "\n".join(report))


def cli(run: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> int:
    """A benchmark's `main()`: runs it, and turns Ctrl-C / SIGTERM and start-up failures into exit codes
    (every process it started is stopped by then)."""
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        run(argv)
    except KeyboardInterrupt:
        print("interrupted; every process this benchmark started has been stopped", file=sys.stderr)
        return 130
    except (RuntimeError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
