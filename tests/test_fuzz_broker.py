"""Hypothesis sends random protobuf requests to every RPC of velesio.v1.Inference on a real broker (with a
real echo text worker and tiny image worker behind it): any field value (extreme and negative numbers, NaN,
random text and bytes, unknown enum values, a real PNG now and then), with a valid token, a wrong one or
none. Every answer is OK or a defined status with a message: never UNKNOWN, never INTERNAL, and the same
holds for error events inside streams. The broker serves normally afterwards.

The RPCs and their request types come from the service descriptor, so a new RPC is fuzzed too. CI runs a
short derandomized profile; VELESIO_FUZZ_EXAMPLES raises it."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor, message, message_factory
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from edge.native.schema import RANGES
from tests.helpers import FUZZ, FUZZ_EXAMPLES, bearer
from tests.processes import Cluster, grpc_serving, running_cluster
from velesio.v1 import common_pb2, inference_pb2, inference_pb2_grpc

pytestmark = pytest.mark.fuzz

EXAMPLES = FUZZ_EXAMPLES
TOKEN = "broker-fuzz-token-77e1"
CALL_TIMEOUT_S = 20.0
MAX_EVENTS = 200  # a stream is read this far, then cancelled (which must not go wrong either)
SERVICE = inference_pb2.DESCRIPTOR.services_by_name["Inference"]
NAMES = {code.value[0]: code.name for code in grpc.StatusCode}
NEVER = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
FD = descriptor.FieldDescriptor


def _png(side: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (side, side), (200, 30, 30)).save(out, format="PNG")
    return out.getvalue()


PNGS = [_png(64), _png(128)]
INTEGERS = RANGES  # what each protobuf integer type holds
# Plausible values for some fields, so that part of the requests get past the first checks and go deep.
HINTS: dict[str, st.SearchStrategy[Any]] = {
    "model": st.sampled_from(["", "echo", "tiny"]),
    "role": st.sampled_from(["user", "system", "assistant"]),
    "sampler": st.sampled_from(["Euler", "Euler a", "DPM++ 2M", "DDIM"]),
    "scheduler": st.sampled_from(["Automatic", "Karras"]),
    "width": st.sampled_from([64, 128, 72]),
    "height": st.sampled_from([64, 128, 72]),
    "steps": st.integers(1, 3),
    "batch_size": st.integers(1, 2),
    "n_iter": st.integers(1, 2),
    "max_tokens": st.integers(1, 40) | st.just(-1),
    "json_schema": st.sampled_from(["", '{"type": "object"}']),
    "grammar": st.just(""),
    "after_event_id": st.just(""),
}


def integers(low: int, high: int) -> st.SearchStrategy[int]:
    return st.integers(low, high) | st.sampled_from([low, high, 0, -1 if low < 0 else 1, 1])


@dataclass(frozen=True)
class Requests:
    """Strategies for random messages of any type: each field set or not, with any value of its type, or
    one of `hints` (by field name) now and then. `plausible` keeps numbers small, enums known and bytes
    real images, so that many requests pass validation and run on the workers."""

    hints: dict[str, st.SearchStrategy[Any]]
    plausible: bool = False

    def of(self, message_type: descriptor.Descriptor, depth: int = 0) -> st.SearchStrategy[Any]:
        return st.composite(lambda draw: self._build(draw, message_type, depth))()

    def _build(self, draw: st.DrawFn, message_type: descriptor.Descriptor, depth: int) -> message.Message:
        built = message_factory.GetMessageClass(message_type)()
        oneofs_set: set[str] = set()
        for field in message_type.fields:
            oneof = field.containing_oneof
            if oneof is not None and oneof.name in oneofs_set:
                continue
            wanted = draw(st.sampled_from([True, True, True, False] if self.plausible else [True, False]))
            if not wanted or (field.message_type is not None and depth >= 3):
                continue
            drawn = draw(self.value(field, depth))
            if oneof is not None:
                oneofs_set.add(oneof.name)
            target = getattr(built, field.name)
            if _is_map(field):
                target.update(drawn)
            elif field.is_repeated and field.message_type is not None:
                target.extend(drawn)
            elif field.is_repeated:
                target[:] = drawn
            elif field.message_type is not None:
                target.CopyFrom(drawn)
            else:
                setattr(built, field.name, drawn)
        return built

    def value(self, field: descriptor.FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
        if _is_map(field):
            entry = field.message_type.fields_by_name  # type: ignore[union-attr]
            return st.dictionaries(
                self.scalar(entry["key"], depth), self.scalar(entry["value"], depth), max_size=3
            )
        one = self.scalar(field, depth)
        if field.name in self.hints:
            one = self.hints[field.name] if self.plausible else self.hints[field.name] | one
        return st.lists(one, min_size=int(self.plausible), max_size=4) if field.is_repeated else one

    def scalar(self, field: descriptor.FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
        if field.message_type is not None:
            return self.of(field.message_type, depth + 1)
        if self.plausible:
            return self._plausible(field)
        if field.type in INTEGERS:
            return integers(*INTEGERS[field.type])
        if field.type in (FD.TYPE_FLOAT, FD.TYPE_DOUBLE):
            return st.floats(width=32 if field.type == FD.TYPE_FLOAT else 64)
        if field.type == FD.TYPE_BOOL:
            return st.booleans()
        if field.type == FD.TYPE_STRING:
            return st.text(max_size=40) | st.text(min_size=200, max_size=2000)
        if field.type == FD.TYPE_BYTES:
            return st.binary(max_size=64) | st.sampled_from(PNGS)
        assert field.enum_type is not None
        return st.sampled_from([v.number for v in field.enum_type.values]) | st.integers(-3, 1000)

    def _plausible(self, field: descriptor.FieldDescriptor) -> st.SearchStrategy[Any]:
        if field.type in INTEGERS:
            return st.integers(0, 4)
        if field.type in (FD.TYPE_FLOAT, FD.TYPE_DOUBLE):
            return st.floats(0, 1, width=32)
        if field.type == FD.TYPE_BOOL:
            return st.booleans()
        if field.type == FD.TYPE_STRING:
            return st.text(min_size=1, max_size=30)
        if field.type == FD.TYPE_BYTES:
            return st.sampled_from(PNGS)
        assert field.enum_type is not None
        return st.sampled_from([v.number for v in field.enum_type.values])


def _is_map(field: descriptor.FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


@pytest.fixture(scope="module")
def cluster(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    logs = tmp_path_factory.mktemp("fuzz-broker")
    with running_cluster(redis_url, logs, tokens=f"fuzzer:{TOKEN}", with_edge=False) as running:
        yield running


@pytest.fixture(scope="module")
def channel(cluster: Cluster) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(cluster.broker.address) as opened:
        yield opened


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> inference_pb2_grpc.InferenceStub:
    return inference_pb2_grpc.InferenceStub(channel)


def call(stub: Any, method: descriptor.MethodDescriptor, request: message.Message, metadata: Any) -> Any:
    """Makes the call; returns the events of a stream (or the reply). Raises grpc.RpcError."""
    rpc = getattr(stub, method.name)
    if not method.server_streaming:
        return rpc(request, metadata=metadata, timeout=CALL_TIMEOUT_S)
    stream = rpc(request, metadata=metadata, timeout=CALL_TIMEOUT_S)
    events = []
    try:
        for reply in stream:
            events.append(reply.event)
            if len(events) >= MAX_EVENTS:
                break
    finally:
        stream.cancel()
    return events


def check_status(error: grpc.RpcError, what: str) -> grpc.StatusCode:
    code = error.code()
    details = error.details()
    assert code in set(grpc.StatusCode), what
    assert code not in NEVER, f"{what}: {code.name} {details}"
    assert details, f"{what}: {code.name} without a message"
    return code


def check_events(events: list[Any], what: str) -> None:
    for event in events:
        if event.HasField("error"):
            error = event.error
            name = NAMES.get(error.code)
            assert name is not None, f"{what}: error event with code {error.code}"
            assert grpc.StatusCode[name] not in NEVER, f"{what}: error event {name} {error.message}"
            assert error.message, f"{what}: error event {name} without a message"


@pytest.fixture(scope="module")
def job_ids(stub: Any) -> list[str]:
    """Real jobs (text and image, streamed and submitted), for Watch, GetJob, CancelJob... to find."""
    metadata = bearer(TOKEN)
    text = inference_pb2.CompleteRequest(model="echo", prompt="a job to look at")
    image = inference_pb2.GenerateImageRequest(params=common_pb2.ImageParams(width=64, height=64, steps=1))
    found = [
        list(stub.Complete(text, metadata=metadata, timeout=CALL_TIMEOUT_S))[-1].event.job_id,
        list(stub.GenerateImage(image, metadata=metadata, timeout=CALL_TIMEOUT_S))[-1].event.job_id,
        stub.Submit(inference_pb2.SubmitRequest(complete=text), metadata=metadata).job_id,
    ]
    assert all(found)
    return found


METHODS = list(SERVICE.methods)
AUTH = {"token": bearer(TOKEN), "wrong token": bearer("not-" + TOKEN), "no token": ()}


@pytest.mark.parametrize("values", ["any values", "plausible values"])
@pytest.mark.parametrize("method", METHODS, ids=[m.name for m in METHODS])
@FUZZ
@given(data=st.data())
def test_random_requests_get_well_formed_answers(
    method: descriptor.MethodDescriptor, values: str, data: st.DataObject, stub: Any, job_ids: list[str]
) -> None:
    hints = HINTS | {"job_id": st.sampled_from(job_ids)}
    request = data.draw(Requests(hints, values == "plausible values").of(method.input_type), label="request")
    auth = data.draw(st.sampled_from(["token", "token", "token", "wrong token", "no token"]), label="auth")
    what = f"{method.name}({request}) with {auth}"
    try:
        reply = call(stub, method, request, AUTH[auth])
    except grpc.RpcError as error:
        code = check_status(error, what)
        if auth != "token":
            assert code == grpc.StatusCode.UNAUTHENTICATED, what
        return
    assert auth == "token", f"{what} was answered without a valid token"
    if method.server_streaming:
        check_events(reply, what)


@pytest.mark.parametrize("method", METHODS, ids=[m.name for m in METHODS])
@settings(FUZZ, max_examples=max(EXAMPLES // 3, 1))
@given(raw=st.binary(max_size=200))
def test_random_bytes_get_well_formed_answers(
    method: descriptor.MethodDescriptor, raw: bytes, channel: Any
) -> None:
    """Bytes that are often no protobuf at all: those that do not parse as the method's request are
    INVALID_ARGUMENT naming that; those that do get a well-formed answer (events or a status with a
    message), never UNKNOWN or INTERNAL."""
    try:
        message_factory.GetMessageClass(method.input_type).FromString(raw)
        parses = True
    except message.DecodeError:
        parses = False
    path = f"/{SERVICE.full_name}/{method.name}"
    rpc = channel.unary_stream(path) if method.server_streaming else channel.unary_unary(path)
    what = f"{method.name}({raw!r})"
    try:
        reply = rpc(raw, metadata=AUTH["token"], timeout=CALL_TIMEOUT_S)
        if method.server_streaming:
            for _ in zip(range(MAX_EVENTS), reply, strict=False):
                pass
            reply.cancel()
    except grpc.RpcError as error:
        code, details = check_status(error, what), error.details() or ""
    else:
        assert parses, f"{what} is no {method.input_type.name}, yet it was answered as one"
        return
    if not parses:
        assert code == grpc.StatusCode.INVALID_ARGUMENT, f"{what}: {code.name} {details}"
        assert "not a valid protobuf message" in details, what


def test_the_broker_serves_normally_afterwards(cluster: Cluster, stub: Any) -> None:
    assert grpc_serving(cluster.broker.address)
    request = inference_pb2.CompleteRequest(model="echo", prompt="still here")
    events = list(stub.Complete(request, metadata=bearer(TOKEN), timeout=CALL_TIMEOUT_S))
    assert "".join(r.event.token.text for r in events) == "still here"
    assert events[-1].event.HasField("done")
    for child in cluster.processes.children:
        text = child.log_text()
        assert "unhandled error" not in text, f"{child.name}:\n{text[text.index('unhandled error') :][:3000]}"
        assert child.process.poll() is None, f"{child.name} exited:\n{text[-3000:]}"
