"""Routes whose every error leaves in the dialect's own shape: a route class per dialect catches broker
errors, edge errors and request validation errors and renders them with that dialect's renderer."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import grpc
from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from edge.errors import ApiError, BodyTooLarge, bad_request

ErrorRenderer = Callable[[ApiError], Response]
ErrorBody = Callable[[ApiError], dict[str, Any]]


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
