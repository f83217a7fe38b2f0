"""Failure drills: real `velesio broker` and `velesio llm-worker` processes (echo engine) on the test Redis,
killed, stopped and frozen while they serve. Each drill checks what the client sees, that no accepted job
is lost or runs twice at once, and that the cluster serves normally afterwards."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import grpc
import httpx
import pytest
import redis.asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from launcher.embedded_redis import EmbeddedRedis
from launcher.spawn import AsyncSpawned, spawn_async, velesio_argv
from mesh.keys import Keys
from mesh.ports import free_port
from tests.helpers import CHILD_ENV, collect, complete, eventually, inference, kinds, text_of
from velesio.v1 import common_pb2, events_pb2, inference_pb2, inference_pb2_grpc

pytestmark = [pytest.mark.slow, pytest.mark.drill]

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]
CALL_TIMEOUT_S = 20.0
ENDED = (common_pb2.JOB_STATE_SUCCEEDED, common_pb2.JOB_STATE_FAILED, common_pb2.JOB_STATE_CANCELLED)
LONG_PROMPT = " ".join(f"word{i}" for i in range(80))  # 80 tokens: 8 s at 100 ms each
PROMPT = "the quick brown fox jumps over the lazy dog"


Event = events_pb2.JobEvent
Stub: TypeAlias = "inference_pb2_grpc.InferenceAsyncStub"  # exists in the stubs only


@dataclass
class Proc:
    """One velesio process started by a drill."""

    name: str
    process: asyncio.subprocess.Process
    log: Path
    address: str

    def send(self, sig: signal.Signals) -> None:
        self.process.send_signal(sig)

    async def exit_code(self, limit_s: float) -> int:
        return await asyncio.wait_for(self.process.wait(), limit_s)

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


class Processes:
    """Starts brokers and echo workers as child processes under the test's key prefix; kills them all."""

    def __init__(self, redis_url: str, keys: Keys, client: redis.asyncio.Redis, logs: Path) -> None:
        self.redis_url = redis_url
        self.keys = keys
        self.client = client
        self.logs = logs
        self.started: list[Proc] = []
        self._spawned: list[AsyncSpawned] = []

    async def broker(self, broker_id: str, **flags: object) -> Proc:
        """A broker replica, ready when its gRPC health check answers SERVING."""
        port = free_port()
        address = f"127.0.0.1:{port}"
        options = {**self._common(), "broker_id": broker_id, "grpc_port": port, **flags}
        proc = await self._spawn(f"broker-{broker_id}", "broker", address, **options)
        await self._until(proc, lambda: _serving(address))
        return proc

    async def worker(self, worker_id: str, **flags: object) -> Proc:
        """An echo text worker (whatever the default model is), ready when its registration is in Redis."""
        port = free_port()
        options = {**self._common(), "model": "echo", "worker_id": worker_id, "port": port, **flags}
        proc = await self._spawn(f"worker-{worker_id}", "llm-worker", f"127.0.0.1:{port}", **options)
        await self._until(proc, lambda: self.registered(worker_id))
        return proc

    async def edge(self, broker: Proc) -> Proc:
        """A REST edge in front of `broker`, ready when its /healthz answers."""
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = await self._spawn(
            "edge", "edge", url, http_port=port, broker_addr=broker.address, metrics_port=0
        )

        async def healthy() -> bool:
            async with httpx.AsyncClient(base_url=url, timeout=1.0) as client:
                try:
                    return (await client.get("/healthz")).status_code == 200
                except httpx.HTTPError:
                    return False

        await self._until(proc, healthy)
        return proc

    async def registered(self, worker_id: str) -> bool:
        return bool(await self.client.exists(self.keys.worker(worker_id)))

    def _common(self) -> dict[str, object]:
        # No /metrics: the default port would collide between replicas.
        return {"redis_url": self.redis_url, "key_prefix": self.keys.prefix, "grace_s": 3, "metrics_port": 0}

    async def _spawn(self, name: str, command: str, address: str, **options: object) -> Proc:
        argv = velesio_argv(command, **options)
        spawned = await spawn_async(name, argv, self.logs / f"{name}.log", env=CHILD_ENV)
        self._spawned.append(spawned)
        proc = Proc(name, spawned.process, spawned.log, address)
        self.started.append(proc)
        return proc

    async def _until(self, proc: Proc, ready: Callable[[], Awaitable[bool]], limit_s: float = 15.0) -> None:
        give_up = time.monotonic() + limit_s
        while not await ready():
            if proc.process.returncode is not None:
                raise AssertionError(f"{proc.name} exited with {proc.process.returncode}:\n{proc.log_tail()}")
            if time.monotonic() > give_up:
                raise AssertionError(f"{proc.name} not ready in {limit_s}s:\n{proc.log_tail()}")
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        for proc in self.started:
            if proc.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.process.send_signal(signal.SIGCONT)
                    proc.process.kill()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.process.wait(), 10)
        for spawned in self._spawned:
            await spawned.stop(1)  # killed above: closes its log
        for proc in self.started:  # shown by pytest only when the test failed
            print(f"----- {proc.name} (exit {proc.process.returncode}) -----\n{proc.log_tail()}")


async def _serving(address: str) -> bool:
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=0.5
            )
        except grpc.aio.AioRpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


@pytest.fixture
async def procs(
    redis_url: str, keys: Keys, redis_client: redis.asyncio.Redis, tmp_path: Path
) -> AsyncIterator[Processes]:
    started = Processes(redis_url, keys, redis_client, tmp_path)
    try:
        yield started
    finally:
        await started.close()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A redis-server of this test's own (the session one must not restart), with an append-only file so
    that what it held survives a restart on the same port."""
    server = EmbeddedRedis(tmp_path / "own-redis", persist=True)
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def own_procs(own_redis: EmbeddedRedis, keys: Keys, tmp_path: Path) -> AsyncIterator[Processes]:
    """Like `procs`, on `own_redis`."""
    client = redis.asyncio.Redis.from_url(own_redis.url)
    started = Processes(own_redis.url, keys, client, tmp_path)
    try:
        yield started
    finally:
        await started.close()
        await client.aclose()


# -- reading and judging job event streams ---------------------------------------------------------------


async def read_until(call: Any, stop: Callable[[list[Event]], bool]) -> list[Event]:
    """Events of a streaming call up to the first moment `stop(events so far)` holds."""
    events: list[Event] = []
    while not stop(events):
        response = await call.read()
        assert response is not grpc.aio.EOF, f"stream ended early: {kinds(events)}"
        events.append(response.event)
    return events


def tokens(count: int) -> Callable[[list[Event]], bool]:
    return lambda events: kinds(events).count("token") >= count


def has_started(events: list[Event]) -> bool:
    return "started" in kinds(events)


def check_runs(events: Sequence[Event]) -> list[events_pb2.JobStarted]:
    """A job's stream shows one run at a time: a new 'started' only after the previous run was put back
    in the queue, attempts increasing, output only inside a run, and exactly one final event, the last."""
    names = kinds(events)
    running = False
    runs: list[events_pb2.JobStarted] = []
    for event, name in zip(events, names, strict=True):
        if name == "started":
            assert not running, f"started again while a run was going on: {names}"
            running = True
            runs.append(event.started)
        elif name == "queued":
            running = False
        elif name == "token":
            assert running, f"output outside a run: {names}"
    attempts = [run.attempt for run in runs]
    assert attempts == sorted(set(attempts)), f"attempts not increasing: {attempts}"
    assert names.count("done") <= 1
    assert names.count("done") + names.count("error") == 1, names
    assert names[-1] in ("done", "error"), names
    return runs


def describe(events: Sequence[Event]) -> str:
    """The event kinds, with the runs' workers and the error, for assertion messages."""
    shown = [
        f"started({e.started.worker_id}#{e.started.attempt})" if k == "started" else k
        for k, e in zip(kinds(events), events, strict=True)
    ]
    error = events[-1].error if events and events[-1].HasField("error") else None
    return " ".join(shown) + (f" [{error.code}: {error.message}]" if error else "")


async def watch(stub: Stub, job_id: str) -> list[Event]:
    """Every event of the job from its start, until its final one."""
    return await collect(stub.Watch(inference_pb2.WatchRequest(job_id=job_id), timeout=CALL_TIMEOUT_S))


async def submit(stub: Stub, prompt: str, model: str = "") -> str:
    request = inference_pb2.SubmitRequest(complete=inference_pb2.CompleteRequest(model=model, prompt=prompt))
    return (await stub.Submit(request, timeout=CALL_TIMEOUT_S)).job_id


async def job(stub: Stub, job_id: str) -> inference_pb2.Job:
    return (await stub.GetJob(inference_pb2.GetJobRequest(job_id=job_id), timeout=CALL_TIMEOUT_S)).job


async def worker_ids(stub: Stub) -> set[str]:
    cluster = await stub.GetCluster(inference_pb2.GetClusterRequest(), timeout=CALL_TIMEOUT_S)
    return {w.worker_id for w in cluster.workers}


async def serves_normally(stub: Stub, prompt: str = "still serving after the drill") -> None:
    request = inference_pb2.CompleteRequest(model="echo", prompt=prompt)
    events = await collect(stub.Complete(request, timeout=CALL_TIMEOUT_S))
    assert kinds(events)[-1] == "done", describe(events)
    assert text_of(events) == prompt


async def nothing_held(client: redis.asyncio.Redis, keys: Keys, worker_ids: Sequence[str]) -> bool:
    """No lease is left and no worker slot is held in Redis."""
    busy = [await client.hlen(keys.worker_busy(w)) for w in worker_ids]
    return await client.zcard(keys.leases()) == 0 and not any(busy)


# -- the drills ------------------------------------------------------------------------------------------


def resumed_once(events: Sequence[Event], text: str) -> None:
    """The stream goes on after a failure: every character of `text` exactly once, in order, the seam
    marked right after the second run's start, counting what came before it."""
    assert kinds(events)[-1] == "done", describe(events)
    assert text_of(events) == text, describe(events)
    names = kinds(events)
    seam = names.index("resumed")
    assert names[seam - 1] == "started" and events[seam - 1].started.attempt == 2, describe(events)
    before = "".join(e.token.text for e in events[:seam] if e.HasField("token"))
    assert events[seam].resumed.delivered_tokens == len(before) > 0  # echo tokens are characters


async def test_worker_killed_mid_stream_the_job_goes_on_on_another_worker(
    procs: Processes, redis_client: redis.asyncio.Redis, keys: Keys
) -> None:
    broker = await procs.broker("a")
    doomed = await procs.worker("w1", echo_delay_ms=100, slots=1, heartbeat_s=1)
    channel, stub = inference(broker.address)
    async with channel:
        streaming = stub.Complete(complete(LONG_PROMPT), timeout=CALL_TIMEOUT_S)
        before = await read_until(streaming, tokens(3))
        doomed.send(signal.SIGKILL)
        assert await doomed.exit_code(5) == -signal.SIGKILL
        await procs.worker("w2", echo_delay_ms=5)

        events = before + await collect(streaming)
        resumed_once(events, LONG_PROMPT)
        assert [(run.worker_id, run.attempt) for run in check_runs(events)] == [("w1", 1), ("w2", 2)]
        job_id = events[0].job_id
        assert (await job(stub, job_id)).state == common_pb2.JOB_STATE_SUCCEEDED
        # Watched again from its start, the job tells the same story.
        assert [e.event_id for e in await watch(stub, job_id)] == [e.event_id for e in events]
        await serves_normally(stub)
        await eventually(lambda: nothing_held(redis_client, keys, ["w1", "w2"]), 3)


async def test_worker_killed_before_output_job_runs_on_another_worker(
    procs: Processes, redis_client: redis.asyncio.Redis, keys: Keys
) -> None:
    broker = await procs.broker("a")
    doomed = await procs.worker("w1", echo_delay_ms=100, slots=2, heartbeat_s=2)
    channel, stub = inference(broker.address)
    async with channel:
        # Frozen, the worker is still registered and takes the job, but cannot produce anything for it.
        doomed.send(signal.SIGSTOP)
        silent_id = await submit(stub, PROMPT)
        silent = stub.Watch(inference_pb2.WatchRequest(job_id=silent_id), timeout=CALL_TIMEOUT_S)
        before = await read_until(silent, has_started)
        assert before[-1].started.worker_id == "w1"
        doomed.send(signal.SIGKILL)

        async def dropped() -> bool:
            return "w1" not in await worker_ids(stub)

        await eventually(dropped, 4, 0.1)
        await procs.worker("w2", echo_delay_ms=5)
        events = before + await collect(silent)
        runs = check_runs(events)
        assert kinds(events)[-1] == "done", describe(events)
        assert text_of(events) == PROMPT
        assert runs[0].worker_id == "w1"
        assert runs[-1].worker_id == "w2"
        assert (await job(stub, silent_id)).state == common_pb2.JOB_STATE_SUCCEEDED
        await serves_normally(stub)
        await eventually(lambda: nothing_held(redis_client, keys, ["w1", "w2"]), 3)


async def test_broker_killed_jobs_finish_through_the_other(
    procs: Processes, redis_client: redis.asyncio.Redis, keys: Keys
) -> None:
    first, second = await asyncio.gather(procs.broker("a", lease_s=2), procs.broker("b", lease_s=2))
    # Every job names its model: one naming none gets whichever model the broker happens to know first.
    await asyncio.gather(
        procs.worker("w1", echo_delay_ms=100, slots=2),
        # One word at a time, 4 s each: a job it takes has produced nothing for a while.
        procs.worker("slow", model_id="slow", echo_delay_ms=4000, slots=1),
    )
    channel_a, stub_a = inference(first.address)
    channel_b, stub_b = inference(second.address)
    async with channel_a, channel_b:
        # The second broker is frozen while the first takes the jobs, so that who runs what is known.
        second.send(signal.SIGSTOP)
        try:
            running = [await submit(stub_a, f"running {i} {LONG_PROMPT}", model="echo") for i in range(2)]
            silent = await submit(stub_a, "silent", model="slow")
            queued = [await submit(stub_a, f"queued {i} {PROMPT}", model="echo") for i in range(3)]
            watches = [
                stub_a.Watch(inference_pb2.WatchRequest(job_id=j), timeout=CALL_TIMEOUT_S) for j in running
            ]
            for call in watches:
                await read_until(call, tokens(2))
                call.cancel()

            async def taken_by_first() -> bool:
                owners = [await redis_client.hget(keys.job(j), "broker") for j in [*running, silent]]
                return owners == [b"a"] * 3

            await eventually(taken_by_first, 3)
            states = [(await job(stub_a, j)).state for j in queued]
            assert states == [common_pb2.JOB_STATE_QUEUED] * len(queued)
        finally:
            second.send(signal.SIGCONT)

        watching = {j: asyncio.create_task(watch(stub_b, j)) for j in [*running, silent, *queued]}
        await asyncio.sleep(0.2)  # the watches are live on the second broker when the first dies
        first.send(signal.SIGKILL)
        assert await first.exit_code(5) == -signal.SIGKILL
        streams = dict(zip(watching, await asyncio.gather(*watching.values()), strict=True))

        for job_id, events in streams.items():
            runs = check_runs(events)
            final = events[-1]
            if final.HasField("error"):
                assert final.error.code == UNAVAILABLE, (job_id, final.error)
                assert final.error.message, job_id
            else:
                assert (await job(stub_b, job_id)).state == common_pb2.JOB_STATE_SUCCEEDED
            assert (await job(stub_b, job_id)).attempts == len(runs)
        for job_id in running:  # output had reached the client: the job goes on after it, on the other broker
            events = streams[job_id]
            resumed_once(events, f"running {running.index(job_id)} {LONG_PROMPT}")
            assert (await job(stub_b, job_id)).state == common_pb2.JOB_STATE_SUCCEEDED
        events = streams[silent]  # nothing had been produced: re-queued, run again, by the other broker
        assert [run.attempt for run in check_runs(events)] == [1, 2], describe(events)
        second_run = [i for i, name in enumerate(kinds(events)) if name == "started"][1]
        assert "token" not in kinds(events)[:second_run], describe(events)
        assert kinds(events)[-1] == "done", describe(events)
        assert text_of(events) == "silent"
        for i, job_id in enumerate(queued):
            events = streams[job_id]
            assert kinds(events)[-1] == "done", describe(events)
            assert text_of(events) == f"queued {i} {PROMPT}"
        owners = [await redis_client.hget(keys.job(j), "broker") for j in [silent, *queued]]
        assert owners == [b"b"] * 4, "the surviving broker ran what was left"

        await serves_normally(stub_b)
        await eventually(lambda: nothing_held(redis_client, keys, ["w1", "slow"]), 3)


async def test_the_brokers_running_and_serving_a_job_both_killed_the_client_goes_on_from_a_third(
    procs: Processes,
) -> None:
    """Broker a runs the job, broker b streams it to the client; both die mid-stream. The client watches on
    from its last event id through broker c, which reclaims the job; the job goes on from what was
    delivered, and the client gets every character exactly once."""
    a, b, c = await asyncio.gather(*(procs.broker(name, lease_s=2) for name in "abc"))
    await procs.worker("w1", echo_delay_ms=100, slots=1)
    channels = {name: inference(broker.address) for name, broker in zip("abc", (a, b, c), strict=True)}
    try:
        b.send(signal.SIGSTOP)
        c.send(signal.SIGSTOP)  # so that a takes the job
        try:
            job_id = await submit(channels["a"][1], LONG_PROMPT)
            first = channels["a"][1].Watch(inference_pb2.WatchRequest(job_id=job_id), timeout=CALL_TIMEOUT_S)
            await read_until(first, tokens(1))
            first.cancel()
        finally:
            b.send(signal.SIGCONT)
            c.send(signal.SIGCONT)
        watching = channels["b"][1].Watch(inference_pb2.WatchRequest(job_id=job_id), timeout=CALL_TIMEOUT_S)
        seen = await read_until(watching, tokens(3))
        a.send(signal.SIGKILL)
        b.send(signal.SIGKILL)
        after = seen[-1].event_id
        rest = await collect(
            channels["c"][1].Watch(
                inference_pb2.WatchRequest(job_id=job_id, after_event_id=after), timeout=CALL_TIMEOUT_S
            )
        )
        events = seen + rest
        resumed_once(events, LONG_PROMPT)
        assert len({e.event_id for e in events}) == len(events)  # nothing twice
    finally:
        for channel, _ in channels.values():
            await channel.close()


async def test_worker_sigterm_deregisters_at_once_and_exits_cleanly(procs: Processes) -> None:
    broker = await procs.broker("a")
    worker = await procs.worker("w1", echo_delay_ms=50, heartbeat_s=3, grace_s=5)
    channel, stub = inference(broker.address)
    async with channel:
        prompt = " ".join(f"w{i}" for i in range(20))
        streaming = stub.Complete(complete(prompt), timeout=CALL_TIMEOUT_S)
        before = await read_until(streaming, tokens(2))

        worker.send(signal.SIGTERM)
        sent = time.monotonic()

        async def gone() -> bool:
            return not await procs.registered("w1")

        await eventually(gone, 1, 0.01)
        assert time.monotonic() - sent < 1
        assert "w1" not in await worker_ids(stub)

        events = before + await collect(streaming)  # the job it was running still finishes
        assert kinds(events)[-1] == "done", describe(events)
        assert text_of(events) == prompt
        assert await worker.exit_code(8) == 0

        await procs.worker("w2", echo_delay_ms=1)
        await serves_normally(stub)


async def test_worker_sigterm_hands_back_what_outlasts_its_grace(procs: Processes) -> None:
    """Scale-down mid-stream: the stopping worker lets its job run for its grace period, then hands it back,
    and another worker goes on from what was delivered; the client's stream never breaks."""
    broker = await procs.broker("a")
    leaving = await procs.worker("w1", echo_delay_ms=100, heartbeat_s=3, grace_s=1)
    channel, stub = inference(broker.address)
    async with channel:
        streaming = stub.Complete(complete(LONG_PROMPT), timeout=CALL_TIMEOUT_S)  # 8 s of output
        before = await read_until(streaming, tokens(2))
        await procs.worker("w2", echo_delay_ms=5)
        leaving.send(signal.SIGTERM)
        events = before + await collect(streaming)
        resumed_once(events, LONG_PROMPT)
        assert [(run.worker_id, run.attempt) for run in check_runs(events)] == [("w1", 1), ("w2", 2)]
        assert await leaving.exit_code(8) == 0


async def test_broker_sigterm_exits_cleanly_and_closes_its_port(
    procs: Processes, redis_client: redis.asyncio.Redis, keys: Keys
) -> None:
    broker = await procs.broker("a", grace_s=5)
    await procs.worker("w1", echo_delay_ms=50)
    port = int(broker.address.rpartition(":")[2])
    assert await redis_client.zscore(keys.brokers(), "a") is not None
    channel, stub = inference(broker.address)
    async with channel:
        prompt = " ".join(f"w{i}" for i in range(20))
        streaming = stub.Complete(complete(prompt), timeout=CALL_TIMEOUT_S)
        before = await read_until(streaming, tokens(2))
        broker.send(signal.SIGTERM)
        events = before + await collect(streaming)  # its stream in flight is served to the end
        assert kinds(events)[-1] == "done", describe(events)
        assert text_of(events) == prompt
        assert await broker.exit_code(8) == 0

    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)
    assert not await _serving(broker.address)
    assert await redis_client.zscore(keys.brokers(), "a") is None

    replacement = await procs.broker("b")
    channel, stub = inference(replacement.address)
    async with channel:
        await serves_normally(stub)


async def test_stalled_worker_leaves_the_registry_and_its_job_goes_on_when_it_is_back(
    procs: Processes, redis_client: redis.asyncio.Redis, keys: Keys
) -> None:
    broker = await procs.broker("a", lease_s=3)  # leases, and the check on their workers, every second
    worker = await procs.worker("w1", echo_delay_ms=50, heartbeat_s=1)
    channel, stub = inference(broker.address)
    async with channel:
        assert await worker_ids(stub) == {"w1"}
        prompt = " ".join(f"w{i}" for i in range(20))
        streaming = stub.Complete(complete(prompt), timeout=CALL_TIMEOUT_S)
        before = await read_until(streaming, tokens(2))
        worker.send(signal.SIGSTOP)
        stalled = time.monotonic()
        try:

            async def gone() -> bool:
                return "w1" not in await worker_ids(stub) and not await procs.registered("w1")

            await eventually(gone, 4, 0.1)
            assert time.monotonic() - stalled < 4
            # With no worker registered, a new job is refused outright rather than queued for nobody.
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await submit(stub, PROMPT)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

            # The job that had delivered output waits in its queue to go on from there.
            async def requeued() -> bool:
                return bool(await redis_client.zcard(keys.queue("text", "echo")) == 1)

            await eventually(requeued, 4, 0.1)
        finally:
            worker.send(signal.SIGCONT)
        events = before + await collect(streaming)
        resumed_once(events, prompt)
        assert [(run.worker_id, run.attempt) for run in check_runs(events)] == [("w1", 1), ("w1", 2)]

        async def back() -> bool:
            return "w1" in await worker_ids(stub)

        await eventually(back, 8, 0.05)
        await serves_normally(stub)
        await eventually(lambda: nothing_held(redis_client, keys, ["w1"]), 3)


# -- Redis restarted under load --------------------------------------------------------------------------


@dataclass
class Traffic:
    """What callers saw while they loaded the cluster: the jobs it accepted (id -> prompt), the final
    outcome of every call, and when each stream loop last succeeded."""

    accepted: dict[str, str] = field(default_factory=dict)
    outcomes: list[str] = field(default_factory=list)
    done_at: dict[str, float] = field(default_factory=dict)

    def refused(self) -> list[str]:
        return [o for o in self.outcomes if o != "done"]


async def stream_loop(stub: Stub, name: str, traffic: Traffic, stop: asyncio.Event) -> None:
    """Inference/Complete again and again; each call ends done (with its own prompt back) or with an error
    the caller can see, which is recorded."""
    for i in itertools.count():
        if stop.is_set():
            return
        prompt = f"{name} job {i} a b c d e f g h"
        events: list[Event] = []
        try:
            request = inference_pb2.CompleteRequest(model="echo", prompt=prompt)
            async for response in stub.Complete(request, timeout=CALL_TIMEOUT_S):
                if not events:
                    traffic.accepted[response.event.job_id] = prompt
                events.append(response.event)
        except grpc.aio.AioRpcError as exc:
            broke = f" (mid-stream, after {describe(events)})" if events else ""
            traffic.outcomes.append(f"{exc.code().name}: {exc.details()}{broke}")
            await asyncio.sleep(0.1)
            continue
        final = events[-1] if events else None
        if final is not None and final.HasField("done"):
            assert text_of(events) == prompt, describe(events)
            traffic.outcomes.append("done")
            traffic.done_at[name] = time.monotonic()
        elif final is not None and final.HasField("error"):
            code = next((c.name for c in grpc.StatusCode if c.value[0] == final.error.code), "?")
            traffic.outcomes.append(f"{code}: {final.error.message} (error event after {describe(events)})")
        else:
            traffic.outcomes.append(f"no final event: {describe(events)}")


async def submit_loop(stub: Stub, traffic: Traffic, stop: asyncio.Event) -> None:
    for i in itertools.count():
        if stop.is_set():
            return
        prompt = f"submitted {i} a b c"
        try:
            traffic.accepted[await submit(stub, prompt, model="echo")] = prompt
        except grpc.aio.AioRpcError as exc:
            traffic.outcomes.append(f"{exc.code().name}: {exc.details()}")
        await asyncio.sleep(0.05)


async def test_redis_restart_under_load_streams_wait_and_every_accepted_job_finishes(
    own_procs: Processes, own_redis: EmbeddedRedis, keys: Keys
) -> None:
    broker = await own_procs.broker("a", lease_s=2)
    await own_procs.worker("w1", echo_delay_ms=30, slots=8, heartbeat_s=2)
    channel, stub = inference(broker.address)
    traffic, stop = Traffic(), asyncio.Event()
    async with channel:
        loops = [asyncio.create_task(stream_loop(stub, f"s{i}", traffic, stop)) for i in range(4)]
        loops.append(asyncio.create_task(submit_loop(stub, traffic, stop)))
        try:
            await eventually(lambda: _true(traffic.outcomes.count("done") >= 8), 10)
            some_job = next(iter(traffic.accepted))
            own_redis.stop()  # SIGTERM: redis-server writes its append-only file and exits
            for call in (submit(stub, PROMPT, model="echo"), job(stub, some_job), watch(stub, some_job)):
                with pytest.raises(grpc.aio.AioRpcError) as down:
                    await call
                assert down.value.code() == grpc.StatusCode.UNAVAILABLE, down.value.details()
            await asyncio.sleep(0.5)
            await asyncio.to_thread(own_redis.start)  # the same port and data directory
            back = time.monotonic()

            async def every_stream_served_again() -> bool:
                return all(traffic.done_at.get(f"s{i}", 0) > back for i in range(4))

            await eventually(every_stream_served_again, 20, 0.1)
        finally:
            stop.set()
            await asyncio.gather(*loops)
            print("outcomes:", collections.Counter(o[:60] for o in traffic.outcomes))

        for outcome in traffic.refused():  # calls made while Redis was down; none broken mid-stream
            assert outcome.startswith("UNAVAILABLE: "), outcome
            assert "mid-stream" not in outcome and "error event" not in outcome, outcome

        async def all_ended() -> bool:
            states = [(await job(stub, j)).state for j in traffic.accepted]
            return all(state in ENDED for state in states)

        await eventually(all_ended, 15, 0.2)
        for job_id, prompt in traffic.accepted.items():  # every accepted job lived through the restart
            events = await watch(stub, job_id)
            check_runs(events)
            assert events[-1].HasField("done"), (job_id, describe(events))
            assert text_of(events) == prompt, describe(events)

        await serves_normally(stub)
        assert await worker_ids(stub) == {"w1"}
    async with redis.asyncio.Redis.from_url(own_redis.url) as client:  # one that saw no restart
        await eventually(lambda: nothing_held(client, keys, ["w1"]), 5)


async def _true(value: bool) -> bool:
    return value


# -- a full queue ----------------------------------------------------------------------------------------


async def test_full_queue_refuses_clearly_loses_nothing_and_drains(
    procs: Processes, redis_client: redis.asyncio.Redis, keys: Keys, edge_client: Callable[..., Any]
) -> None:
    bound = 20
    broker = await procs.broker("a", max_queue_depth=bound)
    # Frozen (and registered for long enough), the worker holds its only slot with the first job while the
    # queue fills behind it.
    worker = await procs.worker("w1", echo_delay_ms=10, slots=1, heartbeat_s=30)
    channel, stub = inference(broker.address)
    async with channel:
        worker.send(signal.SIGSTOP)
        try:
            blocker = await submit(stub, PROMPT, model="echo")

            async def running() -> bool:
                return (await job(stub, blocker)).state == common_pb2.JOB_STATE_RUNNING

            await eventually(running, 5)
            prompts = {}
            for i in range(bound):
                prompts[await submit(stub, f"queued {i} {PROMPT}", model="echo")] = f"queued {i} {PROMPT}"
            positions = [(await job(stub, j)).queue_position for j in prompts]
            assert positions == list(range(bound))
            await _refused_everywhere(stub, edge_client, broker, bound)
            assert await redis_client.zcard(keys.queue("text", "echo")) == bound  # the refused left no trace
        finally:
            worker.send(signal.SIGCONT)

        # Nothing accepted is lost: every job runs once, in the order it was queued.
        for job_id, prompt in {blocker: PROMPT, **prompts}.items():
            events = await watch(stub, job_id)
            assert [run.attempt for run in check_runs(events)] == [1], describe(events)
            assert kinds(events)[-1] == "done" and text_of(events) == prompt, describe(events)
        started = [(await job(stub, j)).started_at.ToMilliseconds() for j in [blocker, *prompts]]
        assert started == sorted(started)

        # Drained: room again, and the cluster serves as before.
        assert await redis_client.zcard(keys.queue("text", "echo")) == 0
        await submit(stub, "room again", model="echo")
        await serves_normally(stub)
        await eventually(lambda: nothing_held(redis_client, keys, ["w1"]), 3)


async def _refused_everywhere(stub: Stub, edge_client: Callable[..., Any], broker: Proc, bound: int) -> None:
    """A full queue refuses at once, the same way through every door, and says when to try again."""
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await submit(stub, "one too many", model="echo")
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.value.details() == f"the text queue of model 'echo' is full ({bound} jobs)"
    assert ("retry-after", "1") in tuple(refused.value.trailing_metadata() or ())
    with pytest.raises(grpc.aio.AioRpcError) as streamed:
        await collect(stub.Complete(inference_pb2.CompleteRequest(model="echo", prompt="x"), timeout=5))
    assert streamed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    edge = await edge_client(broker.address)
    body = {"model": "echo", "messages": [{"role": "user", "content": "x"}]}
    reply = await edge.post("/v1/chat/completions", json=body)
    assert reply.status_code == 429, reply.text
    assert reply.headers["retry-after"] == "1"
    assert "is full" in reply.json()["error"]["message"]


# -- a client that goes away mid-stream ------------------------------------------------------------------


async def test_client_gone_mid_stream_cancels_the_job_and_frees_the_slot(
    procs: Processes, redis_client: redis.asyncio.Redis, keys: Keys
) -> None:
    broker = await procs.broker("a")
    await procs.worker("w1", echo_delay_ms=100, slots=1)  # one slot: the next job runs only once it is free
    edge = await procs.edge(broker)
    channel, stub = inference(broker.address)
    async with channel, httpx.AsyncClient(base_url=edge.address, timeout=CALL_TIMEOUT_S) as http:
        # gRPC: the caller cancels its call after a few tokens.
        streaming = stub.Complete(complete(LONG_PROMPT), timeout=CALL_TIMEOUT_S)
        grpc_job_id = (await read_until(streaming, tokens(3)))[0].job_id
        streaming.cancel()

        # SSE through the edge: the HTTP client closes the connection after a few chunks.
        body = {"model": "echo", "stream": True, "messages": [{"role": "user", "content": LONG_PROMPT}]}
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            chunks = 0
            async for line in response.aiter_lines():
                chunks += line.startswith("data: ") and '"content":"' in line
                if chunks >= 3:
                    break
        listed = await stub.ListJobs(inference_pb2.ListJobsRequest(limit=2), timeout=CALL_TIMEOUT_S)
        sse_job_id = listed.jobs[0].job_id
        assert sse_job_id != grpc_job_id

        for job_id in (grpc_job_id, sse_job_id):

            async def cancelled(job_id: str = job_id) -> bool:
                return (await job(stub, job_id)).state == common_pb2.JOB_STATE_CANCELLED

            await eventually(cancelled, 3, 0.05)
            events = await watch(stub, job_id)
            check_runs(events)
            assert events[-1].error.code == grpc.StatusCode.CANCELLED.value[0], describe(events)
            assert kinds(events).count("token") < len(LONG_PROMPT.split()) // 2, describe(events)
            await eventually(lambda: nothing_held(redis_client, keys, ["w1"]), 3)

        # The worker stopped computing the dropped jobs: its only slot takes the next one at once, which
        # would otherwise wait some 7 s for the first dropped job's 80 words.
        began = time.monotonic()
        await serves_normally(stub, "next")
        assert time.monotonic() - began < 3
        after = {"model": "echo", "messages": [{"role": "user", "content": "after the drill"}]}
        reply = await http.post("/v1/chat/completions", json=after)
        assert reply.json()["choices"][0]["message"]["content"] == "after the drill"
