"""Every Redis key Velesio uses, in one place. Nothing else spells a key.

All keys start with the cluster's prefix (`--key-prefix`, default "velesio") so that several clusters, or
several test runs, share one Redis. Keys that Lua scripts must derive from an id read inside the script
(a job popped from a queue, the tenant stored on a job) end with that id, and the script gets the part
before it from here, e.g. `keys.job("")`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    prefix: str = "velesio"

    def job(self, job_id: str) -> str:
        """Hash: the stored job (StoredJob bytes in "spec"), tenant, state, attempts, worker, timestamps."""
        return f"{self.prefix}:job:{job_id}"

    def events(self, job_id: str) -> str:
        """Stream: the job's events in order; capped, expires some time after the job ends."""
        return f"{self.prefix}:events:{job_id}"

    def queue(self, kind: str, model: str) -> str:
        """Sorted set of queued job ids, scored by priority then arrival."""
        return f"{self.prefix}:queue:{kind}:{model}"

    def queues(self) -> str:
        """Set of "kind\\nmodel" of the queues in use, so that nobody scans for them."""
        return f"{self.prefix}:queues"

    def sequence(self) -> str:
        """Counter that orders jobs of equal priority by arrival."""
        return f"{self.prefix}:sequence"

    def deadlines(self) -> str:
        """Sorted set of queued job ids scored by deadline (unix ms), to end those that wait too long."""
        return f"{self.prefix}:deadlines"

    def leases(self) -> str:
        """Sorted set of running job ids scored by lease expiry (unix ms); expired ones are reclaimed."""
        return f"{self.prefix}:leases"

    def worker(self, worker_id: str) -> str:
        """String with a TTL: the worker's registration (WorkerInfo bytes), gone without heartbeats."""
        return f"{self.prefix}:worker:{worker_id}"

    def workers(self) -> str:
        """Sorted set indexing the registered worker ids."""
        return f"{self.prefix}:workers"

    def worker_busy(self, worker_id: str) -> str:
        """Hash job id -> lease expiry: the jobs holding the worker's slots, across all brokers."""
        return f"{self.prefix}:worker-busy:{worker_id}"

    def brokers(self) -> str:
        """Sorted set of broker replica ids scored by heartbeat expiry (unix ms)."""
        return f"{self.prefix}:brokers"

    def wake_channel(self) -> str:
        """Pub/sub channel: a job was queued or a slot freed; dispatchers look again."""
        return f"{self.prefix}:wake"

    def reader_wake(self, broker_id: str) -> str:
        """Stream (one entry, expires): interrupts the blocking read of a broker's event reader when a
        caller starts following a job there."""
        return f"{self.prefix}:reader-wake:{broker_id}"

    def cancel_channel(self) -> str:
        """Pub/sub channel on which a broker asks the replica that runs a job to stop it."""
        return f"{self.prefix}:cancel"

    def affinity(self, key: str) -> str:
        """String with a TTL: the worker that last served a session or prompt prefix (cache affinity)."""
        return f"{self.prefix}:affinity:{key}"

    def tenant_rate(self, tenant: str, window: int) -> str:
        """Counter of a tenant's requests in one rate-limit window."""
        return f"{self.prefix}:tenant-rate:{window}:{tenant}"

    def tenant_queued(self, tenant: str) -> str:
        """Set of a tenant's queued job ids."""
        return f"{self.prefix}:tenant-queued:{tenant}"

    def tenant_jobs(self, tenant: str) -> str:
        """Sorted set of a tenant's most recent job ids, scored by creation time (ListJobs)."""
        return f"{self.prefix}:tenant-jobs:{tenant}"

    def tenant_defaults(self, tenant: str) -> str:
        """Hash kind -> model: the model the tenant's jobs of a kind get when they name none (one per
        tenant, and tenants are as many as the broker's token file names)."""
        return f"{self.prefix}:tenant-defaults:{tenant}"

    def tenant_running(self, tenant: str) -> str:
        """Set of a tenant's running job ids."""
        return f"{self.prefix}:tenant-running:{tenant}"
