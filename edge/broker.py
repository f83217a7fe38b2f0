"""The edge's connection to the broker, and the caller's credentials forwarded as gRPC metadata."""

from __future__ import annotations

import base64
from collections.abc import Sequence

import grpc
from fastapi import Request
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mesh.server import DEFAULT_MAX_MESSAGE_BYTES
from observability.tracing import current_traceparent
from velesio.v1 import common_pb2, inference_pb2, inference_pb2_grpc

Metadata = tuple[tuple[str, str], ...]


def forwarded_metadata(request: Request) -> Metadata:
    """`authorization: Bearer <token>` from the caller (HTTP Basic's password counts as the token, as
    Automatic1111 clients send it) and the W3C traceparent, as gRPC metadata for the broker."""
    found: list[tuple[str, str]] = []
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        found.append(("authorization", f"Bearer {value.strip()}"))
    elif scheme.lower() == "basic" and value.strip():
        try:
            _, _, password = base64.b64decode(value.strip()).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            password = ""
        if password:
            found.append(("authorization", f"Bearer {password}"))
    elif header:
        found.append(("authorization", header))  # let the broker say what is wrong with it
    # The edge's own request span (a child of the caller's traceparent, when one was sent) is the parent.
    if traceparent := current_traceparent() or request.headers.get("traceparent"):
        found.append(("traceparent", traceparent))
    return tuple(found)


class BrokerClient:
    """A gRPC channel to the broker. `open()` runs in the app's lifespan: a grpc.aio channel belongs to the
    event loop that creates it, which is the server's, not the one that built the app."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._channel: grpc.aio.Channel | None = None
        self._stub: inference_pb2_grpc.InferenceAsyncStub | None = None
        self._health: health_pb2_grpc.HealthAsyncStub | None = None

    def open(self) -> None:
        self._channel = grpc.aio.insecure_channel(
            self.address,
            options=[
                ("grpc.max_receive_message_length", DEFAULT_MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", DEFAULT_MAX_MESSAGE_BYTES),
            ],
        )
        self._stub = inference_pb2_grpc.InferenceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    @property
    def stub(self) -> inference_pb2_grpc.InferenceAsyncStub:
        assert self._stub is not None, "BrokerClient.open() runs in the app lifespan"
        return self._stub

    async def text_model(self, request: Request, model: str = "") -> common_pb2.ModelInfo | None:
        """The served text model `model` names, or (empty) the one a request naming none gets for this
        caller: the tenant's default, else the cluster's. None when it is not served."""
        metadata = forwarded_metadata(request)
        text = common_pb2.JOB_KIND_TEXT
        if not model:
            chosen = await self.stub.GetDefaultModels(
                inference_pb2.GetDefaultModelsRequest(kind=text), metadata=metadata
            )
            model = chosen.defaults[0].model
        listed = await self.stub.ListModels(inference_pb2.ListModelsRequest(kind=text), metadata=metadata)
        return next((m for m in listed.models if m.id == model), None)

    async def serving(self, services: Sequence[str] = ("",), limit_s: float = 2.0) -> dict[str, bool]:
        """Health of the broker (""), and of what it can serve ("velesio.v1.TextWorker", ...)."""
        found = {}
        for service in services:
            try:
                assert self._health is not None
                reply = await self._health.Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=limit_s
                )
                found[service] = reply.status == health_pb2.HealthCheckResponse.SERVING
            except grpc.aio.AioRpcError:
                found[service] = False
        return found

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
