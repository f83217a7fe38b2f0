"""Routes whose every error leaves in the dialect's own shape: a route class per dialect catches broker
errors, edge errors and request validation errors and renders them with that dialect's renderer."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

import grpc
from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException

from edge.errors import ApiError, BodyTooLarge, bad_request

log = logging.getLogger(__name__)

ErrorRenderer = Callable[[ApiError], Response]
ErrorBody = Callable[[ApiError], dict[str, Any]]

# protobuf refuses integers outside a field's range (ValueError); bounding the wire models with them makes
# such a value a 400 naming the field, and the OpenAPI schema states the range.
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
Int32 = Annotated[int, Field(ge=INT32_MIN, le=INT32_MAX)]
Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
_TOKEN_ID = re.compile(r"-?[0-9]{1,10}")


def token_id(value: object) -> int | None:
    """A token id given as a JSON number or a string of ASCII digits, or None when it is not one."""
    if isinstance(value, bool) or not isinstance(value, int | str) or not _TOKEN_ID.fullmatch(str(value)):
        return None
    number = int(value)
    return number if INT32_MIN <= number <= INT32_MAX else None


def validation_error(exc: RequestValidationError) -> ApiError:
    problems = exc.errors()
    if not problems:
        return bad_request("invalid request")
    first = problems[0]
    location = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path")]
    param = ".".join(location) or None
    if first.get("type") == "json_invalid":
        return bad_request(
            f"the body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}"
        )
    message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
    return bad_request(message, param)


def renderer(body: ErrorBody) -> ErrorRenderer:
    """A dialect's error responses: `body(error)` as JSON, the error's HTTP status, Retry-After when set."""

    def render(exc: ApiError) -> Response:
        headers = {"Retry-After": exc.retry_after} if exc.retry_after else None
        return JSONResponse(body(exc), status_code=exc.status, headers=headers)

    return render


def dialect_route(render: ErrorRenderer) -> type[APIRoute]:
    """Routes of one dialect: the caller is let in (`app.state.auth`, an edge.auth.AuthGate) before the body
    is read, and every error is rendered by `render`."""

    class DialectRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def guarded(request: Request) -> Response:
                try:
                    await request.app.state.auth.check(request)
                    return await handler(request)
                except ApiError as exc:
                    return render(exc)
                except grpc.aio.AioRpcError as exc:
                    return render(ApiError.from_rpc(exc))
                except RequestValidationError as exc:
                    return render(validation_error(exc))
                except HTTPException as exc:  # FastAPI turns any error reading the body into a 400
                    if isinstance(exc.__cause__, BodyTooLarge):
                        return render(exc.__cause__)
                    raise

            return guarded

    return DialectRoute


class WireModel(BaseModel):
    """Base of request bodies: unknown fields are accepted and logged, never rejected."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="after")
    def _log_unknown(self) -> Any:
        if self.model_extra:
            log.info("%s: ignoring unknown fields %s", type(self).__name__, sorted(self.model_extra))
        return self
