"""`clip-serve --workers N`: the automatic count, thread split, refusals, and a real two-worker server
(one port, real processes, PostgreSQL for the stores, Redis for the cache): aggregated /metrics, hot
reload in every worker, label sets seen by every worker."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from clipserve.contract.cli_settings import usable_cores
from clipserve.service.server.workers import WorkersError, choose_workers, per_worker_settings
from clipserve.service.settings import Settings
from tests.fixtures.models import publish_copy
from tests.fixtures.service import b64, free_port, image_bytes

ROOT = Path(__file__).resolve().parents[2]


def test_automatic_count_follows_backend_and_model_size(tiny_repo: Path, monkeypatch) -> None:
    embedded = Settings(models_dir=tiny_repo)
    assert choose_workers(embedded)[0] == 1
    shared = Settings(models_dir=tiny_repo, collections_backend="pgvector", postgres_dsn="postgresql://x")
    count, reason = choose_workers(shared)
    assert count == usable_cores() and ("per core" in reason or usable_cores() == 1)
    monkeypatch.setattr(
        "clipserve.service.server.workers.SMALL_MODELS_BYTES", 1
    )  # the tiny model now counts as large
    assert choose_workers(shared) == (1, choose_workers(shared)[1])
    assert "every core" in choose_workers(shared)[1] or usable_cores() == 1


def test_explicit_workers_split_the_cores_unless_threads_are_given(tiny_repo: Path) -> None:
    base = dict(models_dir=tiny_repo, collections_backend="pgvector", workers=2)
    split = per_worker_settings(Settings(**base), 2)
    assert split.intra_op_threads == split.preprocess_workers == max(1, usable_cores() // 2)
    given = per_worker_settings(Settings(**base, intra_op_threads=3), 2)
    assert given.intra_op_threads == 3 and given.preprocess_workers == max(1, usable_cores() // 2)
    with pytest.raises(WorkersError, match="needs --collections-backend pgvector"):
        choose_workers(Settings(models_dir=tiny_repo, workers=2))


def test_several_workers_with_the_embedded_store_is_refused_in_one_line(tiny_repo: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPSERVE_")}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "clipserve.service.server.cli",
            "--models-dir",
            str(tiny_repo),
            "--workers",
            "2",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--workers 2 needs --collections-backend pgvector" in lines[0], done.stderr


@pytest.fixture
def two_workers(
    tiny_repo: Path, tmp_path: Path, service_redis_url: str, plain_postgres_schema_dsn: str
) -> Iterator[tuple[str, subprocess.Popen, Path]]:
    import shutil

    repo = tmp_path / "models"
    shutil.copytree(tiny_repo, repo)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPSERVE_")}
    env |= {
        "CLIPSERVE_REDIS_URL": service_redis_url,
        "CLIPSERVE_COLLECTIONS_BACKEND": "pgvector",
        "CLIPSERVE_POSTGRES_DSN": plain_postgres_schema_dsn,
        "CLIPSERVE_RELOAD_POLL_S": "0.5",
        "CLIPSERVE_RETIRE_GRACE_S": "0.2",
        "CLIPSERVE_DATA_DIR": str(tmp_path / "data"),
        "CLIPSERVE_LOG_JSON": "false",
    }
    log = (tmp_path / "serve.log").open("w")
    command = [
        sys.executable,
        "-m",
        "clipserve.service.server.cli",
        "--models-dir",
        str(repo),
        "--port",
        str(port),
    ]
    process = subprocess.Popen(
        [*command, "--workers", "2"], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while len(worker_pids(process)) < 2 or not all_ready(base):
            assert process.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.3)
        yield base, process, repo
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def worker_pids(process: subprocess.Popen) -> list[int]:
    try:
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
    except OSError:
        return []
    # uvicorn's spawn start method adds a resource tracker child: workers run service code
    return [
        int(pid)
        for pid in children
        if "resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    ]


def all_ready(base: str, tries: int = 8) -> bool:
    """Ready answers from several fresh connections (each may reach either worker)."""
    try:
        return all(httpx.get(f"{base}/readyz", timeout=5).status_code == 200 for _ in range(tries))
    except httpx.HTTPError:
        return False


def embed_many(base: str, count: int) -> None:
    def one(i: int) -> int:
        return httpx.post(f"{base}/v1/embed", json={"texts": [f"worker text {i}"]}, timeout=30).status_code

    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(one, range(count))) == {200}


def embed_count(metrics: str) -> float:
    pattern = r'clipserve_request_seconds_count\{[^}]*route="/v1/embed"[^}]*status="200"[^}]*\} (\S+)'
    return sum(float(v) for v in re.findall(pattern, metrics))


def test_two_workers_aggregate_metrics_reload_and_share_label_sets(two_workers) -> None:
    base, process, repo = two_workers
    pids = set(worker_pids(process))
    assert len(pids) == 2

    # Requests spread over both workers; every scrape, whichever worker answers, counts them all.
    seen: set[str] = set()
    sent = 0
    while seen != {str(p) for p in pids} and sent < 400:
        embed_many(base, 40)
        sent += 40
        metrics = httpx.get(f"{base}/metrics", timeout=10).text
        seen = set(re.findall(r'clipserve_cache_hit_ratio\{[^}]*pid="(\d+)"', metrics))
    assert seen == {str(p) for p in pids}, f"only workers {seen} answered {sent} requests"
    for _ in range(6):
        assert embed_count(httpx.get(f"{base}/metrics", timeout=10).text) == sent

    # A label set written through one worker classifies through every worker.
    labels = ["cat", "dog", "car", "tree"]
    put = httpx.put(f"{base}/v1/labelsets/animals", json={"labels": labels}, timeout=60)
    assert put.status_code == 200, put.text
    image = b64(image_bytes(seed=3))
    answers = [
        httpx.post(f"{base}/v1/classify", json={"images": [image], "labelset": "animals"}, timeout=30)
        for _ in range(16)
    ]
    assert {a.status_code for a in answers} == {200}, [a.text for a in answers if a.status_code != 200]
    assert len({str(a.json()["results"]) for a in answers}) == 1

    # A new version is picked up by each worker's own poll.
    version = publish_copy(repo)
    deadline = time.monotonic() + 60
    while True:
        versions = {
            m["version"]
            for _ in range(16)
            for m in httpx.get(f"{base}/v1/models", timeout=10).json()["data"]
            if m["name"] == "tiny"
        }
        if versions == {version}:
            break
        assert time.monotonic() < deadline, f"still serving {versions} after 60 s"
        time.sleep(0.5)
    metrics = httpx.get(f"{base}/metrics", timeout=10).text
    assert re.search(rf'clipserve_model_loaded\{{[^}}]*version="{version}"[^}}]*\}} 1\.0', metrics)


def test_a_failed_start_in_the_workers_is_one_line_from_the_parent(tiny_repo: Path, tmp_path: Path) -> None:
    import shutil

    repo = tmp_path / "models"
    shutil.copytree(tiny_repo, repo)
    target = next(repo.glob("tiny/1/image.onnx"))
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPSERVE_")}
    env |= {"CLIPSERVE_REDIS_URL": "none", "CLIPSERVE_DATA_DIR": str(tmp_path / "data")}
    command = [
        sys.executable,
        "-m",
        "clipserve.service.server.cli",
        "--models-dir",
        str(repo),
        "--workers",
        "2",
    ]
    command += ["--port", str(free_port()), "--collections-backend", "pgvector"]
    command += ["--postgres-dsn", "postgresql://127.0.0.1:1/unused"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=180)
    assert done.returncode == 1, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("clip-serve: error: ") and "image.onnx is corrupted" in last, done.stderr[-2000:]
