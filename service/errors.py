"""Errors as the API shows them: every error is `{"error": {"type", "message", "index"?}}`.

Routers raise `ApiError(status_code, type, message, index=None)`; `install_error_handlers(app)` renders
it, request-validation errors (as 422 naming the field), HTTP errors from the framework, and any
unexpected exception (a 500 with a request id and no stack trace; the trace goes to the log only).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("clipserve.errors")


class ApiError(Exception):
    """A failure the caller should see: status, a stable machine type, and a sentence for a person."""

    def __init__(
        self,
        status_code: int,
        type: str,
        message: str,
        index: int | None = None,
        headers: Mapping[str, str] | None = None,
    ):
        super().__init__(message)
        self.status_code = status_code
        self.type = type
        self.message = message
        self.index = index
        self.headers = dict(headers or {})


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


def _location(loc: Sequence[object]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header", "form")]
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
        messages.append(f"{_location(err.get('loc', ()))}: {msg}")
    if len(errors) > 5:
        messages.append(f"and {len(errors) - 5} more")
    index = _first_index(errors[0].get("loc", ())) if len(errors) == 1 else None
    return "; ".join(messages), index


async def _api_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc.status_code, exc.type, exc.message, exc.index, exc.headers)


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
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
