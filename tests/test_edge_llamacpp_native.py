"""The llama.cpp / LLM for Unity dialect and the native JSON routes of the edge, against a real broker and
echo worker. Request bodies follow LLM for Unity's documented request format (2.x and 3.x)."""

from __future__ import annotations

import json
from typing import Any

import grpc
import httpx
import pytest

from edge.errors import HTTP_STATUS
from tests.conftest import EdgeFactory, StartFactory
from tests.helpers import eventually

PROMPT = "<|im_start|>user\nhello there friend<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture
async def edge(
    start_broker: StartFactory, start_echo_worker: StartFactory, edge_client: EdgeFactory
) -> httpx.AsyncClient:
    broker = await start_broker(api_tokens="unity:key-1")
    await start_echo_worker(echo_delay_ms=0)
    client = await edge_client(broker.address)
    client.headers["authorization"] = "Bearer key-1"
    return client


async def _until_ready(edge: httpx.AsyncClient, path: str) -> None:
    """The broker learns within a second that a worker registered; probes say so from then on."""

    async def ready() -> bool:
        return (await edge.get(path)).status_code == 200

    await eventually(ready, limit_s=5)


def data_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]


# LLM for Unity 2.x: /completion streaming with its sampling fields, /template, /tokenize.
UNITY_COMPLETION = {
    "prompt": PROMPT, "id_slot": 0, "temperature": 0.2, "top_k": 40, "top_p": 0.9, "min_p": 0.05,
    "n_predict": 12, "typical_p": 1.0, "repeat_penalty": 1.1, "repeat_last_n": 64, "presence_penalty": 0.0,
    "frequency_penalty": 0.0, "penalty_prompt": None, "mirostat": 0, "mirostat_tau": 5.0, "mirostat_eta": 0.1,
    "grammar": "", "n_probs": 0, "ignore_eos": False, "cache_prompt": True, "seed": 42,
    "stop": ["<|im_end|>"], "stream": True, "n_keep": -1,
}  # fmt: skip


async def test_completion_streams_like_llama_cpp(edge: httpx.AsyncClient) -> None:
    reply = await edge.post("/completion", json=UNITY_COMPLETION)
    assert reply.status_code == 200, reply.text
    lines = data_lines(reply.text)
    assert all(line["stop"] is False for line in lines[:-1])
    last = lines[-1]
    assert last["stop"] is True
    assert last["stop_type"] == "limit" and last["tokens_predicted"] == 12
    assert {"timings", "tokens_evaluated", "stopping_word", "model"} <= set(last)
    assert "".join(line["content"] for line in lines) == PROMPT[:12]


async def test_completion_not_streamed_with_stop_word(edge: httpx.AsyncClient) -> None:
    body = UNITY_COMPLETION | {"stream": False, "n_predict": -1, "stop": ["friend"]}
    reply = await edge.post("/completion", json=body)
    answer = reply.json()
    assert answer["content"] == "<|im_start|>user\nhello there "
    assert answer["stop_type"] == "word" and answer["stopping_word"] == "friend"
    assert answer["timings"]["predicted_n"] == len(answer["content"])


async def test_tokenizer_template_and_props(edge: httpx.AsyncClient) -> None:
    tokens = (await edge.post("/tokenize", json={"content": "hé"})).json()["tokens"]
    assert tokens == [ord("h"), ord("é")]
    pieces = (await edge.post("/tokenize", json={"content": "hé", "with_pieces": True})).json()["tokens"]
    assert pieces == [{"id": ord("h"), "piece": "h"}, {"id": ord("é"), "piece": "é"}]
    assert (await edge.post("/detokenize", json={"tokens": tokens})).json() == {"content": "hé"}
    messages = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"}]
    prompt = (await edge.post("/apply-template", json={"messages": messages})).json()["prompt"]
    assert prompt == "<|system|>\nbe kind\n<|user|>\nhi\n<|assistant|>\n"
    assert "messages" in (await edge.post("/template")).json()["template"]
    props = (await edge.get("/props")).json()
    assert props["default_generation_settings"]["n_ctx"] > 0 and props["chat_template"]
    assert (await edge.post("/props")).status_code == 200
    await _until_ready(edge, "/health")
    assert (await edge.post("/health")).json() == {"status": "ok"}
    assert (await edge.get("/health", headers={"authorization": ""})).status_code == 200


@pytest.mark.parametrize(
    ("path", "payload", "status"),
    [
        ("/completion", {"prompt": "", "n_predict": 4}, 400),
        ("/completion", {"prompt": "x", "n_predict": -5}, 400),
        ("/completion", {"prompt": "x", "temperature": "hot"}, 400),
        ("/completion", {"prompt": "x", "model": "nope"}, 404),
        ("/completion", {"prompt": "x", "logit_bias": [["a", 1]]}, 400),
        ("/tokenize", {"content": 5}, 400),
        ("/detokenize", {"tokens": ["a"]}, 400),
        ("/apply-template", {"messages": []}, 400),
    ],
)
async def test_bad_input_is_a_llama_cpp_error(
    edge: httpx.AsyncClient, path: str, payload: dict[str, Any], status: int
) -> None:
    reply = await edge.post(path, json=payload)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["code"] == status and error["message"] and error["type"]


async def test_llama_cpp_auth(edge: httpx.AsyncClient) -> None:
    reply = await edge.post("/completion", json={"prompt": "x"}, headers={"authorization": "Bearer bad"})
    assert reply.status_code == 401
    assert reply.json()["error"]["type"] == "authentication_error"


async def test_native_jobs_routes_and_resume(edge: httpx.AsyncClient) -> None:
    submitted = await edge.post(
        "/v1/jobs", json={"complete": {"prompt": "one two three four", "sampling": {"max_tokens": 8}}}
    )
    assert submitted.status_code == 200, submitted.text
    job_id = submitted.json()["job_id"]
    events = await edge.get(f"/v1/jobs/{job_id}/events")
    assert events.headers["content-type"].startswith("text/event-stream")
    blocks = [b for b in events.text.split("\n\n") if b.strip()]
    parsed = [dict(line.split(": ", 1) for line in b.splitlines()) for b in blocks]
    assert parsed[-1]["event"] == "done"
    text = "".join(json.loads(p["data"]).get("token", {}).get("text", "") for p in parsed)
    assert text == "one two "
    middle = parsed[2]["id"]
    resumed = await edge.get(f"/v1/jobs/{job_id}/events", headers={"last-event-id": middle})
    later = [b for b in resumed.text.split("\n\n") if b.strip()]
    assert len(later) == len(parsed) - 3
    job = (await edge.get(f"/v1/jobs/{job_id}")).json()["job"]
    assert job["state"] == "JOB_STATE_SUCCEEDED"
    cancelled = await edge.delete(f"/v1/jobs/{job_id}")
    assert cancelled.json()["job"]["state"] == "JOB_STATE_SUCCEEDED"  # already finished: unchanged
    cluster = (await edge.get("/v1/cluster")).json()
    assert cluster["workers"][0]["models"] == ["echo"]
    streamed = await edge.post("/v1/text:complete", json={"prompt": "a b"})
    assert "event: done" in streamed.text


async def test_native_errors_are_google_rpc_status(edge: httpx.AsyncClient) -> None:
    missing = await edge.get("/v1/jobs/nope")
    assert missing.status_code == 404
    assert missing.json()["status"] == "NOT_FOUND" and missing.json()["code"] == 5
    bad = await edge.post("/v1/jobs", json={"complete": {"prompt": ""}})
    assert bad.status_code == 400 and "prompt" in bad.json()["message"]
    wrong_type = await edge.post("/v1/jobs", json={"complete": {"prompt": 7}})
    assert wrong_type.status_code == 400
    not_json = await edge.post("/v1/jobs", content=b"[1,", headers={"content-type": "application/json"})
    assert not_json.status_code == 400


async def test_ops_probes_need_no_token(edge: httpx.AsyncClient) -> None:
    headers = {"authorization": ""}
    assert (await edge.get("/healthz", headers=headers)).json() == {"status": "ok"}
    await _until_ready(edge, "/readyz")
    ready = await edge.get("/readyz", headers=headers)
    assert ready.status_code == 200 and ready.json()["text"] is True
    schema = (await edge.get("/openapi.json", headers=headers)).json()
    for path in ("/v1/chat/completions", "/completion", "/v1/jobs", "/v1/jobs/{job_id}/events", "/readyz"):
        assert path in schema["paths"]
    assert (await edge.get("/docs", headers=headers)).status_code == 200


def test_every_grpc_code_has_its_http_status() -> None:
    expected = {
        "INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "OUT_OF_RANGE": 400, "UNAUTHENTICATED": 401,
        "PERMISSION_DENIED": 403, "NOT_FOUND": 404, "ALREADY_EXISTS": 409, "ABORTED": 409,
        "RESOURCE_EXHAUSTED": 429, "CANCELLED": 499, "UNIMPLEMENTED": 501, "UNAVAILABLE": 503,
        "DEADLINE_EXCEEDED": 504,
    }  # fmt: skip
    from edge.errors import http_status

    for code in grpc.StatusCode:
        if code == grpc.StatusCode.OK:
            continue
        assert http_status(code) == expected.get(code.name, 500), code
    assert len(HTTP_STATUS) == len(expected) + 1
