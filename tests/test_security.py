"""Security checks: every edge route but the probes and the docs, and every RPC of the broker, refuses a
missing or wrong token; tokens never reach the logs (DEBUG, real processes) or the metrics; a body or a
prompt over its limit is refused before anything reaches Redis."""

from __future__ import annotations

import base64
import io
from collections.abc import AsyncIterator, Awaitable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import redis.asyncio
from PIL import Image
from starlette.routing import Route

from edge.app import create_app
from edge.settings import EdgeSettings
from mesh.keys import Keys
from tests.conftest import EdgeFactory, StartFactory
from tests.helpers import api_routes, bearer, collect, inference
from tests.processes import Cluster, running_cluster
from velesio.v1 import common_pb2, inference_pb2

TOKEN = "sec-token-5d2b90e1"
WRONG = "sec-wrong-0a7f3c44"
TOKENS = f"alice:{TOKEN}"
# Probes and docs need no token (DESIGN.md, Auth); llama.cpp's /health is a probe too, and so is Ollama's `/`
# ("Ollama is running").
PUBLIC = {
    "/",
    "/healthz",
    "/readyz",
    "/metrics",
    "/health",
    "/openapi.json",
    "/docs",
    "/docs/oauth2-redirect",
    "/redoc",
}


def _png() -> str:
    out = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 10)).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


CHAT = {"messages": [{"role": "user", "content": "hi"}]}
IMAGE = {"prompt": "a cat", "width": 64, "height": 64, "steps": 1}
# A valid body for each route that takes one, so that the token is the only thing wrong with a request. A
# new route that needs a body must be added here: without one it gets a 400, and the test says so.
VALID_BODIES: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": CHAT,
    "/v1/completions": {"prompt": "hi"},
    "/v1/images/generations": {"prompt": "a cat", "size": "64x64"},
    "/completion": {"prompt": "hi"},
    "/tokenize": {"content": "hi"},
    "/detokenize": {"tokens": [104, 105]},
    "/apply-template": CHAT,
    "/sdapi/v1/txt2img": IMAGE,
    "/sdapi/v1/img2img": {**IMAGE, "init_images": [_png()]},
    "/sdapi/v1/options": {"sd_model_checkpoint": "tiny"},
    "/v1/text:complete": {"prompt": "hi"},
    "/v1/text:chat": CHAT,
    "/v1/images:generate": {"params": IMAGE},
    "/v1/jobs": {"complete": {"prompt": "hi"}},
    "/v1/text:tokenize": {"content": "hi"},
    "/v1/text:detokenize": {"tokens": [104, 105]},
    "/v1/text:apply-template": CHAT,
    "/api/chat": CHAT,
    "/api/generate": {"prompt": "hi"},
    "/api/show": {"model": "echo"},
    "/api/embed": {"model": "echo", "input": "hi"},
    "/api/embeddings": {"model": "echo", "prompt": "hi"},
    "/v1/embeddings": {"input": "hi"},
    "/embeddings": {"content": "hi"},
    "/v1/text:embed": {"inputs": [{"text": "hi"}]},
}
WRONG_CREDENTIALS = {
    "no token": {},
    "wrong bearer token": {"Authorization": f"Bearer {WRONG}"},
    "wrong basic password": {"Authorization": "Basic " + base64.b64encode(f"user:{WRONG}".encode()).decode()},
    "another scheme": {"Authorization": f"Token {TOKEN}"},
    "empty bearer": {"Authorization": "Bearer "},
}


def guarded_operations() -> list[tuple[str, str]]:
    """(method, path) of every API route of the edge except the public ones."""
    app = create_app(EdgeSettings())
    operations = {(m, r.path) for r in api_routes(list(app.routes)) for m in r.methods or ()}
    return sorted((m, p) for m, p in operations if p not in PUBLIC and m != "HEAD")


def dialect_error(path: str, body: Any) -> str | None:
    """The error message when `body` has the error shape of the route's dialect, else None."""
    if not isinstance(body, dict):
        return None
    if path.startswith("/sdapi/"):
        return str(body["detail"]) if set(body) == {"error", "detail", "body", "errors"} else None
    if path.startswith("/api/"):  # Ollama's
        return str(body["error"]) if set(body) == {"error"} and isinstance(body["error"], str) else None
    if path.startswith(("/v1/jobs", "/v1/cluster", "/v1/whoami")) or ":" in path:
        ok = {"code", "status", "message"} <= set(body) and body["status"] == "UNAUTHENTICATED"
        return str(body["message"]) if ok else None
    error = body.get("error")
    return str(error["message"]) if isinstance(error, dict) and error.get("message") else None


def send(
    client: httpx.AsyncClient, method: str, path: str, headers: dict[str, str]
) -> Awaitable[httpx.Response]:
    url = path.replace("{job_id}", "0123456789abcdef0123456789abcdef")
    body = VALID_BODIES.get(path) if method in ("POST", "PUT", "PATCH") else None
    return client.request(method, url, json=body, headers=headers)


async def test_every_route_but_probes_and_docs_refuses_a_missing_or_wrong_token(
    start_broker: StartFactory, start_echo_worker: StartFactory, edge_client: EdgeFactory
) -> None:
    broker = await start_broker(api_tokens=TOKENS)
    await start_echo_worker()
    client = await edge_client(broker.address)
    operations = guarded_operations()
    assert len(operations) > 30, operations  # the walk over the routers found them all
    problems = []
    for method, path in operations:
        for label, headers in WRONG_CREDENTIALS.items():
            reply = await send(client, method, path, headers)
            message = dialect_error(path, reply.json()) if reply.status_code == 401 else None
            if message is None:
                problems.append(f"{method} {path} with {label}: {reply.status_code} {reply.text[:300]}")
            elif TOKEN in message or WRONG in message:
                problems.append(f"{method} {path} with {label}: the error repeats the token: {message}")
        reply = await send(client, method, path, {"Authorization": f"Bearer {TOKEN}"})
        if reply.status_code in (400, 401, 422) or (reply.status_code >= 500 and reply.status_code != 503):
            problems.append(f"{method} {path} with the token: {reply.status_code} {reply.text[:300]}")
    assert not problems, "\n".join(problems)


# Bodies a route would refuse with 400 or 413: a caller without a valid token gets 401 for each all the same.
BAD_BODIES: dict[str, bytes | None] = {
    "no body": None,
    "malformed JSON": b'{"messages": [',
    "a JSON list": b"[1, 2]",
    "mistyped fields": b'{"messages": 5, "prompt": 7, "content": [], "tokens": "x", "params": 1}',
    "a body over the size limit": b'{"prompt": "' + b"x" * 4096 + b'"}',
}


async def test_a_stranger_gets_401_before_the_body_is_read(
    start_broker: StartFactory, edge_client: EdgeFactory
) -> None:
    broker = await start_broker(api_tokens=TOKENS)
    client = await edge_client(broker.address, max_body_bytes=1024)
    posts = [(m, p) for m, p in guarded_operations() if m in ("POST", "PUT", "PATCH")]
    assert len(posts) > 15, posts
    problems = []
    for method, path in posts:
        url = path.replace("{job_id}", "0123456789abcdef0123456789abcdef")
        for label in ("no token", "wrong bearer token", "wrong basic password"):
            for body_label, body in BAD_BODIES.items():
                headers = {**WRONG_CREDENTIALS[label], "content-type": "application/json"}
                reply = await client.request(method, url, content=body, headers=headers)
                if reply.status_code != 401 or dialect_error(path, reply.json()) is None:
                    problems.append(
                        f"{method} {path}, {label}, {body_label}: {reply.status_code} {reply.text}"
                    )
    assert not problems, "\n".join(problems[:20])

    allowed = {"Authorization": f"Bearer {TOKEN}", "content-type": "application/json"}
    too_large = await client.post("/v1/chat/completions", content=BAD_BODIES["a body over the size limit"],
                                  headers=allowed)  # fmt: skip
    assert too_large.status_code == 413, too_large.text
    malformed = await client.post(
        "/v1/chat/completions", content=BAD_BODIES["malformed JSON"], headers=allowed
    )
    assert malformed.status_code == 400, malformed.text


async def test_an_empty_a1111_options_post_still_needs_the_token(
    start_broker: StartFactory, edge_client: EdgeFactory
) -> None:
    """Setting no option changes nothing, but the route is no probe: a stranger learns nothing from it."""
    client = await edge_client((await start_broker(api_tokens=TOKENS)).address)
    refused = await client.post("/sdapi/v1/options", json={})
    assert refused.status_code == 401 and dialect_error("/sdapi/v1/options", refused.json())
    allowed = await client.post("/sdapi/v1/options", json={}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert allowed.status_code == 200, allowed.text


async def test_probes_and_docs_need_no_token(
    start_broker: StartFactory, start_echo_worker: StartFactory, edge_client: EdgeFactory
) -> None:
    """With tokens required and a worker serving, every probe and doc page answers 200 to a caller
    without one (a 401 or 503 here would make load balancers and orchestrators mark the edge down)."""
    await start_echo_worker()
    client = await edge_client((await start_broker(api_tokens=TOKENS)).address)
    app_paths = {r.path for r in create_app(EdgeSettings()).routes if isinstance(r, Route)}
    for path in sorted(PUBLIC & app_paths - {"/docs/oauth2-redirect"}):
        reply = await client.get(path)
        assert reply.status_code == 200, f"{path}: {reply.status_code} {reply.text[:300]}"


@pytest.mark.parametrize(
    "metadata",
    [(), bearer(WRONG), (("authorization", f"Basic {TOKEN}"),), (("authorization", TOKEN),), bearer("")],
    ids=["none", "wrong token", "basic scheme", "no scheme", "empty token"],
)
async def test_every_rpc_of_the_broker_refuses_a_missing_or_wrong_token(
    metadata: tuple[tuple[str, str], ...], start_broker: StartFactory
) -> None:
    broker = await start_broker(api_tokens=TOKENS)
    channel, stub = inference(broker.address)
    service = inference_pb2.DESCRIPTOR.services_by_name["Inference"]
    async with channel:
        for method in service.methods:
            request = getattr(inference_pb2, method.input_type.name)()
            call = getattr(stub, method.name)(request, metadata=metadata, timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await (collect(call) if method.server_streaming else call)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, method.name
            details = refused.value.details() or ""
            assert details and TOKEN not in details, method.name


# -- tokens stay out of logs and metrics -----------------------------------------------------------------


@pytest.fixture(scope="module")
def debug_cluster(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    logs = tmp_path_factory.mktemp("security")
    with running_cluster(
        redis_url, logs, tokens=TOKENS, log_level="DEBUG", with_image_worker=False
    ) as running:
        yield running


def secrets() -> dict[str, str]:
    basic = base64.b64encode(f"user:{TOKEN}".encode()).decode()
    return {"the token": TOKEN, "a wrong token": WRONG, "the token in HTTP Basic": basic}


def exercise(cluster: Cluster) -> None:
    """Authenticated and refused requests of every kind: REST in four dialects, Basic auth, SSE and NDJSON
    streams, gRPC."""
    good, basic = f"Bearer {TOKEN}", "Basic " + base64.b64encode(f"user:{TOKEN}".encode()).decode()
    with httpx.Client(base_url=cluster.edge_url, timeout=30) as client:
        for auth in (
            good,
            basic,
            f"Bearer {WRONG}",
            "Basic " + base64.b64encode(f"u:{WRONG}".encode()).decode(),
        ):
            headers = {"Authorization": auth}
            client.post("/v1/chat/completions", json=CHAT, headers=headers)
            client.post("/v1/completions", json={"prompt": "hi there", "stream": True}, headers=headers)
            client.post("/completion", json={"prompt": "hi"}, headers=headers)
            client.post("/api/generate", json={"prompt": "hi there"}, headers=headers)
            client.post("/v1/jobs", json={"complete": {"prompt": "hi"}}, headers=headers)
            client.get("/sdapi/v1/sd-models", headers=headers)
            client.get("/v1/models", headers=headers)
        assert client.get("/v1/models", headers={"Authorization": good}).status_code == 200
    with grpc.insecure_channel(cluster.broker.address) as channel:
        from velesio.v1 import inference_pb2_grpc

        stub = inference_pb2_grpc.InferenceStub(channel)
        request = inference_pb2.CompleteRequest(model="echo", prompt="over grpc")
        assert list(stub.Complete(request, metadata=tuple(bearer(TOKEN)), timeout=30))
        with pytest.raises(grpc.RpcError):
            list(stub.Complete(request, metadata=tuple(bearer(WRONG)), timeout=30))


def test_tokens_never_appear_in_the_logs(debug_cluster: Cluster) -> None:
    exercise(debug_cluster)
    debug_cluster.processes.close()  # flushes and adds the shutdown to the logs
    for child in debug_cluster.processes.children:
        text = child.log_text()
        assert " DEBUG " in text, f"{child.name} did not log at DEBUG:\n{text[-2000:]}"
        for what, secret in secrets().items():
            assert secret not in text, (
                f"{child.name} logged {what}:\n{text[text.index(secret) - 500 :][:1000]}"
            )


def test_tokens_never_appear_in_metrics(redis_url: str, tmp_path: Path) -> None:
    with running_cluster(redis_url, tmp_path, tokens=TOKENS, with_image_worker=False) as cluster:
        exercise(cluster)
        edge = httpx.get(f"{cluster.edge_url}/metrics", timeout=5)
        if edge.status_code == 404:
            pytest.skip("the edge serves no /metrics yet (404); nothing to check")
        assert edge.status_code == 200 and "velesio_requests" in edge.text, edge.text[:1000]
        served = {"edge": edge.text}
        for child in cluster.processes.children:  # brokers and workers serve it on their metrics port
            if child is not cluster.edge:
                served[child.name] = httpx.get(
                    f"http://127.0.0.1:{child.metrics_port}/metrics", timeout=5
                ).text
    for name, text in served.items():
        for what, secret in secrets().items():
            assert secret not in text, f"{name}'s metrics hold {what}"


# -- limits hold before Redis ----------------------------------------------------------------------------


async def stored_jobs(redis_url: str, keys: Keys) -> list[str]:
    """Keys of jobs, their events, queues and tenants' job lists under the test's prefix."""
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        kinds = ("job", "events", "queue", "tenant-jobs", "tenant-queued", "deadlines")
        found = []
        for kind in kinds:
            found += [key.decode() async for key in client.scan_iter(match=f"{keys.prefix}:{kind}*")]
        return found
    finally:
        await client.aclose()


def refusal_message(path: str, body: Any) -> str:
    """The message of an error in the shape of the dialect `path` belongs to (failing on any other)."""
    if path.startswith("/sdapi/"):
        assert set(body) == {"error", "detail", "body", "errors"}, body  # A1111's
        return str(body["detail"])
    if path.startswith("/api/"):  # Ollama's
        assert set(body) == {"error"}, body
        return str(body["error"])
    if ":" in path:  # native: google.rpc.Status in JSON
        assert body["status"] == "INVALID_ARGUMENT" and isinstance(body["code"], int), body
        return str(body["message"])
    return str(body["error"]["message"])  # OpenAI's and llama.cpp server's


async def chunks(size: int) -> AsyncIterator[bytes]:
    yield b'{"prompt": "'
    for _ in range(size // 1024):
        yield b"x" * 1024
    yield b'"}'


@pytest.mark.parametrize(
    "path", ["/v1/completions", "/completion", "/v1/text:complete", "/sdapi/v1/txt2img", "/api/generate"]
)
async def test_a_body_over_the_limit_is_refused_before_redis(
    path: str,
    start_broker: StartFactory,
    start_echo_worker: StartFactory,
    edge_client: EdgeFactory,
    redis_url: str,
    keys: Keys,
) -> None:
    broker = await start_broker(api_tokens=TOKENS)
    await start_echo_worker()
    client = await edge_client(broker.address, max_body_bytes=4096)
    headers = {"Authorization": f"Bearer {TOKEN}", "content-type": "application/json"}
    declared = await client.post(path, json={"prompt": "x" * 8192}, headers=headers)
    assert declared.status_code == 413, declared.text
    assert "larger than 4096 bytes" in refusal_message(path, declared.json()), declared.text
    streamed = await client.post(path, content=chunks(16384), headers=headers)  # chunked: no length given
    assert streamed.status_code == 413, streamed.text
    assert "larger than 4096 bytes" in refusal_message(path, streamed.json()), streamed.text
    assert await stored_jobs(redis_url, keys) == []
    fits = await client.post(path, json={"prompt": "small enough"}, headers=headers)
    assert fits.status_code != 413  # the limit is the body's size, nothing else


async def test_a_prompt_over_the_limit_is_refused_before_redis(
    start_broker: StartFactory, start_echo_worker: StartFactory, redis_url: str, keys: Keys
) -> None:
    broker = await start_broker(api_tokens=TOKENS, max_prompt_chars=100, max_image_bytes=1000)
    await start_echo_worker()
    long = "y" * 101
    chat = [common_pb2.ChatMessage(role="user", content="z" * 60)] * 2
    image = inference_pb2.GenerateImageRequest(params=common_pb2.ImageParams(prompt=long))
    init = common_pb2.ImageParams(prompt="a cat", init_images=[b"\x89PNG" + b"\0" * 1000])
    too_big = [  # (RPC, request, the limit its refusal names)
        ("Complete", inference_pb2.CompleteRequest(model="echo", prompt=long), "100"),
        ("Chat", inference_pb2.ChatRequest(model="echo", messages=chat), "100"),
        ("GenerateImage", image, "100"),
        ("GenerateImage", inference_pb2.GenerateImageRequest(params=init), "1000"),
        ("Submit", inference_pb2.SubmitRequest(complete=inference_pb2.CompleteRequest(prompt=long)), "100"),
        ("Submit", inference_pb2.SubmitRequest(chat=inference_pb2.ChatRequest(messages=chat)), "100"),
    ]
    channel, stub = inference(broker.address)
    async with channel:
        for name, request, limit in too_big:
            call = getattr(stub, name)(request, metadata=bearer(TOKEN), timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await (call if name == "Submit" else collect(call))
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
            assert limit in (refused.value.details() or ""), name
        assert await stored_jobs(redis_url, keys) == []
        fits = await collect(
            stub.Complete(inference_pb2.CompleteRequest(prompt="y" * 100), metadata=bearer(TOKEN))
        )
        assert fits[-1].HasField("done")


async def test_a_prompt_over_the_limit_is_a_400_in_each_dialect(
    start_broker: StartFactory,
    start_echo_worker: StartFactory,
    edge_client: EdgeFactory,
    redis_url: str,
    keys: Keys,
) -> None:
    broker = await start_broker(api_tokens=TOKENS, max_prompt_chars=100)
    await start_echo_worker()
    client = await edge_client(broker.address)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    long = "w" * 101
    for path, body in [
        ("/v1/completions", {"prompt": long}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": long}], "stream": True}),
        ("/completion", {"prompt": long, "stream": True}),
        ("/v1/text:complete", {"prompt": long}),
        ("/v1/jobs", {"complete": {"prompt": long}}),
        ("/sdapi/v1/txt2img", {"prompt": long}),
        ("/api/generate", {"prompt": long, "raw": True}),
        ("/api/chat", {"messages": [{"role": "user", "content": long}]}),  # an NDJSON stream, by default
    ]:
        reply = await client.post(path, json=body, headers=headers)
        assert reply.status_code == 400, f"{path}: {reply.status_code} {reply.text}"
        assert "100" in reply.text, f"{path}: {reply.text}"
    assert await stored_jobs(redis_url, keys) == []
