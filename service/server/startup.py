"""`clip-serve`'s start, told plainly: what it says in its first log lines, before anything loads
(what it will serve and how it is set up: cache, collections, auth, URL fetching, so a mistake shows
at a glance), and `StartupProblems`, which turns a start-up that fails for a reason the user can act
on into one line instead of a traceback (in the server process or in each worker)."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from clipserve.contract.bundle import BundleError, ModelRepository, parse_model_ref
from clipserve.service.errors import ServiceError
from clipserve.service.keys import KeyRing
from clipserve.service.runtime import RuntimeConfigError
from clipserve.service.settings import Settings, resolved_allowed_hosts

STARTUP_PROBLEMS = (BundleError, RuntimeConfigError, ServiceError)

# libpq takes a password in a URL's user info, in its query string, or as a key=value pair whose
# value may be single-quoted, with \' and \\ escapes inside.
_SECRET_PAIR = re.compile(r"\b(password|sslpassword)(\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&]*)", re.IGNORECASE)


def hidden_password(dsn: str) -> str:
    """A URL or a libpq DSN (`host=db password=...`) with every password replaced by `***`."""
    parts = urlsplit(dsn)
    if not parts.scheme or not parts.netloc:
        return _SECRET_PAIR.sub(r"\1\2***", dsn)  # key=value form
    if parts.password is not None:
        user = parts.username or ""
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        port = f":{parts.port}" if parts.port is not None else ""
        parts = parts._replace(netloc=f"{user}:***@{host}{port}")
    return urlunsplit(parts._replace(query=_SECRET_PAIR.sub(r"\1\2***", parts.query)))


def _models(settings: Settings) -> str:
    repository = ModelRepository(settings.models_dir)
    refs: list[str] = []
    try:
        wanted = [parse_model_ref(ref) for ref in settings.models] or [
            (name, None) for name in repository.models()
        ]
        for name, pinned in wanted:
            versions = repository.versions(name)
            if pinned is not None:
                refs.append(f"{name}@{pinned} (pinned)")
            elif versions:
                listed = ", ".join(str(v) for v in versions)
                refs.append(f"{name}@{versions[-1]} (newest of {listed}; hot-reloaded)")
            else:
                refs.append(f"{name} (no version yet)")
    except BundleError as exc:  # check_repository has already refused what it can tell
        return f"{settings.models_dir}: {exc}"
    default = f"; default {settings.default_model}" if settings.default_model else ""
    return f"{', '.join(refs)} from {repository.root}{default}"


def _cache(settings: Settings) -> str:
    if not settings.redis_url:
        return "in-process only (--redis-url to share one Redis between replicas)"
    return (
        f"Redis at {hidden_password(settings.redis_url)}, shared by replicas "
        "(in-process while it does not answer; --redis-url none for in-process only)"
    )


def _collections(settings: Settings) -> str:
    if settings.collections_backend == "pgvector":
        dsn = hidden_password(settings.postgres_dsn) if settings.postgres_dsn else "no --postgres-dsn"
        return f"pgvector at {dsn}"
    return f"embedded (SQLite + FAISS in {settings.data_dir})"


def _auth(settings: Settings) -> str:
    keys = KeyRing(settings.api_keys, settings.admin_key, settings.api_keys_file)
    counts = ", ".join(f"{scope} {count}" for scope, count in keys.counts().items() if count)
    source = f" (keys file {settings.api_keys_file}, re-read on change)" if settings.api_keys_file else ""
    if not keys.auth_on:
        state = "off: every data route is open (--api-keys or --api-keys-file turns it on)"
    else:
        state = "on; /docs, /redoc and the demo page stay open"
    metrics = "; /metrics open" if settings.metrics_open or not keys.auth_on else ""
    admin = "" if keys.admin_on else "; admin API off"
    return f"{state}{metrics}{admin}; keys by scope: {counts or 'none'}{source}"


def _browsers(settings: Settings) -> str:
    hosts = resolved_allowed_hosts(settings.allowed_hosts, settings.host)
    shown = "any" if "*" in hosts else ", ".join(hosts)
    origins = ", ".join(settings.cors_origins) or "none (only the service's own pages)"
    return f"Host {shown}; cross-origin pages allowed: {origins}"


def _url_fetching(settings: Settings) -> str:
    if not settings.url_fetch_enabled:
        return "off (images only as base64, data URIs or uploads; --url-fetch-enabled turns it on)"
    hosts = ", ".join(settings.url_allowed_hosts) or "none allowed yet (--url-allowed-hosts)"
    private = "private addresses allowed" if settings.url_allow_private else "private addresses refused"
    return f"on: hosts {hosts}; {private}"


def startup_summary(settings: Settings) -> list[str]:
    """One line per subject, in the order a reader checks them."""
    return [
        f"models      {_models(settings)}",
        f"providers   {', '.join(settings.providers)} (engine {settings.engine}, precision {settings.precision})",
        f"cache       {_cache(settings)}",
        f"collections {_collections(settings)}",
        f"auth        {_auth(settings)}",
        f"browsers    {_browsers(settings)}",
        f"image URLs  {_url_fetching(settings)}",
        f"listening   http://{settings.host}:{settings.port} once the models are ready",
    ]


class StartupProblems:
    """ASGI wrapper: when the app's start-up fails with one of STARTUP_PROBLEMS (every bundle
    refused, a provider missing, a store out of reach), uvicorn logs its message instead of the
    traceback, and the message is kept for `main` to print."""

    def __init__(self, app: ASGIApp, problem_file: str | None = None):
        self.app = app
        self.problem: str | None = None
        self.problem_file = problem_file  # a worker process leaves the message there for its parent

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def send_problem_only(message: Message) -> None:
            # Starlette sends the failure from inside its `except`, so the exception is at hand here.
            failure = sys.exc_info()[1]
            if message["type"] == "lifespan.startup.failed" and isinstance(failure, STARTUP_PROBLEMS):
                self.problem = str(failure)
                message = {**message, "message": f"cannot start: {failure}"}
                if self.problem_file:
                    Path(self.problem_file).write_text(self.problem)
            await send(message)

        await self.app(scope, receive, send_problem_only)
