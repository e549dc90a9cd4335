"""`make serve`: start the service on a fresh clone with something meaningful to serve.

1. Refuse at once, with a clear message, when the port is taken (before any long work).
2. When the default repository `models/` holds no published bundle, build the demo bundle once (a
   teacher trained on the synthetic shapes set, a student distilled from it, verified and
   published), installing the train extra first if it is missing; later runs find it there and
   start at once. Another repository is never filled unasked: a missing one is named as missing.
3. Start `clip-serve` (in-process cache unless CLIPSERVE_REDIS_URL is set), wait for /readyz,
   print the demo page and API docs URLs, and stop the service on Ctrl-C. Which versions serve is
   the service's own start-up policy (each model's newest loadable version; broken bundles are
   named in its log and in /readyz, and left out).

Configuration, all optional, with clip-serve's prefix: its own two options (`--help` lists them),
CLIPSERVE_BUILD_DEMO (build the demo model into a repository other than `models/`) and
CLIPSERVE_DEMO_STEPS (a shorter demo training, for tests and slow machines); every other CLIPSERVE_*
variable is a setting of the service (`clip-serve --help`), read here as clip-serve reads it:
CLIPSERVE_MODELS_DIR (the repository; default `models/`), CLIPSERVE_HOST (127.0.0.1),
CLIPSERVE_PORT (8000), CLIPSERVE_REDIS_URL, CLIPSERVE_MODELS ...
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, TextIO

from pydantic import Field
from pydantic_settings import SettingsConfigDict

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clipserve.contract.bundle import BundleError, ModelRepository, parse_model_ref  # noqa: E402
from clipserve.contract.cli_settings import CliSettings, SettingsError, load_settings, validated  # noqa: E402
from clipserve.service.server.listen import PortUnavailable, check_port  # noqa: E402
from clipserve.service.server.startup import hidden_password  # noqa: E402
from clipserve.service.settings import Settings  # noqa: E402

PROG = "scripts/serve.sh"
DEMO_MODEL = "shapes-demo"
# The command line of the child that builds the demo model (`--build-demo-into DIR NAME [STEPS]`):
# between this script and itself, not an option of `make serve`.
BUILD_CHILD = "--build-demo-into"
DEFAULT_MODELS_DIR = ROOT / "models"
# A progress bar written to a file or a pipe: one line of its state this often, not every redraw.
PROGRESS_EVERY_S = 10.0
READY_TIMEOUT_S = 300.0


class FirstRunError(Exception):
    """A problem the user can fix; the message says how."""


class FirstRunSettings(CliSettings):
    """`make serve`: serve the models of a repository, building the demo model first when `models/`
    holds none. These are its own options; every other CLIPSERVE_* variable is a setting of the
    service it starts (clip-serve --help), and CLIPSERVE_MODELS_DIR, CLIPSERVE_HOST, CLIPSERVE_PORT
    and CLIPSERVE_REDIS_URL decide what it checks first."""

    model_config = SettingsConfigDict(env_prefix="CLIPSERVE_")

    build_demo: bool = Field(
        False,
        description="build the demo model into a repository other than models/ when that holds no "
        "published bundle (models/ is filled without asking)",
    )
    demo_steps: int | None = Field(
        None, ge=1, description="a shorter demo training (tests, slow machines); none: the full recipe"
    )


def check_models_dir(repo_dir: Path, build_demo: bool) -> bool:
    """Whether the demo model is to be built into `repo_dir`: only into the default models/ or
    when CLIPSERVE_BUILD_DEMO=1 asks, so a mistyped CLIPSERVE_MODELS_DIR is named, not filled."""
    default = repo_dir.resolve() == DEFAULT_MODELS_DIR.resolve()
    where = "CLIPSERVE_MODELS_DIR"
    if repo_dir.exists() and not repo_dir.is_dir():
        raise FirstRunError(f"model repository {repo_dir} is a file, not a directory (check {where})")
    if repo_dir.is_dir() and ModelRepository(repo_dir).models():
        return False
    if default or build_demo:
        return True
    if not repo_dir.exists():
        raise FirstRunError(
            f"model repository {repo_dir} does not exist (check {where}; unset it to use models/, "
            f"or run CLIPSERVE_BUILD_DEMO=1 make serve to build the demo model into {repo_dir})"
        )
    raise FirstRunError(
        f"no published bundle in {repo_dir}: export one with clip-export, or run "
        f"CLIPSERVE_BUILD_DEMO=1 make serve to build the demo model there"
    )


def ensure_training_installed() -> None:
    """The demo build needs the train extra (torch, open_clip: several GB); install it only now."""
    if all(importlib.util.find_spec(name) for name in ("torch", "open_clip", "clipserve.training")):
        return
    venv = Path(sys.executable).parent.parent
    print(
        "clipserve: installing the train extra (torch, open_clip: several GB, once) to build the demo model",
        flush=True,
    )
    result = subprocess.run(
        ["make", "--no-print-directory", "venv", f"VENV={venv}", "EXTRAS=serve,train"], cwd=ROOT
    )
    if result.returncode != 0:
        raise FirstRunError(
            f"installing the train extra failed (exit {result.returncode}); see the messages above, "
            "or point CLIPSERVE_MODELS_DIR at a repository that already holds a bundle"
        )


def relay_progress(source: IO[bytes], out: TextIO, every_s: float = PROGRESS_EVERY_S) -> None:
    """Copy a child's output to `out` line by line. A progress bar redraws its line with '\\r':
    written to a file that is one endless line, so each redraw is dropped but one every `every_s`
    seconds, and the bar's last state ends its line."""
    line = b""
    shown_at = time.monotonic()
    while chunk := source.read1(65536):  # type: ignore[attr-defined]
        for piece in re.split(rb"(\r|\n)", chunk):
            if piece == b"\n":
                out.write(line.decode(errors="replace") + "\n")
                line = b""
            elif piece == b"\r":
                now = time.monotonic()
                if line.strip() and now - shown_at >= every_s:
                    out.write(line.decode(errors="replace") + "\n")
                    shown_at = now
                line = b""
            else:
                line += piece
        out.flush()
    if line:
        out.write(line.decode(errors="replace") + "\n")
        out.flush()


def build_demo(repo_dir: Path, name: str, env: dict[str, str], steps: int | None = None) -> None:
    """Build in a child process, so the service later runs without torch in memory."""
    print(
        f"clipserve: no published bundle in {repo_dir}; building the demo model once "
        "(shapes teacher -> distilled student -> verified bundle; minutes on 2 cores)",
        flush=True,
    )
    ensure_training_installed()
    started = time.monotonic()
    command = [sys.executable, str(Path(__file__).resolve()), BUILD_CHILD, str(repo_dir), name]
    command += [str(steps)] if steps else []
    if sys.stdout.isatty():
        result = subprocess.run(command, cwd=ROOT, env=env)
        code = result.returncode
    else:
        child = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert child.stdout is not None
        relay_progress(child.stdout, sys.stdout)
        code = child.wait()
    if code != 0:
        raise FirstRunError(f"building the demo model failed (exit {code}); see the messages above")
    print(
        f"clipserve: demo model built in {time.monotonic() - started:.0f} s, kept in {repo_dir / name} "
        "for the next runs",
        flush=True,
    )


def build_demo_here(repo_dir: Path, name: str, steps: int | None = None) -> None:
    """The demo recipe of training/; `steps` shortens it (tests, slow machines)."""
    from clipserve.training.recipes import ShapesBudget, build_demo_bundle

    budget = ShapesBudget(steps=steps) if steps else None
    bundle = build_demo_bundle(repo_dir, name, progress=True, budget=budget)
    print(f"clipserve: published {bundle.ref} in {repo_dir}", flush=True)


def wait_ready(base: str, server: subprocess.Popen, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise FirstRunError(
                f"clip-serve exited with code {server.returncode} before it was ready; see its log above"
            )
        try:
            with urllib.request.urlopen(f"{base}/readyz", timeout=2) as response:
                return response.read().decode()
        except (urllib.error.URLError, OSError):
            time.sleep(0.25)
    raise FirstRunError(f"clip-serve was not ready after {timeout_s:.0f} s")


def auth_line(service: Settings) -> str:
    keys, key_file = service.api_keys, service.api_keys_file
    if not keys and not key_file:
        return "off: no key needed (set CLIPSERVE_API_KEYS or CLIPSERVE_API_KEYS_FILE to require one)"
    where = ", ".join(
        [*([f"{len(keys)} API key(s)"] if keys else []), *([f"keys of {key_file}"] if key_file else [])]
    )
    return f"on: {where}; the demo page and /docs ask for one (Authorize)"


def banner(base: str, ready: dict, cache: str, auth: str) -> str:
    broken = ready.get("left_out", [])
    lines = [
        "",
        f"clipserve is ready: serving {', '.join(ready['models'])}",
        f"  demo page  {base}/",
        f"  API docs   {base}/docs (and {base}/redoc)",
        f"  cache      {cache}",
        f"  auth       {auth}",
    ]
    if broken:
        lines.append(f"  left out   {len(broken)} broken bundle(s), named in the log above")
    lines += ["  Ctrl-C stops it.", ""]
    return "\n".join(lines)


def uses_redis(service: Settings) -> bool:
    """Only when CLIPSERVE_REDIS_URL names one: the service's default is a local Redis, this script's
    the in-process cache."""
    return service.redis_url is not None and "redis_url" in service.model_fields_set


def prepare(
    options: FirstRunSettings, service: Settings, env: dict[str, str]
) -> tuple[list[str], dict[str, str]]:
    """Everything before the start: port, demo build when nothing is published; returns argv and env."""
    host, port, repo_dir = service.host, service.port, service.models_dir
    try:
        check_port(host, port, "CLIPSERVE_PORT={port} make serve")
    except PortUnavailable as exc:
        raise FirstRunError(str(exc)) from None
    child_env = dict(env)
    repo = ModelRepository(repo_dir)
    if service.models:
        try:
            wanted = [parse_model_ref(ref)[0] for ref in service.models]
        except BundleError as exc:
            raise FirstRunError(f"CLIPSERVE_MODELS: {exc}") from exc
        if not any(repo.versions(name) for name in wanted):
            raise FirstRunError(
                f"none of the models in CLIPSERVE_MODELS ({', '.join(wanted)}) is published in {repo_dir}"
            )
    elif check_models_dir(repo_dir, options.build_demo):
        build_demo(repo_dir, DEMO_MODEL, env, options.demo_steps)
    argv = ["clip-serve", "--models-dir", str(repo_dir), "--host", host, "--port", str(port)]
    if not uses_redis(service):
        # The service's default is a local Redis; an empty URL means the in-process cache only.
        child_env["CLIPSERVE_REDIS_URL"] = ""
        argv += ["--redis-url", "none"]
    return argv, child_env


def run(options: FirstRunSettings, service: Settings, env: dict[str, str]) -> int:
    argv, child_env = prepare(options, service, env)
    base = f"http://{service.host}:{service.port}"
    cache = (
        f"Redis at {hidden_password(service.redis_url)}"
        if uses_redis(service) and service.redis_url
        else "in-process (set CLIPSERVE_REDIS_URL to share one Redis)"
    )
    print(f"clipserve: starting {' '.join(argv)}", flush=True)
    executable = str(Path(sys.executable).parent / argv[0])
    # Its own session: Ctrl-C reaches only this script, which asks the service once to stop gracefully.
    server = subprocess.Popen([executable, *argv[1:]], env=child_env, start_new_session=True)

    stopping: list[int] = []

    def stop(signum: int, _frame: object) -> None:
        stopping.append(signum)
        if server.poll() is None:
            server.terminate()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        ready = wait_ready(base, server, READY_TIMEOUT_S)
    except FirstRunError:
        if server.poll() is None:
            server.terminate()
            server.wait(timeout=30)
        raise
    print(banner(base, json.loads(ready), cache, auth_line(service)), flush=True)
    code = server.wait()
    # uvicorn ends with the signal it was stopped by, after a graceful shutdown: that is a clean stop.
    return 0 if stopping and code in (0, -signal.SIGTERM) else code


def main(argv: list[str]) -> int:
    try:
        if argv[:1] == [BUILD_CHILD] and len(argv) in (3, 4):
            build_demo_here(Path(argv[1]), argv[2], int(argv[3]) if len(argv) == 4 else None)
            return 0
        options = load_settings(FirstRunSettings, argv, PROG, description=FirstRunSettings.__doc__)
        # the service's settings, from the environment as clip-serve will read them: a bad one is told now
        service = validated(Settings, {})
        return run(options, service, dict(os.environ))
    except (FirstRunError, SettingsError) as exc:
        print(f"clipserve: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
