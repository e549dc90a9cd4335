"""Pure ASGI middleware (no BaseHTTPMiddleware: it would hide client disconnects from the routes).

- `RequestContext`: request id (from `X-Request-ID` or new), JSON log context, latency metric per
  route template, requests in flight (the autoscaling signal), the id echoed in the response headers;
- `Auth`: Bearer API keys with scopes (`clipserve.service.keys`) on everything but `/livez`, `/readyz`
  and the demo page's own files (`/`, `/static/*`, and the API docs `/docs`, `/redoc`,
  `/openapi.json`: no data, and the pages need to load to ask for a key): 401 without a valid
  key, 403 for a key without the scope the route needs;
- `BodyLimit`: refuses bodies above `max_body_bytes` (by Content-Length, and while streaming).
"""

from __future__ import annotations

import json
import logging
import time
import uuid

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from clipserve.service.api.errors import error_body
from clipserve.service.keys import KeyRing, route_scope
from clipserve.service.metrics import Metrics
from clipserve.service.server.logs import request_id_var

access_log = logging.getLogger("clipserve.access")
# The docs and the schema hold no data and must load before anyone has typed a key.
OPEN_PATHS = frozenset({"/livez", "/readyz", "/", "/docs", "/redoc", "/openapi.json", "/favicon.ico"})
OPEN_PREFIXES = ("/static/",)
# Not counted as requests in flight: they are not work the replicas are scaled for.
UNCOUNTED_PATHS = frozenset({"/livez", "/readyz", "/metrics"})


async def send_error(
    send: Send, status: int, type: str, message: str, headers: dict[str, str] | None = None
) -> None:
    body = json.dumps(error_body(type, message)).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None


class RequestContext:
    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = _header(scope, b"x-request-id")
        request_id = (
            incoming if incoming and len(incoming) <= 128 and incoming.isprintable() else uuid.uuid4().hex
        )
        token = request_id_var.set(request_id)
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status_holder = {"status": 500}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        counted = scope["path"] not in UNCOUNTED_PATHS
        if counted:
            self.metrics.requests_in_flight.inc()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if counted:
                self.metrics.requests_in_flight.dec()
            route = scope.get("route")
            template = getattr(route, "path", "unmatched")
            elapsed = time.perf_counter() - started
            status = status_holder["status"]
            self.metrics.request_latency.labels(
                route=template, method=scope["method"], status=str(status)
            ).observe(elapsed)
            access_log.info("%s %s %d %.1f ms", scope["method"], scope["path"], status, elapsed * 1000)
            request_id_var.reset(token)


class Auth:
    def __init__(self, app: ASGIApp, keys: KeyRing, metrics_open: bool = False):
        self.app, self.keys, self.metrics_open = app, keys, metrics_open

    @staticmethod
    def _bearer(scope: Scope) -> str | None:
        value = _header(scope, b"authorization")
        if value is None:
            return None
        scheme, _, token = value.partition(" ")
        return token.strip() if scheme.lower() == "bearer" and token.strip() else None

    def _needs_no_key(self, needed: str) -> bool:
        if needed == "admin":
            return False
        if needed == "metrics" and self.metrics_open:
            return True
        return not self.keys.auth_on

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if (
            scope["type"] != "http"
            or path in OPEN_PATHS
            or path.startswith(OPEN_PREFIXES)
            or scope["method"] == "OPTIONS"
        ):
            await self.app(scope, receive, send)
            return
        self.keys.refresh()
        needed = route_scope(scope["method"], path)
        if needed == "admin" and not self.keys.admin_on:
            await send_error(send, 403, "forbidden", "the admin API is off: no key has the admin scope")
            return
        if self._needs_no_key(needed):
            await self.app(scope, receive, send)
            return
        token = self._bearer(scope)
        scopes = self.keys.scopes_of(token)
        if scopes is None:
            message = (
                "missing API key: send 'Authorization: Bearer <key>'" if token is None else "invalid API key"
            )
            await send_error(send, 401, "unauthorized", message, {"WWW-Authenticate": "Bearer"})
            return
        if needed not in scopes:
            await send_error(
                send,
                403,
                "forbidden",
                f"this key lacks the {needed!r} scope, which {scope['method']} {path} needs "
                f"(the key has: {', '.join(sorted(scopes))})",
            )
            return
        await self.app(scope, receive, send)


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self) -> str:
        return f"request body is larger than this server's limit of {self.max_bytes} bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await send_error(send, 413, "body_too_large", self._too_large())
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, self._too_large())
            return message

        await self.app(scope, counted, send)
