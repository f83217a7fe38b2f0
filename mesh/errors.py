"""The error types of Velesio, each carrying the gRPC status code it leaves a server with.

Code anywhere raises these; `ErrorInterceptor` turns them into the call's status. Anything else that
escapes a handler is a bug: it is logged with its traceback and the caller gets INTERNAL.
"""

from __future__ import annotations

from typing import ClassVar

import grpc

RETRY_AFTER_KEY = "retry-after"


class StartupError(Exception):
    """A process cannot serve (its model is missing, not a model, or does not load); said in one line."""


class VelesioError(Exception):
    """Base class: an error the caller should see, with its gRPC status code."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()


class InvalidArgument(VelesioError):
    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(f"{field}: {message}" if field else message, field=field)


class FailedPrecondition(VelesioError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class OutOfRange(VelesioError):
    code = grpc.StatusCode.OUT_OF_RANGE


class Unauthenticated(VelesioError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(VelesioError):
    code = grpc.StatusCode.PERMISSION_DENIED


class NotFound(VelesioError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(VelesioError):
    code = grpc.StatusCode.ALREADY_EXISTS


class Aborted(VelesioError):
    code = grpc.StatusCode.ABORTED


class ResourceExhausted(VelesioError):
    """Over a limit. `retry_after` (seconds) travels as the trailing metadata "retry-after"."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, *, retry_after: float | None = None, field: str | None = None) -> None:
        super().__init__(message, field=field)
        self.retry_after = retry_after

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        if self.retry_after is None:
            return ()
        return ((RETRY_AFTER_KEY, str(max(1, round(self.retry_after)))),)


class Cancelled(VelesioError):
    code = grpc.StatusCode.CANCELLED


class DeadlineExceeded(VelesioError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unimplemented(VelesioError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Unavailable(VelesioError):
    code = grpc.StatusCode.UNAVAILABLE


class Internal(VelesioError):
    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[VelesioError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        FailedPrecondition,
        OutOfRange,
        Unauthenticated,
        PermissionDenied,
        NotFound,
        AlreadyExists,
        Aborted,
        ResourceExhausted,
        Cancelled,
        DeadlineExceeded,
        Unimplemented,
        Unavailable,
        Internal,
    )
}


def error_for_code(code: grpc.StatusCode, message: str) -> VelesioError:
    """The Velesio error for a status received from another service (e.g. a worker), to pass it on."""
    cls = _BY_CODE.get(code, Internal)
    if cls is InvalidArgument:
        return InvalidArgument(message)
    return cls(message)


_CODES_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def status_code(number: int) -> grpc.StatusCode:
    """The gRPC status code with this number (as job error events carry it); UNKNOWN for any other."""
    return _CODES_BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)
