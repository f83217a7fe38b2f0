"""Schemathesis against the edge's OpenAPI document: every operation, with a valid token and with none,
against real `velesio` processes (edge, broker, echo text worker, tiny image worker). No request, however
malformed, gets a 5xx, and responses have the content types and schemas the document gives them.

With a token, every operation gets schemathesis' coverage phase (boundary values, wrong types, missing
fields: the requests reach the broker and workers) and then random examples; without one, random examples
only, which the broker refuses. CI runs a short, derandomized profile; `VELESIO_FUZZ_EXAMPLES=500 pytest -m
fuzz` runs a longer one. The regression tests at the end pin what the fuzzer found."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

from edge.app import create_app
from edge.errors import ApiError, bad_request
from edge.settings import EdgeSettings
from tests.conftest import EdgeFactory, StartFactory
from tests.helpers import FUZZ, FUZZ_EXAMPLES
from tests.processes import Cluster, running_cluster

pytestmark = pytest.mark.fuzz

EXAMPLES = FUZZ_EXAMPLES
TOKEN = "fuzz-token-4f1c"
CHECKS = [not_a_server_error, content_type_conformance, response_schema_conformance]
SPEC = create_app(EdgeSettings()).openapi()
thorough = schemathesis.openapi.from_dict(SPEC, config=schemathesis.Config.from_dict({"seed": 0}))
random_only = schemathesis.openapi.from_dict(
    SPEC, config=schemathesis.Config.from_dict({"seed": 0, "phases": {"coverage": {"enabled": False}}})
)


@pytest.fixture(scope="module")
def cluster(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    logs = tmp_path_factory.mktemp("fuzz-edge")
    with running_cluster(redis_url, logs, tokens=f"fuzzer:{TOKEN}") as running:
        yield running


@thorough.parametrize()
@FUZZ
def test_with_token(case: Any, cluster: Cluster) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    case.call_and_validate(base_url=cluster.edge_url, headers=headers, checks=CHECKS, timeout=60)


@random_only.parametrize()
@settings(FUZZ, max_examples=max(EXAMPLES // 2, 1))
def test_without_token(case: Any, cluster: Cluster) -> None:
    case.call_and_validate(base_url=cluster.edge_url, checks=CHECKS, timeout=60)


def test_nothing_failed_inside_streams(cluster: Cluster) -> None:
    """An error after a 200 (in an SSE stream) escapes the checks above; the processes' logs show it."""
    for child in cluster.processes.children:
        text = child.log_text()
        for marker in ("unhandled error", "Exception in ASGI application"):
            assert marker not in text, f"{child.name} logged {marker!r}:\n{text[text.index(marker) :][:3000]}"
        assert child.process.poll() is None, f"{child.name} exited:\n{text[-3000:]}"


# -- what the fuzzer found -------------------------------------------------------------------------------

OUT_OF_RANGE: list[tuple[str, dict[str, Any]]] = [
    ("/completion", {"prompt": "hi", "top_k": 2**40}),
    ("/completion", {"prompt": "hi", "seed": 2**64}),
    ("/completion", {"prompt": "hi", "logit_bias": [[2**40, 1.0]]}),
    ("/completion", {"prompt": "hi", "logit_bias": [["²", 1.0]]}),
    ("/completion", {"prompt": "hi", "logit_bias": [[5, "x"]]}),
    ("/completion", {"prompt": "hi", "logit_bias": [[5, 10**400]]}),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"5": 10**400}}),
    ("/completion", {"prompt": [2**40]}),
    ("/detokenize", {"tokens": [2**40]}),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2**40}),
    ("/v1/completions", {"prompt": "hi", "seed": 2**63 - 1}),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"99999999999": 1}}),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 2**40},
    ),
    ("/v1/images/generations", {"prompt": "a cat", "size": "99999999999x64"}),
    ("/v1/images/generations", {"prompt": "a cat", "size": "²x64"}),
    ("/sdapi/v1/txt2img", {"prompt": "a cat", "height": 5228042183}),
    ("/sdapi/v1/txt2img", {"prompt": "a cat", "seed": -(2**64)}),
    ("/sdapi/v1/img2img", {"init_images": ["AAAA"], "mask_blur": 2**31}),
]


@pytest.mark.parametrize(("path", "body"), OUT_OF_RANGE)
async def test_numbers_protobuf_cannot_hold_are_a_400(
    path: str, body: dict[str, Any], start_broker: StartFactory, edge_client: EdgeFactory
) -> None:
    """protobuf refuses integers outside a field's range with a ValueError, which was a 500."""
    client = await edge_client((await start_broker()).address)
    reply = await client.post(path, json=body)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"], reply.text


@pytest.mark.parametrize("path", ["/v1/text:complete", "/v1/jobs", "/v1/text:detokenize"])
async def test_native_routes_refuse_bodies_that_are_not_utf8(
    path: str, start_broker: StartFactory, edge_client: EdgeFactory
) -> None:
    client = await edge_client((await start_broker()).address)
    reply = await client.post(path, content=b"\xf3\x9d{", headers={"content-type": "application/json"})
    assert reply.status_code == 400, reply.text
    assert reply.json()["status"] == "INVALID_ARGUMENT"


@pytest.mark.parametrize(
    ("path", "body"), [("/detokenize", {"tokens": [0xD800]}), ("/completion", {"prompt": [-5]})]
)
async def test_a_workers_invalid_argument_reaches_the_client_as_a_400(
    path: str,
    body: dict[str, Any],
    start_broker: StartFactory,
    start_echo_worker: StartFactory,
    edge_client: EdgeFactory,
) -> None:
    """The worker refuses token ids it has no text for; the broker passed that on as INTERNAL (a 500)."""
    broker = await start_broker()
    await start_echo_worker()
    client = await edge_client(broker.address)
    reply = await client.post(path, json=body)
    assert reply.status_code == 400, reply.text
    assert "tokens" in reply.json()["error"]["message"]


def test_api_errors_pass_through_context_managers() -> None:
    """A frozen dataclass refused the __traceback__ that contextlib sets on an exception leaving a `with`
    block (FastAPI's telemetry spans are such blocks), so every ApiError became a 500 in `velesio edge`."""

    @contextlib.contextmanager
    def span() -> Iterator[None]:
        yield

    with pytest.raises(ApiError) as raised, span():
        raise bad_request("no", "field")
    assert raised.value.status == 400
