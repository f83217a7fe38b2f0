"""The native JSON transcoder: path and query parameters and a JSON body into the request message of a
velesio.v1.Inference method, the reply (or each streamed event, as SSE) back to proto3 JSON, errors as
google.rpc.Status."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from fastapi import Request
from fastapi.responses import JSONResponse, Response
from google.protobuf import descriptor, json_format, message

from edge import sse
from edge.broker import BrokerClient, forwarded_metadata
from edge.errors import ApiError, bad_request
from edge.routing import renderer
from velesio.v1 import inference_pb2

log = logging.getLogger(__name__)


def error_body(exc: ApiError) -> dict[str, Any]:
    """google.rpc.Status in JSON, as gRPC-JSON transcoders return it."""
    return {"code": exc.code.value[0], "status": exc.code.name, "message": exc.message, "details": []}


render_error = renderer(error_body)


def to_message(request_type: type[message.Message], body: bytes, params: dict[str, str]) -> message.Message:
    request = request_type()
    if body.strip():
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, too deep
            raise bad_request(f"the body is not valid JSON: {exc}") from None
        if not isinstance(payload, dict):
            raise bad_request("the body must be a JSON object")
        try:
            json_format.ParseDict(payload, request, ignore_unknown_fields=True)
        except json_format.ParseError as exc:
            raise bad_request(str(exc)) from None
    for name, value in params.items():
        field = request.DESCRIPTOR.fields_by_name.get(name)
        if field is None:
            log.info("%s: ignoring unknown parameter %s", request.DESCRIPTOR.name, name)
            continue
        try:
            json_format.ParseDict({field.json_name: value}, request, ignore_unknown_fields=True)
        except json_format.ParseError as exc:
            raise bad_request(f"{name}: {exc}", name) from None
    return request


def to_json(reply: message.Message) -> dict[str, Any]:
    return json_format.MessageToDict(reply, preserving_proto_field_name=True)


async def events(call: Any, first: Any) -> AsyncIterator[str]:
    """SSE of a job stream: `id:` is the event id (send it as Last-Event-ID to resume), `event:` its kind."""
    reply = first
    try:
        while reply is not grpc.aio.EOF:
            event = reply.event
            yield sse.data(to_json(event), event=event.WhichOneof("event"), event_id=event.event_id)
            reply = await call.read()
    except grpc.aio.AioRpcError as exc:
        yield sse.data(error_body(ApiError.from_rpc(exc)), event="error")
    finally:
        call.cancel()


def endpoint(
    broker: BrokerClient, method: descriptor.MethodDescriptor
) -> Callable[[Request], Awaitable[Response]]:
    request_type: type[message.Message] = getattr(inference_pb2, method.input_type.name)

    async def handle(request: Request) -> Response:
        params = dict(request.query_params) | dict(request.path_params)
        if method.name == "Watch" and "after_event_id" not in params and request.headers.get("last-event-id"):
            params["after_event_id"] = request.headers["last-event-id"]
        grpc_request = to_message(request_type, await request.body(), params)
        metadata = forwarded_metadata(request)
        rpc = getattr(broker.stub, method.name)
        if method.server_streaming:
            call = rpc(grpc_request, metadata=metadata)
            try:
                first = await call.read()  # errors found before queueing become HTTP errors
            except grpc.aio.AioRpcError as exc:
                raise ApiError.from_rpc(exc) from None
            return sse.response(events(call, first))
        return JSONResponse(to_json(await rpc(grpc_request, metadata=metadata)))

    handle.__name__ = method.name
    return handle
