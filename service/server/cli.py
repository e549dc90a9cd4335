"""`clip-serve`: serve the model repository over HTTP with uvicorn.

Every option is a field of service/settings.py: `--max-wait-ms` is also CLIPSERVE_MAX_WAIT_MS.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from clipserve.service.errors import ServiceError
from clipserve.service.keys import KeyFileError, KeyRing
from clipserve.service.runtime import ProviderUnavailableError, RuntimeConfigError
from clipserve.service.runtime.gpu_stack import check_single_onnxruntime
from clipserve.service.server.listen import PortUnavailable, check_port
from clipserve.service.server.logs import configure_logging
from clipserve.service.server.startup import startup_summary
from clipserve.service.settings import Settings, names_a_directory
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from clipserve.contract.bundle import BundleError, ModelRepository, parse_model_ref
from clipserve.contract.cli_settings import SettingsError, load_settings

PROG = "clip-serve"
log = logging.getLogger("clipserve.start")
# Start-up failures the user can fix, whose message says it all: no traceback for these.
STARTUP_PROBLEMS = (BundleError, RuntimeConfigError, ServiceError)


class RepositoryError(Exception):
    """The model repository cannot serve what the settings ask for; the message says what to do."""


def _old_models_flag(argv: Sequence[str]) -> list[str]:
    """`--models DIR` (before --models-dir) as `--models-dir DIR`, so that `--models DIR --serve a,b`
    keeps its old meaning too; `--models a,b` is the list of models to serve."""
    rewritten = list(argv)
    for index, arg in enumerate(rewritten):
        name, equals, value = arg.partition("=")
        if name != "--models":
            continue
        if not equals and index + 1 < len(rewritten):
            value = rewritten[index + 1]
        if value and names_a_directory(value):
            print(f"{PROG}: warning: --models DIR is deprecated: use --models-dir {value}", file=sys.stderr)
            rewritten[index] = "--models-dir" + (f"={value}" if equals else "")
    return rewritten


def settings_from(argv: Sequence[str] | None) -> Settings:
    argv = _old_models_flag(sys.argv[1:] if argv is None else argv)
    return load_settings(Settings, argv, PROG, description=__doc__)


def check_repository(settings: Settings) -> None:
    """What can be told before anything is loaded: the repository exists and has something to serve.

    Cheap on purpose (no hashing): the registry verifies every bundle as it loads it."""
    repository = ModelRepository(settings.models_dir)
    root = repository.root
    if not root.exists():
        raise RepositoryError(
            f"model repository {root} does not exist (set --models-dir or CLIPSERVE_MODELS_DIR)"
        )
    if not root.is_dir():
        raise RepositoryError(f"model repository {root} is not a directory")
    present = repository.models()
    if settings.models:
        try:
            wanted = [parse_model_ref(ref) for ref in settings.models]
        except BundleError as exc:
            raise RepositoryError(f"--models / CLIPSERVE_MODELS: {exc}") from None
        # A named model without versions yet is left out and joins on reload; none at all is a mistake.
        if not any(name in present for name, _ in wanted):
            raise RepositoryError(
                f"none of the models to serve ({', '.join(settings.models)}) is in {root} "
                f"(models there: {', '.join(present) or 'none'})"
            )
        served = {name for name, _ in wanted}
    elif not present:
        raise RepositoryError(f"no models in {root} (export one with clip-export)")
    else:
        served = set(present)
    if settings.default_model:
        try:
            default = parse_model_ref(settings.default_model)[0]
        except BundleError as exc:
            raise RepositoryError(f"--default-model: {exc}") from None
        if default not in served:
            raise RepositoryError(
                f"default model {settings.default_model!r} is not among the models to serve "
                f"({', '.join(sorted(served))})"
            )


def preflight(settings: Settings) -> None:
    """Everything that can be refused in a second, before the models load (which takes minutes)."""
    check_repository(settings)
    KeyRing(settings.api_keys, settings.admin_key, settings.api_keys_file)  # a key file that parses
    check_single_onnxruntime()
    if settings.port:
        check_port(settings.host, settings.port, PROG + " --port {port}")


def announce(settings: Settings) -> None:
    """Logging in its one format, then the set-up in the first lines of the log."""
    configure_logging(settings.log_level, settings.resolved_log_format(sys.stderr.isatty()))
    log.info("clip-serve starting")
    for line in startup_summary(settings):
        log.info("%s", line)


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


def serve_in_workers(settings: Settings, workers: int) -> int:
    """`--workers N` above 1: N server processes on the port (service/server/workers.py)."""
    from clipserve.service.server.workers import per_worker_settings, serve_workers

    problem = serve_workers(per_worker_settings(settings, workers), workers)
    if problem is not None:
        print(f"{PROG}: error: {problem}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = settings_from(argv)
    except SettingsError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    from clipserve.service.server.workers import WorkersError, choose_workers

    try:
        preflight(settings)
        workers, reason = choose_workers(settings)
    except (RepositoryError, ProviderUnavailableError, PortUnavailable, WorkersError, KeyFileError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    announce(settings)
    log.info("%d worker process(es): %s", workers, reason)
    if workers > 1:
        return serve_in_workers(settings, workers)
    import uvicorn
    from clipserve.service.app import create_app

    app = StartupProblems(create_app(settings))
    server = uvicorn.Server(
        uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, access_log=False)
    )
    try:
        server.run()
    except SystemExit:  # uvicorn's way of ending a failed start-up
        if server.started:
            raise
    if not server.started:
        problem = app.problem or "the service did not start; see the log above"
        print(f"{PROG}: error: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
