"""`clip-serve`'s start, told plainly: what it says in its first log lines, before anything loads
(what it will serve and how it is set up: cache, collections, auth, URL fetching, so a mistake shows
at a glance), and `StartupProblems`, which turns a start-up that fails for a reason the user can act
on into one line instead of a traceback (in the server process or in each worker)."""

from __future__ import annotations

import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from clipserve.contract.bundle import BundleError, ModelRepository, parse_model_ref
from clipserve.service.errors import ServiceError
from clipserve.service.runtime import RuntimeConfigError
from clipserve.service.settings import Settings

STARTUP_PROBLEMS = (BundleError, RuntimeConfigError, ServiceError)


def hidden_password(url: str) -> str:
    """`url` with its password (if any) replaced by `***`."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port is not None else ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}{port}"))


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
    if not settings.api_keys:
        keys = "off: every route is open (--api-keys / CLIPSERVE_API_KEYS turns it on)"
    else:
        count = len(settings.api_keys)
        keys = f"on: {count} API key{'s' if count > 1 else ''}; /docs, /redoc and the demo page stay open"
    admin = "admin API on" if settings.admin_key else "admin API off"
    return f"{keys}; {admin}"


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
