"""Several server processes on one port: `clip-serve --workers N`.

The parent binds the port once and runs uvicorn's supervisor; each worker is a separate Python
process (its own GIL) that builds the whole app: its own ONNX Runtime sessions, batchers and
preprocessing threads, sharing Redis (the cache) and the data stores with the others, like
replicas behind a load balancer. Each worker loads and hot-reloads the models by itself.

- How many: `--workers N`, or 0 (the default) for automatic: one per core when the graphs to serve
  are small (<= 64 MB in all: Python per request, not the model, bounds one process, and a copy per
  worker costs little memory) and the collections live in PostgreSQL; else 1 (a large model uses
  every core through ONNX Runtime's threads, and a copy per worker would cost its size again).
- Cores: the process's affinity mask, capped by a cgroup CPU quota (`docker run --cpus`).
- Threads: `cores // N` ONNX Runtime and preprocessing threads per worker unless
  `--intra-op-threads` / `--preprocess-workers` say otherwise, so that N x threads = cores.
- The embedded collections store belongs to one process (a lock in its data dir): more than one
  worker needs `--collections-backend pgvector`.
- `/metrics` aggregates every worker: prometheus_client's multiprocess mode, in a temporary folder
  the parent makes and removes (counters and histograms summed; gauges: queue depth summed over live
  workers, a model version counted as loaded while any live worker serves it, the hit ratio per
  worker with a `pid` label).
"""

from __future__ import annotations

import inspect
import os
import shutil
import sys
import tempfile
from pathlib import Path

from clipserve.contract.bundle import BundleError, ModelRepository, parse_model_ref
from clipserve.contract.cli_settings import usable_cores
from clipserve.service.settings import Settings

SMALL_MODELS_BYTES = 64 * 2**20
# How the parent hands its settings to the workers it starts: not settings a user gives (the leading
# underscore keeps them apart from CLIPSERVE_*, which Settings reads).
SETTINGS_ENV = "_CLIPSERVE_WORKER_SETTINGS"
PROBLEM_ENV = "_CLIPSERVE_WORKER_PROBLEM_FILE"
# prometheus_client's own variable (its contract for multiprocess mode), not a setting of ours
METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"


class WorkersError(Exception):
    """`--workers` cannot work with these settings; the message says what to do."""


def served_graph_bytes(settings: Settings) -> int:
    """Bytes of the ONNX graphs the settings would serve (latest versions, the chosen precision)."""
    repository = ModelRepository(settings.models_dir)
    names = [parse_model_ref(ref) for ref in settings.models] or [(n, None) for n in repository.models()]
    total = 0
    for name, version in names:
        try:
            bundle = repository.load(name, version, verify=False)
        except BundleError:
            continue
        for tower in ("image", "text"):
            precision = settings.precision if bundle.manifest.file(tower, settings.precision) else "fp32"
            path = bundle.file_path(tower, precision)
            total += sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))
    return total


def choose_workers(settings: Settings) -> tuple[int, str]:
    """How many worker processes to run, and why."""
    if settings.workers:
        if settings.workers > 1 and settings.collections_backend == "embedded":
            raise WorkersError(
                f"--workers {settings.workers} needs --collections-backend pgvector (with --postgres-dsn): the "
                "embedded collections store belongs to one process; or use --workers 1"
            )
        return settings.workers, "--workers"
    cores = usable_cores()
    if cores == 1:
        return 1, "one core"
    if settings.collections_backend == "embedded":
        return 1, "the embedded collections store belongs to one process (pgvector allows more)"
    size = served_graph_bytes(settings)
    if size > SMALL_MODELS_BYTES:
        return 1, f"{size / 2**20:.0f} MB of graphs: one process uses every core through its threads"
    return cores, f"{size / 2**20:.0f} MB of graphs: one process per core"


def per_worker_settings(settings: Settings, workers: int) -> Settings:
    """Thread counts so that workers x threads = cores, unless they were set explicitly."""
    if workers <= 1:
        return settings
    threads = max(1, usable_cores() // workers)
    given = settings.model_fields_set
    update = {f: threads for f in ("intra_op_threads", "preprocess_workers") if f not in given}
    return settings.model_copy(update=update | {"workers": workers})


def worker_app():
    """The app of one worker process (uvicorn's factory, called in the worker)."""
    from clipserve.service.app import create_app
    from clipserve.service.server.logs import configure_logging
    from clipserve.service.server.startup import StartupProblems

    settings = Settings.model_validate_json(os.environ[SETTINGS_ENV])
    # a worker writes to the stderr it inherited, so it resolves the format as its parent did
    configure_logging(settings.log_level, settings.resolved_log_format(sys.stderr.isatty()))
    return StartupProblems(create_app(settings), problem_file=os.environ.get(PROBLEM_ENV))


def serve_workers(settings: Settings, workers: int) -> str | None:
    """Run `workers` server processes on the settings' port until a signal stops them; the start-up
    problem that stopped them, if any."""
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    folder = Path(tempfile.mkdtemp(prefix="clipserve-workers-"))
    metrics = folder / "metrics"
    metrics.mkdir()
    problem = folder / "problem.txt"
    os.environ[METRICS_ENV] = str(metrics)
    os.environ[SETTINGS_ENV] = settings.model_dump_json()
    os.environ[PROBLEM_ENV] = str(problem)
    try:
        config = uvicorn.Config(
            "clipserve.service.server.workers:worker_app",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=workers,
            log_config=None,
            access_log=False,
        )
        sock = config.bind_socket()
        if "target" in inspect.signature(Multiprocess).parameters:  # older uvicorn
            supervisor = Multiprocess(config, target=uvicorn.Server(config).run, sockets=[sock])  # type: ignore[call-arg]
        else:
            supervisor = Multiprocess(config, sockets=[sock])
        supervisor.run()
        return problem.read_text() if problem.exists() else None
    finally:
        for name in (METRICS_ENV, SETTINGS_ENV, PROBLEM_ENV):
            os.environ.pop(name, None)
        shutil.rmtree(folder, ignore_errors=True)
