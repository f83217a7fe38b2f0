"""The broker's view of the cluster: live workers from the registry (briefly cached), the models they
serve, which model a request that names none means (per tenant), and one gRPC channel per worker address."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc

from broker.job import Kind, kind_name
from mesh.errors import InvalidArgument, NotFound, Unavailable
from mesh.registry import Registry
from mesh.server import DEFAULT_MAX_MESSAGE_BYTES
from velesio.v1 import common_pb2, inference_pb2


class Cluster:
    def __init__(
        self, registry: Registry, *, cache_s: float = 0.5, default_models: dict[str, str] | None = None
    ):
        self.registry = registry
        self.cache_s = cache_s
        self.default_models = default_models or {}
        self._workers: list[inference_pb2.WorkerInfo] = []
        self._fetched = 0.0
        self._lock = asyncio.Lock()
        self._channels: dict[str, grpc.aio.Channel] = {}

    async def workers(self, *, fresh: bool = False) -> list[inference_pb2.WorkerInfo]:
        async with self._lock:
            if fresh or time.monotonic() - self._fetched > self.cache_s:
                self._workers = await self.registry.live_workers()
                self._fetched = time.monotonic()
            return self._workers

    async def models(
        self, kind: str | None = None, *, fresh: bool = False
    ) -> dict[str, common_pb2.ModelInfo]:
        found: dict[str, common_pb2.ModelInfo] = {}
        for worker in await self.workers(fresh=fresh):
            if kind is not None and kind_name(worker.kind) != kind:
                continue
            for model in worker.model_details:
                found.setdefault(model.id, model)
        return found

    async def resolve_model(self, kind: str, model: str, tenant: str, field: str = "model") -> str:
        """The model id a request means: its own, else its tenant's default for the kind, else the broker's
        default, else the first one served. Unknown ids are NOT_FOUND."""
        if not model and (chosen := await self.tenant_default(tenant, kind)):
            model, field = chosen, f"{field} (the default your tenant set with SetDefaultModel)"
        return await self.served_model(kind, model, field)

    async def served_model(self, kind: str, model: str, field: str = "model") -> str:
        """`model` when a worker serves it, else (empty) the broker's default, else the first served."""
        model = model or self.default_models.get(kind, "")
        for fresh in (False, True):  # a worker may have registered since the cache was filled
            served = await self.models(kind, fresh=fresh)
            if model in served or (not model and served):
                return model or min(served)
        if not model:
            raise Unavailable(f"no {kind} worker is registered")
        available = ", ".join(sorted(served)) or "none"
        raise NotFound(f"{field}: no worker serves {kind} model {model!r}; available: {available}")

    async def require_capability(self, kind: str, model: str, capability: str) -> None:
        """InvalidArgument unless the (served) model has `capability` (ModelInfo.capabilities)."""
        served = await self.models(kind)
        info = served.get(model)
        if info is not None and capability not in info.capabilities:
            able = ", ".join(sorted(m for m, i in served.items() if capability in i.capabilities)) or "none"
            message = f"{kind} model {model!r} cannot {capability}; models that can: {able}"
            raise InvalidArgument(message, field="model")

    async def check_token_ids(self, kind: str, model: str, tokens: list[tuple[str, int]]) -> None:
        """InvalidArgument naming the field of the first token id outside the (served) model's vocabulary."""
        info = (await self.models(kind)).get(model)
        if not tokens or info is None or not info.vocab_size:
            return
        for field, token in tokens:
            if not 0 <= token < info.vocab_size:
                message = (
                    f"token id {token} is outside the vocabulary of {model!r} (0 to {info.vocab_size - 1})"
                )
                raise InvalidArgument(message, field=field)

    async def kind_of(self, model: str) -> Kind:
        """The kind of job a served model is for; NOT_FOUND when no worker serves it."""
        for fresh in (False, True):
            for worker in await self.workers(fresh=fresh):
                if model in worker.models:
                    return kind_name(worker.kind)
        available = ", ".join(sorted(await self.models())) or "none"
        raise NotFound(f"model: no worker serves model {model!r}; available: {available}")

    async def tenant_default(self, tenant: str, kind: str) -> str:
        """The model the tenant chose for jobs of `kind` that name none, or ""."""
        value: Any = await self.registry.client.hget(self.registry.keys.tenant_defaults(tenant), kind)
        return value.decode() if value else ""

    async def set_tenant_default(self, tenant: str, kind: str, model: str) -> None:
        """Chooses (or with "" forgets) the model of the tenant's jobs of `kind` that name none; NOT_FOUND
        unless a worker serves it."""
        key = self.registry.keys.tenant_defaults(tenant)
        if not model:
            await self.registry.client.hdel(key, kind)
            return
        await self.resolve_model(kind, model, tenant)
        await self.registry.client.hset(key, kind, model)

    async def workers_for(self, kind: str, model: str) -> list[inference_pb2.WorkerInfo]:
        return [w for w in await self.workers() if kind_name(w.kind) == kind and model in w.models]

    def channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = grpc.aio.insecure_channel(
                address,
                options=[
                    ("grpc.max_receive_message_length", DEFAULT_MAX_MESSAGE_BYTES),
                    ("grpc.max_send_message_length", DEFAULT_MAX_MESSAGE_BYTES),
                ],
            )
            self._channels[address] = channel
        return channel

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
