"""Native JSON routes, generated from the `google.api.http` annotations of velesio.v1.Inference onto one
generic transcoder (serving.py), with the request and reply messages as their OpenAPI schemas: no
hand-written route per RPC."""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter
from google.api import annotations_pb2
from google.protobuf import descriptor, descriptor_pb2

from edge.broker import BrokerClient
from edge.native.schema import message_schema, query_parameters
from edge.native.serving import endpoint, render_error
from edge.routing import dialect_route
from mesh.reflection import documented_files
from velesio.v1 import events_pb2, inference_pb2

VERBS = ("get", "post", "put", "delete", "patch")


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


def openapi_extra(method: descriptor.MethodDescriptor, path: str, with_body: bool) -> dict[str, Any]:
    """What FastAPI cannot see in a generic endpoint: the path parameters, the request message as the JSON
    body or as query parameters, and the reply message (each SSE event's JobEvent for a stream)."""
    in_path = re.findall(r"\{([a-z_]+)\}", path)
    parameters = [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}} for n in in_path]
    if method.server_streaming:
        schema = message_schema(events_pb2.JobEvent.DESCRIPTOR, reply=True)
        content = {"text/event-stream": {"schema": schema}}
        replies = {"200": {"description": "Server-sent events, each a JobEvent", "content": content}}
    else:
        content = {"application/json": {"schema": message_schema(method.output_type, reply=True)}}
        replies = {"200": {"description": f"velesio.v1.{method.output_type.name}", "content": content}}
    if not with_body:
        return {
            "parameters": parameters + query_parameters(method.input_type, set(in_path)),
            "responses": replies,
        }
    body = message_schema(method.input_type)
    body["properties"] = {k: v for k, v in body["properties"].items() if k not in in_path}
    request = {"required": False, "content": {"application/json": {"schema": body}}}
    return {"parameters": parameters, "requestBody": request, "responses": replies}


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
        )
    return router
