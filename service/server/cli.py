"""`clip-serve`: serve the model repository over HTTP with uvicorn.

Every option is a field of service/settings.py: `--max-wait-ms` is also CLIPSERVE_MAX_WAIT_MS.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from clipserve.contract.bundle import BundleError, ModelRepository, parse_model_ref
from clipserve.contract.cli_settings import SettingsError, load_settings
from clipserve.service.keys import KeyFileError, KeyRing
from clipserve.service.runtime import ProviderUnavailableError
from clipserve.service.runtime.gpu_stack import check_single_onnxruntime
from clipserve.service.server.listen import PortUnavailable, check_port
from clipserve.service.server.logs import configure_logging
from clipserve.service.server.startup import StartupProblems, startup_summary
from clipserve.service.settings import Settings

PROG = "clip-serve"
log = logging.getLogger("clipserve.start")
# Start-up failures the user can fix, whose message says it all: no traceback for these.


class RepositoryError(Exception):
    """The model repository cannot serve what the settings ask for; the message says what to do."""


def settings_from(argv: Sequence[str] | None) -> Settings:
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
