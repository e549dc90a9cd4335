"""The one mapping from domain errors to HTTP: status, `Retry-After`, and the JSON error body.

Every error the API gives is `{"error": {"type", "message", "index"?}}`: a domain error
(`clipserve.service.errors`) by its class, a request that fails validation as 422 naming the field, HTTP
errors of the framework (404 route, 405, 413 body) by their status, and anything unexpected as a
500 with a request id and no stack trace (the trace goes to the log only).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from clipserve.service.errors import (
    ClientGone,
    Conflict,
    InferenceFailed,
    InvalidImage,
    InvalidInput,
    NotFound,
    Overloaded,
    ServiceError,
    TooLarge,
    Unavailable,
)

log = logging.getLogger("clipserve.errors")

STATUS: dict[type[ServiceError], int] = {
    InvalidInput: 422,
    InvalidImage: 400,
    TooLarge: 413,
    NotFound: 404,
    Conflict: 409,
    Overloaded: 429,
    Unavailable: 503,
    ClientGone: 499,
    InferenceFailed: 500,
}
# A caller told to come back later is told when: a full queue, or anything not available right now.
DEFAULT_RETRY_AFTER_S = {Overloaded: 1, Unavailable: 2}


def status_of(error: ServiceError) -> int:
    return next((status for kind, status in STATUS.items() if isinstance(error, kind)), 500)


def retry_after(error: ServiceError) -> int | None:
    if error.retry_after_s is not None:
        return max(1, math.ceil(error.retry_after_s))
    return next((s for kind, s in DEFAULT_RETRY_AFTER_S.items() if isinstance(error, kind)), None)


def error_body(type: str, message: str, index: int | None = None) -> dict:
    error: dict = {"type": type, "message": message}
    if index is not None:
        error["index"] = index
    return {"error": error}


def error_response(
    status_code: int,
    type: str,
    message: str,
    index: int | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(
        error_body(type, message, index), status_code=status_code, headers=dict(headers or {})
    )


def service_error_response(error: ServiceError) -> JSONResponse:
    seconds = retry_after(error)
    headers = {"Retry-After": str(seconds)} if seconds is not None else None
    return error_response(status_of(error), error.code, error.message, error.index, headers)


def _location(loc: Sequence[object]) -> str:
    # only the first element says where in the request (a field may be called `query`)
    rest = loc[1:] if loc and loc[0] in ("body", "query", "path", "header", "form") else loc
    parts = [str(p) for p in rest]
    text = ""
    for part in parts:
        text += f"[{part}]" if part.isdigit() else (f".{part}" if text else part)
    return text or "body"


def _first_index(loc: Sequence[object]) -> int | None:
    for part in loc[1:]:
        if isinstance(part, int):
            return part
    return None


def describe_validation(errors: Sequence[Mapping]) -> tuple[str, int | None]:
    """One readable sentence for pydantic errors: 'texts[2]: Input should be a valid string; ...'."""
    messages = []
    for err in errors[:5]:
        msg = str(err.get("msg", "invalid value"))
        if err.get("type") == "json_invalid":
            messages.append(f"request body is not valid JSON ({err.get('ctx', {}).get('error', msg)})")
            continue
        location = _location(err.get("loc", ()))
        if err.get("type") == "unknown_field" and location == "body":
            messages.append(msg)  # names the field itself
            continue
        messages.append(f"{location}: {msg}")
    if len(errors) > 5:
        messages.append(f"and {len(errors) - 5} more")
    index = _first_index(errors[0].get("loc", ())) if len(errors) == 1 else None
    return "; ".join(messages), index


async def _service_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    if status_of(exc) >= 500 and not isinstance(exc, Unavailable):
        log.error("%s: %s", exc.code, exc.message)
    return service_error_response(exc)


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    message, index = describe_validation(exc.errors())
    return error_response(422, "invalid_request", message, index)


_HTTP_TYPES = {
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
}


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    kind = _HTTP_TYPES.get(exc.status_code, "http_error")
    return error_response(exc.status_code, kind, str(exc.detail), headers=exc.headers)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    request_id = request.scope.get("state", {}).get("request_id", "-")
    log.exception("unhandled error on %s %s (request %s)", request.method, request.url.path, request_id)
    return error_response(
        500, "internal_error", f"internal error; quote request id {request_id} to the operator"
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
