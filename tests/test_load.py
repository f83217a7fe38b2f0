"""The short profile of bench/load.py, on real processes: 50 SSE streams through the edge and 50 gRPC
streams to the broker held at once without an error and with bounded memory, then a queue filled to its
bound with nothing lost. (The full profile, 200 + 200 streams for 60 s and 10,000 jobs, is `make bench`.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import load

pytestmark = [pytest.mark.slow, pytest.mark.load]

SHORT = "--sse 50 --grpc 50 --hold 5 --ramp 1 --word-ms 100 --sample-s 0.5 --jobs 1000 --position-calls 20"
# Growth of a process's RSS from the start to the end of the hold window; the streams turn over about
# 250 jobs in it, so a leak of even a few KiB per job or per event would show.
MAX_GROWTH_MIB = 24.0
MAX_REDIS_BYTES_PER_QUEUED_JOB = 16 * 1024


@pytest.mark.timeout(180)
async def test_streams_held_and_queue_filled_short_profile(tmp_path: Path) -> None:
    args = load.parse_args(SHORT.split())
    with load.LoadRig(tmp_path, args) as rig:
        report = await load.measure(rig, args)
        rig.check_alive()

    for streams in report.streams.streams:
        assert streams.errors == 0, (streams.path, streams.error_samples)
        assert streams.jobs >= streams.callers, streams  # every caller finished at least one job
        held = sorted(streams.active_in_window)
        assert held[len(held) // 2] == streams.callers, (streams.path, held)
        assert held[0] >= 0.8 * streams.callers, (streams.path, held)
    memory = report.streams.memory
    assert set(memory) == {"client", "broker", "worker", "parked", "edge", "redis"}
    for process, rss in memory.items():
        assert rss["end"] - rss["start"] <= MAX_GROWTH_MIB, (process, rss)

    queue = report.queue
    assert queue.depth == queue.jobs == 1000, "every accepted job is in the queue"
    assert queue.positions_ok, "GetJob answers the position Submit gave"
    assert queue.refused.startswith("RESOURCE_EXHAUSTED: the text queue of model 'parked' is full")
    assert 0 < queue.redis_bytes_per_job <= MAX_REDIS_BYTES_PER_QUEUED_JOB
    assert {100, 1000} == set(queue.get_job_ms)
