"""`make serve` (scripts/serve.sh -> scripts/first_run.py) run as a user runs it, against real bundles.

Each test starts the real script in a subprocess on a free loopback port, reads what it prints,
talks to the service it started over HTTP, and stops it with Ctrl-C (SIGINT), as a user would.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.fixtures.service import free_port

ROOT = Path(__file__).resolve().parents[2]
SERVE_SH = ROOT / "scripts" / "serve.sh"
VENV = Path(sys.executable).parent.parent
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
# The one demo build of the suite: the full recipe a new user gets (about 3.5 minutes on 2 cores).
DEMO_BUILD_TIMEOUT_S = 1800


@dataclass
class Run:
    process: subprocess.Popen
    log: Path
    base: str

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, text: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while text not in (out := self.output()):
            if self.process.poll() is not None:
                raise AssertionError(f"serve.sh exited with {self.process.returncode}:\n{out[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} after {timeout_s} s:\n{out[-4000:]}")
            time.sleep(0.2)
        return out

    def interrupt(self) -> int:
        """Ctrl-C: the script stops the service and exits."""
        self.process.send_signal(signal.SIGINT)
        return self.process.wait(timeout=60)


def serve_env(models_dir: Path | None, port: int, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("CLIPSERVE_")}
    env |= {
        "VENV": str(VENV),
        "CLIPSERVE_PORT": str(port),
        "CLIPSERVE_INTRA_OP_THREADS": "1",
        "CLIPSERVE_PREPROCESS_WORKERS": "1",
        "CLIPSERVE_RELOAD_POLL_S": "0",
    }
    if models_dir is not None:
        env["CLIPSERVE_MODELS_DIR"] = str(models_dir)
    return env | extra


@pytest.fixture
def serve(tmp_path: Path) -> Iterator:
    runs: list[Run] = []

    def start(models_dir: Path | None, **extra: str) -> Run:
        port = int(extra.pop("CLIPSERVE_PORT", 0)) or free_port()
        log = tmp_path / f"serve-{len(runs)}.log"
        with log.open("w") as out:
            process = subprocess.Popen(
                ["bash", str(SERVE_SH)],
                env=serve_env(models_dir, port, **extra),
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=tmp_path,
            )
        run = Run(process, log, f"http://127.0.0.1:{port}")
        runs.append(run)
        return run

    yield start
    for run in runs:
        if run.process.poll() is None:
            run.process.send_signal(signal.SIGINT)
            try:
                run.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                run.process.kill()
                run.process.wait()


def copy_repo(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(".publish.lock"))
    return target


def corrupt(bundle_dir: Path, file: str = "image.onnx") -> None:
    path = bundle_dir / file
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def publish_copy(bundle_dir: Path, target: Path) -> None:
    """The same bundle as a new version, as a publisher would have written it."""
    shutil.copytree(bundle_dir, target)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["version"] = int(target.name)
    (target / "manifest.json").write_text(json.dumps(manifest))


def served(base: str) -> list[str]:
    return [f"{m['name']}@{m['version']}" for m in httpx.get(f"{base}/v1/models", timeout=10).json()["data"]]


def cache_keys(url: str) -> set[bytes]:
    import redis

    client = redis.Redis.from_url(url)
    try:
        return set(client.scan_iter(match="clipserve:v1:*", count=1000))
    finally:
        client.close()


def assert_not_cached_in_redis(base: str) -> None:
    """A text never seen before is embedded; no new cache key appears in the service's default Redis."""
    before = cache_keys(DEFAULT_REDIS_URL)
    response = httpx.post(f"{base}/v1/embed", json={"texts": [f"first run {uuid.uuid4()}"]}, timeout=30)
    assert response.status_code == 200
    assert cache_keys(DEFAULT_REDIS_URL) - before == set()


def test_serves_a_repository_prints_the_urls_and_stops_on_ctrl_c(
    serve, tiny_repo: Path, tmp_path: Path
) -> None:
    run = serve(copy_repo(tiny_repo, tmp_path / "models"))
    out = run.wait_for("clipserve is ready", 90)
    assert f"demo page  {run.base}/" in out and f"API docs   {run.base}/docs" in out
    assert "cache      in-process" in out
    assert "building the demo model" not in out
    assert httpx.get(f"{run.base}/readyz", timeout=10).status_code == 200
    assert httpx.get(f"{run.base}/", timeout=10).status_code == 200
    assert httpx.get(f"{run.base}/docs", timeout=10).status_code == 200
    assert served(run.base) == ["tiny@1"]
    assert_not_cached_in_redis(run.base)
    assert run.interrupt() == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{run.base}/readyz", timeout=5)


def test_redis_is_used_when_its_url_is_set(serve, tiny_repo: Path, tmp_path: Path) -> None:
    """The tiny model's texts cost less than a round trip, so `auto` keeps them in-process; asked to
    share them, every replica finds them in Redis (written just after the response)."""
    url = "redis://127.0.0.1:6379/12"
    run = serve(
        copy_repo(tiny_repo, tmp_path / "models"), CLIPSERVE_REDIS_URL=url, CLIPSERVE_TEXT_CACHE="shared"
    )
    out = run.wait_for("clipserve is ready", 90)
    assert "cache      Redis" in out and "text cache shared" in out
    before = cache_keys(url)
    response = httpx.post(f"{run.base}/v1/embed", json={"texts": [f"first run {uuid.uuid4()}"]}, timeout=30)
    assert response.status_code == 200
    deadline = time.monotonic() + 5
    while not (cache_keys(url) - before) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(cache_keys(url) - before) == 1


def test_a_taken_port_gives_a_clear_message_at_once(serve, tiny_repo: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = serve(tiny_repo, CLIPSERVE_PORT=str(port))
        assert run.process.wait(timeout=60) == 1
    out = run.output()
    assert f"port {port} on 127.0.0.1 is already in use" in out
    assert f"CLIPSERVE_PORT={port + 1} make serve" in out
    assert "Traceback" not in out


def test_its_options_are_settings_in_help_and_a_bad_one_is_one_line(tmp_path: Path) -> None:
    """CLIPSERVE_BUILD_DEMO and CLIPSERVE_DEMO_STEPS are its own settings (flags of scripts/serve.sh,
    listed in --help); the service's CLIPSERVE_* settings are read as clip-serve reads them, so a bad
    one stops it in one line before anything is checked or built."""
    env = serve_env(tmp_path / "absent", free_port())
    shown = subprocess.run(
        ["bash", str(SERVE_SH), "--help"], env=env, capture_output=True, text=True, timeout=60
    )
    assert shown.returncode == 0, shown.stderr
    text = " ".join(shown.stdout.split())
    assert "--build-demo, --no-build-demo" in text and "env CLIPSERVE_BUILD_DEMO]" in text
    assert "--demo-steps N" in text and "env CLIPSERVE_DEMO_STEPS]" in text
    for name, value, told in (
        ("CLIPSERVE_DEMO_STEPS", "few", "CLIPSERVE_DEMO_STEPS: Input should be a valid integer"),
        ("CLIPSERVE_REDIS_RETRY_S", "soon", "CLIPSERVE_REDIS_RETRY_S: Input should be a valid number"),
    ):
        result = subprocess.run(
            ["bash", str(SERVE_SH)], env=env | {name: value}, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 1 and told in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    missing = subprocess.run(["bash", str(SERVE_SH)], env=env, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1
    assert f"model repository {tmp_path / 'absent'} does not exist" in missing.stderr
    assert "CLIPSERVE_BUILD_DEMO=1 make serve" in missing.stderr


def time_wait_sockets(port: int) -> int:
    """TCP connections of this machine in TIME-WAIT (state 06) on local port `port`."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            next(rows)
            for row in rows:
                local, state = row.split()[1], row.split()[3]
                count += int(local.rsplit(":", 1)[1], 16) == port and state == "06"
    return count


def test_stopped_with_ctrl_c_it_starts_again_at_once_on_the_same_port(serve, tiny_repo: Path) -> None:
    """The port probe binds as the server does (SO_REUSEADDR): the TIME-WAIT connections a stopped
    server leaves for a minute are no reason to refuse the port."""
    run = serve(tiny_repo)
    run.wait_for("clipserve is ready", 90)
    port = int(run.base.rsplit(":", 1)[1])
    # an idle keep-alive connection that the server closes as it stops: it stays in TIME-WAIT
    with httpx.Client(base_url=run.base, timeout=10) as client:
        assert client.get("/readyz").status_code == 200
        assert run.interrupt() == 0
    assert time_wait_sockets(port) >= 1
    again = serve(tiny_repo, CLIPSERVE_PORT=str(port))
    out = again.wait_for("clipserve is ready", 90)
    assert "already in use" not in out
    assert again.base == run.base and httpx.get(f"{again.base}/readyz", timeout=10).status_code == 200


def test_a_corrupt_bundle_is_named_and_the_rest_is_served(serve, tiny_repo: Path, tmp_path: Path) -> None:
    models = copy_repo(tiny_repo, tmp_path / "models")
    shutil.copytree(models / "tiny", models / "other")
    corrupt(models / "other" / "1")
    publish_copy(models / "tiny" / "1", models / "tiny" / "2")
    corrupt(models / "tiny" / "2", "text.onnx")
    (models / "stray" / "1").mkdir(parents=True)
    run = serve(models)
    out = run.wait_for("clipserve is ready", 90)
    # `other` is a copy of tiny, so its manifest still names it tiny; the path tells them apart.
    assert f"broken bundle left out: {models / 'other' / '1'}: tiny@1: file image.onnx is corrupted" in out
    assert f"{models / 'tiny' / '2'}: tiny@2: file text.onnx is corrupted" in out
    assert f"{models / 'stray'}: versions 1 have no manifest.json" in out
    assert "left out   3 broken bundle(s)" in out
    assert served(run.base) == ["tiny@1"]
    response = httpx.post(f"{run.base}/v1/embed", json={"texts": ["a red circle"]}, timeout=30)
    assert response.status_code == 200 and response.json()["version"] == 1


def test_a_repository_with_only_broken_models_named_in_clipserve_models_fails_clearly(
    serve, tiny_repo: Path, tmp_path: Path
) -> None:
    models = copy_repo(tiny_repo, tmp_path / "models")
    corrupt(models / "tiny" / "1")
    run = serve(models, CLIPSERVE_MODELS="tiny")
    assert run.process.wait(timeout=60) == 1
    out = run.output()
    assert (
        f"no model in {models} could be loaded; left out: {models / 'tiny' / '1'}: tiny@1: file image.onnx"
        in out
    )
    assert "clip-serve exited with code" in out and "before it was ready" in out


def tour_commands() -> list[str]:
    """The shell commands of the README's tour section, one per entry, continuation lines joined."""
    readme = (ROOT / "README.md").read_text()
    text = readme.split("\n## A 5-minute tour\n", 1)[1].split("\n## ", 1)[0]
    commands: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        commands += [line for line in re.sub(r"\\\n\s*", "", block).splitlines() if line.strip()]
    return commands


def test_the_curl_tour_runs_against_the_service(live_server, tmp_path: Path) -> None:
    """Every command of the README's tour, verbatim but for the port and the model name, against a real server."""
    base = live_server(data_dir=tmp_path / "data")
    (tmp_path / ".venv").symlink_to(VENV)
    commands = tour_commands()
    assert len(commands) >= 15
    for command in commands:
        runnable = command.replace("http://127.0.0.1:8000", base).replace('"shapes-demo"', '"tiny"')
        result = subprocess.run(
            ["bash", "-c", runnable], cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
        if "--fail-with-body" not in command and "curl" in command:
            assert json.loads(result.stdout)["error"]["type"], result.stdout
    assert (tmp_path / "red-circle.png").is_file()


def red_circle_png() -> bytes:
    """The tour's picture: a red disc on white, drawn here rather than by the training code."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (128, 128), "white")
    ImageDraw.Draw(image).ellipse((24, 24, 104, 104), fill="red")
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


@pytest.mark.slow
def test_first_run_builds_the_demo_model_once_and_it_calls_a_red_circle_a_red_circle(
    serve, tmp_path: Path
) -> None:
    from clipserve.training.synthetic import COLOURS, SHAPES

    models = tmp_path / "models"
    # a repository other than the checkout's models/ is filled only when asked
    run = serve(models, CLIPSERVE_BUILD_DEMO="1")
    out = run.wait_for("clipserve is ready", DEMO_BUILD_TIMEOUT_S)
    assert f"no published bundle in {models}; building the demo model once" in out
    assert "demo model built in" in out
    assert served(run.base) == ["shapes-demo@1"]
    labels = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]
    image = base64.b64encode(red_circle_png()).decode()
    response = httpx.post(
        f"{run.base}/v1/classify", json={"images": [image], "labels": labels, "top_k": 3}, timeout=60
    )
    assert response.status_code == 200, response.text
    ranked = response.json()["results"][0]["labels"]
    assert ranked[0]["label"] == "red circle", ranked
    assert run.interrupt() == 0

    again = serve(models)
    out = again.wait_for("clipserve is ready", 90)
    assert "building the demo model" not in out
    assert served(again.base) == ["shapes-demo@1"]
