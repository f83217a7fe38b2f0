"""Every gRPC status code the broker can return reaches each REST dialect with the HTTP status of the one
table in DESIGN.md and in that dialect's error shape. The broker here is a real gRPC server whose RPCs fail
with the code the request names, so every code can be produced on demand."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
import pytest

from edge.app import create_app
from edge.settings import EdgeSettings
from mesh import errors
from mesh.server import Context
from tests.conftest import EdgeFactory, StartFactory
from velesio.v1 import inference_pb2, inference_pb2_grpc

EXPECTED = {
    "INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "OUT_OF_RANGE": 400, "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403, "NOT_FOUND": 404, "ALREADY_EXISTS": 409, "ABORTED": 409,
    "RESOURCE_EXHAUSTED": 429, "CANCELLED": 499, "UNIMPLEMENTED": 501, "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504, "INTERNAL": 500, "UNKNOWN": 500, "DATA_LOSS": 500,
}  # fmt: skip


class FailingBroker(inference_pb2_grpc.InferenceServicer):
    """Fails every call with the status code named by the request's model (or job id); lets every caller in
    (the edge asks WhoAmI before a route reads its body)."""

    async def WhoAmI(
        self, request: inference_pb2.WhoAmIRequest, context: Context
    ) -> inference_pb2.WhoAmIResponse:
        return inference_pb2.WhoAmIResponse(tenant="anonymous")

    async def _fail(self, name: str, context: Context) -> None:
        trailers = (("retry-after", "7"),) if name == "RESOURCE_EXHAUSTED" else ()
        await context.abort(grpc.StatusCode[name], f"failed with {name}", trailing_metadata=trailers)

    async def Chat(self, request: inference_pb2.ChatRequest, context: Context) -> AsyncIterator[Any]:
        await self._fail(request.model, context)
        yield inference_pb2.ChatResponse()

    async def Complete(self, request: inference_pb2.CompleteRequest, context: Context) -> AsyncIterator[Any]:
        await self._fail(request.model, context)
        yield inference_pb2.CompleteResponse()

    async def GetJob(
        self, request: inference_pb2.GetJobRequest, context: Context
    ) -> inference_pb2.GetJobResponse:
        await self._fail(request.job_id, context)
        raise errors.Internal("unreachable")


@pytest.mark.parametrize("name", sorted(EXPECTED))
async def test_status_codes_in_every_dialect(failing_edge: httpx.AsyncClient, name: str) -> None:
    edge = failing_edge
    status = EXPECTED[name]
    chat = {"model": name, "messages": [{"role": "user", "content": "x"}]}
    for stream in (False, True):
        reply = await edge.post("/v1/chat/completions", json=chat | {"stream": stream})
        assert reply.status_code == status
        error = reply.json()["error"]
        assert error["message"] == f"failed with {name}"
        assert set(error) == {"message", "type", "param", "code"}

    reply = await edge.post("/completion", json={"prompt": "x", "model": name, "stream": True})
    assert reply.status_code == status
    assert reply.json()["error"] == {
        "code": status,
        "message": f"failed with {name}",
        "type": reply.json()["error"]["type"],
    }

    reply = await edge.get(f"/v1/jobs/{name}")
    assert reply.status_code == status
    assert reply.json()["code"] == grpc.StatusCode[name].value[0]
    assert reply.json()["status"] == name

    if name == "RESOURCE_EXHAUSTED":
        assert reply.headers["retry-after"] == "7"


def test_the_openapi_document_lists_the_errors_routes_answer_with() -> None:
    from edge.app import ERROR_RESPONSES

    paths = create_app(EdgeSettings()).openapi()["paths"]
    chat = paths["/v1/chat/completions"]["post"]["responses"]
    assert "422" not in chat and set(ERROR_RESPONSES) <= set(chat)  # validation errors are 400s here
    assert not any("422" in op["responses"] for ops in paths.values() for op in ops.values())
    assert "401" not in paths["/healthz"]["get"]["responses"]


def test_the_openapi_document_gives_every_reply_its_schema() -> None:
    """Every route of every dialect says what its 200 holds (typed reply models, the proto messages of the
    native routes), so that /docs shows it and the schema fuzzer checks replies against it."""

    document = create_app(EdgeSettings()).openapi()
    untyped = []
    for path, operations in document["paths"].items():
        for verb, operation in operations.items():
            content = operation["responses"]["200"].get("content", {})
            schemas = [kind.get("schema") for name, kind in content.items() if name != "text/plain"]
            if path != "/metrics" and not any(schemas):
                untyped.append(f"{verb.upper()} {path}")
    assert not untyped, untyped
    components = document["components"]["schemas"]
    chat = components["ChatCompletion"]
    assert chat["additionalProperties"] is False and "usage" in chat["required"]
    assert {"CompletionResult", "Progress", "SdModel", "ModelList", "ImageResult"} <= set(components)
    job = document["paths"]["/v1/jobs/{job_id}"]["get"]["responses"]["200"]["content"]["application/json"]
    created = job["schema"]["properties"]["job"]["properties"]["created_at"]
    assert created == {}  # a Timestamp: an RFC 3339 string in proto3 JSON


async def test_readiness_says_what_is_missing(start_broker: StartFactory, edge_client: EdgeFactory) -> None:
    edge = await edge_client((await start_broker()).address)
    reply = await edge.get("/readyz")
    assert reply.status_code == 503
    assert reply.json() == {"status": "not ready", "broker": True, "text": False, "image": False}
