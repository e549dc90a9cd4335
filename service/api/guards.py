"""Guards that keep web browsers from being used against the service (docs/security.md).

A page on any site can make a visitor's browser send requests to a service on 127.0.0.1 or on the
visitor's network: "simple" requests (a form, or `fetch(..., {mode: "no-cors"})` with a text/plain,
urlencoded or multipart body) go out without asking the service first, and after DNS rebinding the
page's own host name points at the service, so it can read the answers too. Three pure ASGI guards
stop that:

- `AllowedHosts`: the Host header must be one of `allowed_hosts` (default: the loopback names when
  the service listens on a loopback address), so a rebound name gets 400 `host_not_allowed`.
  `/livez` and `/readyz` are exempt: orchestrators probe them by IP address.
- `CrossSiteWrites`: a request that may change something (any method but GET, HEAD and OPTIONS)
  sent by a browser from another origin (its `Origin` header names neither this service nor one
  of `cors_origins`) gets 403 `cross_site_request`.
- `ContentTypes`: a body must have a content type its route takes: JSON (`application/json`)
  everywhere, `multipart/form-data` only where a route takes files, `image/*` only where the route
  takes a raw image; anything else is 415 naming what the route takes. The types are read from
  the routes' own request-body declarations (`clipserve.service.api.bodies.documented`), so the guard and
  the API docs cannot disagree.
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import urlsplit

from fastapi.routing import APIRoute, APIRouter
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

from clipserve.service.api.middleware import _header, send_error
from clipserve.service.settings import split_host

PROBE_PATHS = frozenset({"/livez", "/readyz"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
DEFAULT_PORTS = {"http": 80, "https": 443}


def host_allowed(name: str, allowed: Sequence[str]) -> bool:
    for entry in allowed:
        if entry == "*" or entry == name:
            return True
        if entry.startswith("*.") and name.endswith(entry[1:]) and len(name) > len(entry) - 1:
            return True
    return False


class AllowedHosts:
    def __init__(self, app: ASGIApp, allowed: Sequence[str]):
        self.app, self.allowed = app, tuple(allowed)
        self.any = "*" in self.allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.any or scope.get("path") in PROBE_PATHS:
            await self.app(scope, receive, send)
            return
        host = _header(scope, b"host")
        if host is None or not host_allowed(split_host(host)[0], self.allowed):
            shown = "no Host header" if host is None else f"host {host!r}"
            await send_error(
                send,
                400,
                "host_not_allowed",
                f"{shown} is not one this service answers to ({', '.join(self.allowed)}); "
                "add it to CLIPSERVE_ALLOWED_HOSTS (--allowed-hosts) if it is really this service's name",
            )
            return
        await self.app(scope, receive, send)


def _origin_address(origin: str) -> tuple[str, int] | None:
    parts = urlsplit(origin)
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        return None
    try:
        port = parts.port or DEFAULT_PORTS[parts.scheme]
    except ValueError:
        return None
    name = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return name.rstrip("."), port


def same_origin(origin: str, host: str | None) -> bool:
    """Whether a browser's `Origin` names the service it sends to (its host and port, as the
    `Host` header has them; a Host without a port has the origin scheme's default)."""
    address = _origin_address(origin)
    if address is None or host is None:
        return False
    name, port = split_host(host)
    return address == (name, port if port is not None else DEFAULT_PORTS[urlsplit(origin).scheme])


class CrossSiteWrites:
    def __init__(self, app: ASGIApp, cors_origins: Sequence[str]):
        self.app = app
        self.any_origin = "*" in cors_origins
        self.origins = frozenset(origin.rstrip("/").lower() for origin in cors_origins)

    def _allowed(self, scope: Scope, origin: str | None) -> bool:
        if origin is None:
            # Browsers send Origin with every cross-origin request that may write; this is a
            # client of another kind, or a same-origin request from an older browser.
            return _header(scope, b"sec-fetch-site") not in ("cross-site", "same-site")
        if self.any_origin or origin.rstrip("/").lower() in self.origins:
            return True
        return same_origin(origin, _header(scope, b"host"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in SAFE_METHODS:
            await self.app(scope, receive, send)
            return
        origin = _header(scope, b"origin")
        if not self._allowed(scope, origin):
            await send_error(
                send,
                403,
                "cross_site_request",
                f"a page from another origin ({origin or 'unknown'}) may not send "
                f"{scope['method']} requests to this service; list the origin in "
                "CLIPSERVE_CORS_ORIGINS (--cors-origins) if its pages are meant to",
            )
            return
        await self.app(scope, receive, send)


def media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def accepts(accepted: Sequence[str], given: str) -> bool:
    """Whether a declared set of media types (`image/*` a wildcard) takes `given`."""
    major = given.split("/", 1)[0]
    return any(kind == given or (kind.endswith("/*") and kind[:-2] == major) for kind in accepted)


def declared_media_types(route: APIRoute) -> tuple[str, ...]:
    """What a route's body may be, as its OpenAPI request body declares it; () for no body."""
    content = (route.openapi_extra or {}).get("requestBody", {}).get("content")
    if content:
        return tuple(content)
    return ("application/json",) if route.body_field is not None else ()


def _describe(accepted: Sequence[str]) -> str:
    names = {
        "application/json": "JSON (Content-Type: application/json)",
        "multipart/form-data": "a multipart form (curl -F)",
        "image/*": "one image as the body (Content-Type: image/jpeg, image/png, ...)",
    }
    return ", or ".join(names.get(kind, kind) for kind in accepted)


class ContentTypes:
    def __init__(self, app: ASGIApp, routers: Sequence[APIRouter]):
        # the routers' own routes: FastAPI's app.routes may hold included routers, not their routes
        self.app = app
        self.routes = [
            (route, declared_media_types(route))
            for router in routers
            for route in router.routes
            if isinstance(route, APIRoute)
        ]

    def _accepted(self, scope: Scope) -> tuple[str, ...] | None:
        for route, accepted in self.routes:
            match, _ = route.matches(scope)
            if match == Match.FULL:
                return accepted
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in SAFE_METHODS:
            await self.app(scope, receive, send)
            return
        content_type = _header(scope, b"content-type")
        length = _header(scope, b"content-length")
        has_body = (length is not None and length.strip() not in ("", "0")) or (
            _header(scope, b"transfer-encoding") is not None
        )
        accepted = self._accepted(scope) if (content_type or has_body) else None
        if not accepted:  # no body, an unknown route (404/405 follow) or a route that reads none
            await self.app(scope, receive, send)
            return
        given = media_type(content_type or "")
        if not accepts(accepted, given):
            sent = f"a body of type {given!r}" if given else "a body without a Content-Type"
            await send_error(
                send,
                415,
                "unsupported_media_type",
                f"{scope['method']} {scope['path']} got {sent}; it takes {_describe(accepted)}",
            )
            return
        await self.app(scope, receive, send)
