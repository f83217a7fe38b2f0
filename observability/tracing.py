"""Trace context across process boundaries, and the gRPC server interceptor every service is given.

A request's trace travels as W3C `traceparent`: HTTP header -> gRPC metadata (edge -> broker) -> the job
record in Redis (across the queue) -> gRPC metadata (broker -> worker).
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from mesh.errors import status_code
from mesh.server import Handler, wrap_handler
from observability import metrics

_propagator = TraceContextTextMapPropagator()

# Codes that mean the server failed; the others are the caller's doing and leave a span unmarked.
SERVER_FAULTS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)
UNTRACED_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")


def tracer(component: str) -> trace.Tracer:
    """The tracer of one component: "velesio.edge", "velesio.broker", "velesio.llm_worker"..."""
    return trace.get_tracer(component)


def current_traceparent() -> str:
    """The W3C traceparent of the active span ("" when none is recording)."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier.get("traceparent", "")


def context_from(traceparent: str) -> otel_context.Context:
    return _propagator.extract({"traceparent": traceparent} if traceparent else {})


def trace_metadata() -> tuple[tuple[str, str], ...]:
    """gRPC metadata carrying the active span to the next process."""
    traceparent = current_traceparent()
    return (("traceparent", traceparent),) if traceparent else ()


def ns(seconds: float) -> int:
    """A wall-clock time (time.time()) as the nanoseconds spans take."""
    return int(seconds * 1e9)


def mark_status(span: trace.Span, code: grpc.StatusCode, details: str = "") -> None:
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code in SERVER_FAULTS:
        span.set_status(Status(StatusCode.ERROR, details or code.name))


class TelemetryInterceptor(grpc.aio.ServerInterceptor):
    """One SERVER span per call, continuing the caller's `traceparent`, and the request metrics (count and
    duration by method and code). Health and reflection calls are neither traced nor counted."""

    def __init__(self, component: str) -> None:
        self.tracer = tracer(component)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method.startswith(UNTRACED_PREFIXES):
            return handler
        return wrap_handler(handler, self._observed(method))

    def _observed(self, method: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        service, _, name = method.lstrip("/").rpartition("/")

        def decorate(behavior: Callable[..., Any]) -> Callable[..., Any]:
            if inspect.isasyncgenfunction(behavior):

                async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
                    call = self._call(method, service, name, context)
                    items = behavior(request, context)
                    try:
                        while True:
                            # The span is current only while the handler runs, never across a yield:
                            # the code after a yield may run in another context (a cancelled stream).
                            with call.current():
                                try:
                                    item = await items.__anext__()
                                except StopAsyncIteration:
                                    break
                            yield item
                    except BaseException as exc:
                        call.end(context, exc)
                        raise
                    finally:
                        await items.aclose()
                    call.end(context, None)

                return stream

            async def unary(request: Any, context: Any) -> Any:
                call = self._call(method, service, name, context)
                try:
                    with call.current():
                        result = behavior(request, context)
                        result = await result if inspect.isawaitable(result) else result
                except BaseException as exc:
                    call.end(context, exc)
                    raise
                call.end(context, None)
                return result

            return unary

        return decorate

    def _call(self, method: str, service: str, name: str, context: Any) -> _CallSpan:
        metadata = dict(context.invocation_metadata() or ())
        parent = context_from(str(metadata.get("traceparent", "")))
        return _CallSpan(self.tracer, method, service, name, parent)


class _CallSpan:
    """The span and request metrics of one call."""

    def __init__(
        self, tracer: trace.Tracer, method: str, service: str, name: str, parent: otel_context.Context
    ) -> None:
        self.method = method
        self.started = time.perf_counter()
        self.ended = False
        self.span = tracer.start_span(
            method.lstrip("/"),
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
        )
        self.context = trace.set_span_in_context(self.span, parent)

    @contextlib.contextmanager
    def current(self) -> Iterator[None]:
        token = otel_context.attach(self.context)
        try:
            yield
        finally:
            otel_context.detach(token)

    def end(self, context: Any, exc: BaseException | None) -> None:
        if self.ended:
            return
        self.ended = True
        code = _final_code(context, exc)
        mark_status(self.span, code, _details(context))
        self.span.end()
        labels = {"protocol": "grpc", "route": self.method, "code": code.name}
        metrics.requests.add(1, labels)
        metrics.request_duration.record(time.perf_counter() - self.started, labels)


def _final_code(context: Any, exc: BaseException | None) -> grpc.StatusCode:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):
        return status_code(code)
    if exc is None:
        return grpc.StatusCode.OK
    if isinstance(exc, GeneratorExit) or type(exc).__name__ == "CancelledError":
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


def _details(context: Any) -> str:
    details = context.details()
    return details.decode(errors="replace") if isinstance(details, bytes) else str(details or "")
