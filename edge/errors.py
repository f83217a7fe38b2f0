"""One table from gRPC status codes to HTTP, and the error shapes of each dialect."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from mesh.errors import status_code

HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def http_status(code: grpc.StatusCode) -> int:
    return HTTP_STATUS.get(code, 500)


# Not frozen: Python sets attributes of an exception in flight (contextlib's __exit__ sets __traceback__),
# and a frozen dataclass refuses them, turning the error into a 500. eq=False keeps exceptions hashable.
@dataclass(eq=False)
class ApiError(Exception):
    """An error on its way to a client: the gRPC code it stands for, a message, and what it concerns."""

    code: grpc.StatusCode
    message: str
    param: str | None = None
    retry_after: str | None = None
    http: int | None = None  # an HTTP status of the edge's own that no gRPC code stands for (413)

    @property
    def status(self) -> int:
        return self.http or http_status(self.code)

    @classmethod
    def from_rpc(cls, exc: grpc.aio.AioRpcError) -> ApiError:
        trailers = dict(exc.trailing_metadata() or ())
        details = exc.details() or exc.code().name
        param = (
            details.split(":", 1)[0]
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT and ":" in details
            else None
        )
        retry = trailers.get("retry-after")
        return cls(exc.code(), details, param, str(retry) if retry is not None else None)

    @classmethod
    def from_event(cls, code_number: int, message: str) -> ApiError:
        return cls(status_code(code_number), message)


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(grpc.StatusCode.INVALID_ARGUMENT, message, param)


class BodyTooLarge(ApiError):
    """A request body over the edge's --max-body-bytes: 413, in the dialect of the route it was sent to."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            grpc.StatusCode.INVALID_ARGUMENT, f"request body larger than {limit} bytes", http=413
        )
