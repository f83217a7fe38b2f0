"""Every POST route of the edge, fed malformed or wrongly typed bodies, answers 4xx in its dialect's error
shape, never 5xx, and queues nothing (real broker and echo worker behind it)."""

from __future__ import annotations

import json

import pytest
import redis.asyncio

from edge.app import create_app
from edge.settings import EdgeSettings
from mesh.keys import Keys
from tests.conftest import EdgeFactory, StartFactory
from tests.helpers import api_routes

WRONG_TYPES = json.dumps(
    {"prompt": 5, "messages": 5, "content": [], "tokens": "x", "init_images": 7, "complete": 3, "params": 5}
).encode()
# Valid JSON, yet text that protobuf cannot carry: a lone surrogate in every text field a route might read.
LONE_SURROGATE = json.dumps(
    {f: "\ud800" for f in ("prompt", "content", "input", "model", "sd_model_checkpoint", "inputs")}
    | {"messages": [{"role": "user", "content": "\ud800"}], "tokens": [1]}
).encode()
BODIES: list[tuple[str, bytes]] = [
    ("not JSON", b"{nope"),
    ("a lone surrogate", LONE_SURROGATE),
    ("a JSON list", b"[1, 2]"),
    ("wrong types", WRONG_TYPES),
    ("empty", b""),
]
# Routes that read no body (or only optional fields), and native routes whose empty request is a valid one
# (tokenizing nothing gives no tokens; an image with all defaults, which needs an image worker: 503 here).
TAKE_NO_BODY = {
    "/props",
    "/template",
    "/health",
    "/sdapi/v1/interrupt",
    "/sdapi/v1/skip",
    "/sdapi/v1/options",
}
EMPTY_IS_VALID = {"/v1/text:tokenize", "/v1/text:detokenize", "/v1/images:generate"}


def post_routes() -> list[str]:
    routes = api_routes(list(create_app(EdgeSettings()).routes))
    return sorted({r.path for r in routes if "POST" in (r.methods or set()) and "{" not in r.path})


def error_shape(path: str, body: object) -> bool:
    assert isinstance(body, dict)
    if path.startswith("/sdapi/"):
        return set(body) == {"error", "detail", "body", "errors"}
    if path.startswith("/v1/jobs") or ":" in path:
        return {"code", "status", "message"} <= set(body)
    if path.startswith("/api/"):
        return isinstance(body.get("error"), str) and bool(body["error"])
    return isinstance(body.get("error"), dict) and bool(body["error"].get("message"))


@pytest.mark.parametrize("path", post_routes())
async def test_bad_bodies_on_every_post_route(
    path: str,
    start_broker: StartFactory,
    start_echo_worker: StartFactory,
    edge_client: EdgeFactory,
    redis_url: str,
    keys: Keys,
) -> None:
    broker = await start_broker()
    await start_echo_worker()
    client = await edge_client(broker.address)
    for label, body in BODIES:
        reply = await client.post(path, content=body, headers={"content-type": "application/json"})
        what = f"{path} with {label}: {reply.status_code} {reply.text}"
        if path in TAKE_NO_BODY or (label == "empty" and path in EMPTY_IS_VALID):
            assert reply.status_code != 500, what  # valid requests; 503 is the cluster's state, not a bug
            continue
        assert 400 <= reply.status_code < 500, what
        assert error_shape(path, reply.json()), what
    store = redis.asyncio.Redis.from_url(redis_url)
    assert await store.zcard(keys.queue("text", "echo")) == 0
    await store.aclose()
