"""Native JSON routes, generated from the `google.api.http` annotations of velesio.v1.Inference: one generic
transcoder (path and query parameters and the JSON body into the request message; the reply, or each
streamed event as SSE, back to JSON), no hand-written route per RPC."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from google.api import annotations_pb2
from google.protobuf import descriptor, descriptor_pb2, json_format, message

from edge import sse
from edge.broker import BrokerClient, forwarded_metadata
from edge.errors import ApiError, bad_request
from edge.native.schema import message_schema, query_parameters
from edge.routing import dialect_route, renderer
from mesh.reflection import documented_files
from velesio.v1 import inference_pb2

log = logging.getLogger(__name__)
VERBS = ("get", "post", "put", "delete", "patch")


def error_body(exc: ApiError) -> dict[str, Any]:
    """google.rpc.Status in JSON, as gRPC-JSON transcoders return it."""
    return {"code": exc.code.value[0], "status": exc.code.name, "message": exc.message, "details": []}


render_error = renderer(error_body)


def comments(service: descriptor.ServiceDescriptor) -> dict[str, str]:
    """Doc comment of each method, from the descriptor set generated with source info."""
    raw = documented_files().get(service.file.name)
    if raw is None:
        return {}
    file = descriptor_pb2.FileDescriptorProto.FromString(raw)
    index = next(i for i, s in enumerate(file.service) if s.name == service.name)
    found = {}
    for location in file.source_code_info.location:
        path = list(location.path)
        if len(path) == 4 and path[:2] == [6, index] and path[2] == 2:
            found[file.service[index].method[path[3]].name] = location.leading_comments.strip()
    return found


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


def openapi_extra(method: descriptor.MethodDescriptor, path: str, with_body: bool) -> dict[str, Any]:
    """What FastAPI cannot see in a generic endpoint: the path parameters, and the request message as the
    JSON body or as query parameters."""
    in_path = re.findall(r"\{([a-z_]+)\}", path)
    parameters = [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}} for n in in_path]
    if not with_body:
        return {"parameters": parameters + query_parameters(method.input_type, set(in_path))}
    body = message_schema(method.input_type)
    body["properties"] = {k: v for k, v in body["properties"].items() if k not in in_path}
    content = {"application/json": {"schema": body}}
    return {"parameters": parameters, "requestBody": {"required": False, "content": content}}


def build_router(broker: BrokerClient) -> APIRouter:
    router = APIRouter(tags=["Native (from velesio.v1.Inference)"], route_class=dialect_route(render_error))
    service = inference_pb2.DESCRIPTOR.services_by_name["Inference"]
    docs = comments(service)
    for method in service.methods:
        rule = method.GetOptions().Extensions[annotations_pb2.http]
        verb = next((v for v in VERBS if getattr(rule, v)), None)
        if verb is None:
            continue
        path = re.sub(r"\{([a-z_]+)(=[^}]*)?\}", r"{\1}", getattr(rule, verb))
        doc = docs.get(method.name, "")
        router.add_api_route(
            path,
            endpoint(broker, method),
            methods=[verb.upper()],
            name=method.name,
            summary=f"{method.name}" + (" (server-sent events)" if method.server_streaming else ""),
            description=f"{doc}\n\nRequest: `velesio.v1.{method.input_type.name}` as JSON.",
            openapi_extra=openapi_extra(method, path, with_body=rule.body == "*"),
            responses=sse.RESPONSES if method.server_streaming else None,
        )
    return router
