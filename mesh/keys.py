"""Every Redis key Velesio uses, in one place. Nothing else spells a key.

All keys start with the cluster's prefix (`--key-prefix`, default "velesio") so that several clusters, or
several test runs, can share one Redis.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    prefix: str = "velesio"

    def job(self, job_id: str) -> str:
        """Hash: the stored job (protobuf bytes), tenant, state, timestamps, worker, attempts."""
        return f"{self.prefix}:job:{job_id}"

    def events(self, job_id: str) -> str:
        """Stream: the job's events in order; capped, expires some time after the job ends."""
        return f"{self.prefix}:events:{job_id}"

    def queue(self, kind: str, model: str) -> str:
        """Sorted set of queued job ids, scored by priority then arrival."""
        return f"{self.prefix}:queue:{kind}:{model}"

    def queues(self) -> str:
        """Set of queue keys that exist, so dispatchers find every queue without scanning."""
        return f"{self.prefix}:queues"

    def leases(self) -> str:
        """Sorted set of running job ids scored by lease expiry (unix ms); expired ones are reclaimed."""
        return f"{self.prefix}:leases"

    def worker(self, worker_id: str) -> str:
        """String with a TTL: the worker's registration (WorkerInfo bytes), gone without heartbeats."""
        return f"{self.prefix}:worker:{worker_id}"

    def workers(self) -> str:
        """Sorted set of worker ids scored by heartbeat expiry (unix ms)."""
        return f"{self.prefix}:workers"

    def worker_busy(self, worker_id: str) -> str:
        """Hash job_id -> lease expiry: the jobs occupying the worker's slots, across all brokers."""
        return f"{self.prefix}:worker-busy:{worker_id}"

    def broker(self, broker_id: str) -> str:
        """String with a TTL: a broker replica is alive."""
        return f"{self.prefix}:broker:{broker_id}"

    def brokers(self) -> str:
        """Sorted set of broker ids scored by heartbeat expiry."""
        return f"{self.prefix}:brokers"

    def cancel_channel(self) -> str:
        """Pub/sub channel on which a broker asks the replica that runs a job to stop it."""
        return f"{self.prefix}:cancel"

    def session(self, session_id: str) -> str:
        """String with a TTL: the worker that last served a session (cache affinity)."""
        return f"{self.prefix}:session:{session_id}"

    def tenant_rate(self, tenant: str, window: int) -> str:
        """Counter of a tenant's requests in one rate-limit window."""
        return f"{self.prefix}:tenant:{tenant}:rate:{window}"

    def tenant_running(self, tenant: str) -> str:
        """Set of a tenant's running job ids."""
        return f"{self.prefix}:tenant:{tenant}:running"

    def tenant_queued(self, tenant: str) -> str:
        """Set of a tenant's queued job ids."""
        return f"{self.prefix}:tenant:{tenant}:queued"

    def tenant_newest(self, tenant: str) -> str:
        """String: the tenant's newest image job id (Automatic1111 progress, interrupt, skip)."""
        return f"{self.prefix}:tenant:{tenant}:newest"
