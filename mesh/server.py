"""The gRPC server bootstrap that every Velesio service is served by.

`GrpcServer` builds a `grpc.aio` server with the interceptors it is given plus `ErrorInterceptor`
(innermost, so outer interceptors see the final status), serves `grpc.health.v1.Health` and server
reflection next to the services, and shuts down gracefully: health turns NOT_SERVING first, then
in-flight calls get `grace` seconds to finish.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import grpc
import redis
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from mesh.errors import InvalidArgument, VelesioError, error_for_code
from mesh.reflection import DocumentedReflectionServicer

log = logging.getLogger(__name__)

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Turns `VelesioError` into its status code; anything else unexpected into a logged INTERNAL."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        decode = None if handler.request_streaming else _lenient(handler.request_deserializer)
        return wrap_handler(handler, lambda behavior: _guard(behavior, method), request_deserializer=decode)


@dataclass(frozen=True)
class _Undecodable:
    """A request whose bytes are no message of its type: the handler refuses it with INVALID_ARGUMENT
    (grpc itself would answer UNKNOWN)."""

    error: Exception


def _lenient(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def decode(raw: bytes) -> Any:
        try:
            return deserialize(raw)
        except Exception as exc:  # protobuf's DecodeError
            return _Undecodable(exc)

    return decode


def _check_decoded(request: Any) -> None:
    if isinstance(request, _Undecodable):
        raise InvalidArgument(f"the request is not a valid protobuf message: {request.error}")


async def _abort(context: Context, exc: Exception, method: str) -> None:
    if isinstance(exc, grpc.aio.AioRpcError):  # a call to another service (a worker) failed: pass it on
        exc = error_for_code(exc.code(), exc.details() or exc.code().name)
    if isinstance(exc, VelesioError):
        log.debug("%s: %s %s", method, exc.code.name, exc.message)
        await context.abort(exc.code, exc.message, trailing_metadata=exc.trailing_metadata())
    if isinstance(exc, NotImplementedError):  # what generated servicer base classes raise
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented by this server")
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError):  # e.g. Redis restarting: retry later
        log.warning("%s: Redis unreachable: %s", method, exc)
        await context.abort(grpc.StatusCode.UNAVAILABLE, "the job store (Redis) is unreachable; retry")
    log.error("unhandled error in %s", method, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error; the server log has the details")


def _guard(behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
    """Wraps one handler behavior, keeping its shape (coroutine or async generator)."""
    if inspect.isasyncgenfunction(behavior):

        async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
            try:
                _check_decoded(request)
                async for item in behavior(request, context):
                    yield item
            except grpc.aio.BaseError:
                raise
            except Exception as exc:
                await _abort(context, exc, method)

        return stream

    async def call(request: Any, context: Context) -> Any:
        try:
            _check_decoded(request)
            result = behavior(request, context)
            return await result if inspect.isawaitable(result) else result
        except grpc.aio.BaseError:
            raise
        except Exception as exc:
            await _abort(context, exc, method)

    return call


def wrap_handler(
    handler: Handler,
    decorate: Callable[[Callable[..., Any]], Callable[..., Any]],
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> Handler:
    """The same handler with its behavior passed through `decorate` (which keeps its shape), and its request
    deserializer replaced when one is given."""
    kinds: list[tuple[str, Callable[..., Handler]]] = [
        ("unary_unary", grpc.unary_unary_rpc_method_handler),
        ("unary_stream", grpc.unary_stream_rpc_method_handler),
        ("stream_unary", grpc.stream_unary_rpc_method_handler),
        ("stream_stream", grpc.stream_stream_rpc_method_handler),
    ]
    for attr, factory in kinds:
        behavior = getattr(handler, attr)
        if behavior is not None:
            return factory(
                decorate(behavior),
                request_deserializer=request_deserializer or handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
    return handler


@dataclass(frozen=True)
class Service:
    """A servicer to serve: its full name (e.g. "velesio.v1.Inference") and how to add it to a server."""

    name: str
    register: Callable[[grpc.aio.Server], None]


class GrpcServer:
    """A started-on-demand gRPC server with health, reflection, error mapping and graceful shutdown."""

    def __init__(
        self,
        services: Sequence[Service],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        grace: float = 5.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self.grace = grace
        self.service_names = [s.name for s in services]
        self.server = grpc.aio.server(
            interceptors=[*interceptors, ErrorInterceptor()],
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        for service in services:
            service.register(self.server)
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            DocumentedReflectionServicer([*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME]),
            self.server,
        )
        self.host = host
        self.port = self.server.add_insecure_port(join_host_port(host, port))
        if self.port == 0:
            raise OSError(f"cannot listen on {join_host_port(host, port)}")
        self._stopped = asyncio.Event()

    @property
    def address(self) -> str:
        return join_host_port(self.host, self.port)

    async def start(self) -> None:
        await self.server.start()
        for name in ["", *self.service_names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("gRPC serving %s on %s", ", ".join(self.service_names), self.address)

    async def stop(self, grace: float | None = None) -> None:
        """Turns health NOT_SERVING, lets in-flight calls finish within `grace`, then stops."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.grace if grace is None else grace)
        log.info("gRPC server on %s stopped", self.address)

    async def wait_for_signal(
        self, signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT)
    ) -> signal.Signals | None:
        """Waits until one of `signals` arrives (returned) or `stop()` was called (None). The caller then
        does its own draining (a worker deregisters first) and calls `stop()`."""
        loop = asyncio.get_running_loop()
        received: asyncio.Future[signal.Signals] = loop.create_future()

        def on_signal(sig: signal.Signals) -> None:
            if not received.done():
                received.set_result(sig)

        for sig in signals:
            loop.add_signal_handler(sig, on_signal, sig)
        stopped: asyncio.Future[bool] = asyncio.ensure_future(self._stopped.wait())
        try:
            waiting: list[asyncio.Future[Any]] = [stopped, received]
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            for sig in signals:
                loop.remove_signal_handler(sig)
        return received.result() if received.done() else None
