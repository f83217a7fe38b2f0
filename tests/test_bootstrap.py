"""The gRPC bootstrap against real servers: health, reflection, error mapping, deadlines, cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from mesh import errors
from mesh.server import Context, Service
from tests.conftest import ServeFactory
from velesio.v1 import events_pb2, inference_pb2, inference_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

ERRORS_BY_JOB_ID: dict[str, errors.VelesioError] = {
    "invalid": errors.InvalidArgument("must not be empty", field="prompt"),
    "missing": errors.NotFound("job missing not found"),
    "who": errors.Unauthenticated("missing bearer token"),
    "denied": errors.PermissionDenied("not yours"),
    "busy": errors.ResourceExhausted("too many requests", retry_after=2.4),
    "down": errors.Unavailable("no worker"),
    "late": errors.DeadlineExceeded("deadline passed while queued"),
    "precondition": errors.FailedPrecondition("job is not running"),
}


class ProbeInference(inference_pb2_grpc.InferenceServicer):
    """A real Inference servicer whose methods exercise the bootstrap, not the broker. The RPCs it leaves
    out keep the generated base class's behaviour (UNIMPLEMENTED), which a test relies on."""

    def __init__(self) -> None:
        self.cancelled = asyncio.Event()
        self.started = asyncio.Event()

    async def GetJob(
        self, request: inference_pb2.GetJobRequest, context: Context
    ) -> inference_pb2.GetJobResponse:
        if request.job_id in ERRORS_BY_JOB_ID:
            raise ERRORS_BY_JOB_ID[request.job_id]
        if request.job_id == "bug":
            raise ZeroDivisionError("a bug")
        return inference_pb2.GetJobResponse(job=inference_pb2.Job(job_id=request.job_id))

    async def Watch(
        self, request: inference_pb2.WatchRequest, context: Context
    ) -> AsyncIterator[inference_pb2.WatchResponse]:
        self.started.set()
        try:
            for i in range(1000):
                event = events_pb2.JobEvent(event_id=str(i), job_id=request.job_id)
                yield inference_pb2.WatchResponse(event=event)
                if request.job_id == "fails-after-one":
                    raise errors.Unavailable("worker died")
                await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


async def drain(
    call: grpc.aio.UnaryStreamCall[inference_pb2.WatchRequest, inference_pb2.WatchResponse],
) -> None:
    while await call.read() is not grpc.aio.EOF:
        pass


@pytest.fixture
def probe() -> ProbeInference:
    return ProbeInference()  # type: ignore[abstract]


def inference_service(servicer: inference_pb2_grpc.InferenceServicer) -> Service:
    return Service(
        inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
        lambda server: inference_pb2_grpc.add_InferenceServicer_to_server(servicer, server),
    )


async def test_health_serving_then_not_serving_on_shutdown(
    serve: ServeFactory, probe: ProbeInference
) -> None:
    served = await serve([inference_service(probe)], grace=1.0)
    stub = health_pb2_grpc.HealthStub(served.channel)
    for service in ("", "velesio.v1.Inference"):
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == SERVING

    watch = stub.Watch(health_pb2.HealthCheckRequest(service="velesio.v1.Inference"))
    assert (await watch.read()).status == SERVING
    stopping = asyncio.create_task(served.server.stop())
    assert (await asyncio.wait_for(watch.read(), 5)).status == NOT_SERVING
    await stopping
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_unknown_service_health_is_not_found(serve: ServeFactory, probe: ProbeInference) -> None:
    served = await serve([inference_service(probe)])
    stub = health_pb2_grpc.HealthStub(served.channel)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Check(health_pb2.HealthCheckRequest(service="velesio.v1.Nope"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_in_flight_stream_finishes_within_grace(serve: ServeFactory, probe: ProbeInference) -> None:
    served = await serve([inference_service(probe)], grace=2.0)
    stub = inference_pb2_grpc.InferenceStub(served.channel)
    call = stub.Watch(inference_pb2.WatchRequest(job_id="long"))
    await call.read()
    stopping = asyncio.create_task(served.server.stop())
    # Still streaming while the grace period runs...
    reply = await call.read()
    assert isinstance(reply, inference_pb2.WatchResponse)
    assert reply.event.job_id == "long"
    await stopping
    # ...and cut off when it ends.
    with pytest.raises(grpc.aio.AioRpcError):
        await drain(call)


async def test_reflection_lists_and_describes_services(serve: ServeFactory, probe: ProbeInference) -> None:
    served = await serve([inference_service(probe)])
    database = ProtoReflectionDescriptorDatabase(grpc.insecure_channel(served.address))
    services = set(await asyncio.to_thread(database.get_services))
    assert {"velesio.v1.Inference", "grpc.health.v1.Health"} <= services
    file = await asyncio.to_thread(database.FindFileContainingSymbol, "velesio.v1.Inference")
    methods = {m.name for s in file.service if s.name == "Inference" for m in s.method}
    assert {"Complete", "Chat", "GenerateImage", "Submit", "Watch", "GetJob", "CancelJob"} <= methods
    assert {"Tokenize", "Detokenize", "ListModels", "GetCluster"} <= methods


@pytest.mark.parametrize("job_id", sorted(ERRORS_BY_JOB_ID))
async def test_error_types_become_their_status(
    serve: ServeFactory, probe: ProbeInference, job_id: str
) -> None:
    served = await serve([inference_service(probe)])
    stub = inference_pb2_grpc.InferenceStub(served.channel)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.GetJob(inference_pb2.GetJobRequest(job_id=job_id))
    expected = ERRORS_BY_JOB_ID[job_id]
    assert info.value.code() == expected.code
    assert info.value.details() == expected.message


async def test_invalid_argument_names_the_field(serve: ServeFactory, probe: ProbeInference) -> None:
    served = await serve([inference_service(probe)])
    stub = inference_pb2_grpc.InferenceStub(served.channel)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.GetJob(inference_pb2.GetJobRequest(job_id="invalid"))
    assert info.value.details() == "prompt: must not be empty"


async def test_resource_exhausted_carries_retry_after(serve: ServeFactory, probe: ProbeInference) -> None:
    served = await serve([inference_service(probe)])
    stub = inference_pb2_grpc.InferenceStub(served.channel)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.GetJob(inference_pb2.GetJobRequest(job_id="busy"))
    assert ("retry-after", "2") in tuple(info.value.trailing_metadata() or ())


async def test_unexpected_exception_is_internal_and_server_keeps_serving(
    serve: ServeFactory, probe: ProbeInference, caplog: pytest.LogCaptureFixture
) -> None:
    served = await serve([inference_service(probe)])
    stub = inference_pb2_grpc.InferenceStub(served.channel)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.GetJob(inference_pb2.GetJobRequest(job_id="bug"))
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "a bug" not in (info.value.details() or "")
    assert any(r.exc_info and r.exc_info[0] is ZeroDivisionError for r in caplog.records)
    reply = await stub.GetJob(inference_pb2.GetJobRequest(job_id="fine"))
    assert reply.job.job_id == "fine"


async def test_error_mid_stream_keeps_delivered_events(serve: ServeFactory, probe: ProbeInference) -> None:
    served = await serve([inference_service(probe)])
    stub = inference_pb2_grpc.InferenceStub(served.channel)
    call = stub.Watch(inference_pb2.WatchRequest(job_id="fails-after-one"))
    first = await call.read()
    assert isinstance(first, inference_pb2.WatchResponse)
    assert first.event.event_id == "0"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await drain(call)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert info.value.details() == "worker died"


async def test_unimplemented_rpc_is_unimplemented(serve: ServeFactory, probe: ProbeInference) -> None:
    served = await serve([inference_service(probe)])
    stub = inference_pb2_grpc.InferenceStub(served.channel)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.GetCluster(inference_pb2.GetClusterRequest())
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_deadline_is_honoured_and_stops_the_handler(serve: ServeFactory, probe: ProbeInference) -> None:
    served = await serve([inference_service(probe)])
    stub = inference_pb2_grpc.InferenceStub(served.channel)
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in stub.Watch(inference_pb2.WatchRequest(job_id="slow"), timeout=0.3):
            pass
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert loop.time() - began < 2.0
    await asyncio.wait_for(probe.cancelled.wait(), 2.0)


async def test_client_cancel_stops_the_handler(serve: ServeFactory, probe: ProbeInference) -> None:
    served = await serve([inference_service(probe)])
    stub = inference_pb2_grpc.InferenceStub(served.channel)
    call = stub.Watch(inference_pb2.WatchRequest(job_id="slow"))
    await call.read()
    assert call.cancel()
    assert await call.code() == grpc.StatusCode.CANCELLED
    await asyncio.wait_for(probe.cancelled.wait(), 2.0)
