"""clip-index as people run it: the command line, its own local Ray, a real `clip-serve` process; and a
two-node Ray cluster started on this machine with `ray start`."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest

from clipserve.index.cli import run_index
from tests.fixtures.indexing import (
    BAD_FILES,
    Corpus,
    add_bad_files,
    index_settings,
    kill_marked,
    loopback_address,
    new_mark,
    read_files,
    write_corpus,
)
from tests.fixtures.service import free_port

BIN = Path(sys.executable).parent


def _shard_lines(state_dir: Path) -> int:
    files = list(state_dir.glob("*.jsonl"))
    return max(0, len(files[0].read_text().splitlines()) - 1) if files else 0


def test_index_a_folder_into_a_running_service_as_written(
    tiny_repo, clip_serve, service_redis_url, bomb_png, tmp_path
):
    """`clip-index DIR --model NAME --models-dir MODELS --collection NAME --server URL`: the collection is
    created, bad files are reported, and a run killed with SIGKILL mid-job is finished by running the
    same command again, every image indexed once."""
    service = clip_serve(models_dir=tiny_repo, data_dir=tmp_path / "data", redis_url=service_redis_url)
    corpus = write_corpus(tmp_path / "corpus", 60, seed=300)
    add_bad_files(corpus.path, bomb_png)
    command = [
        str(BIN / "clip-index"), str(corpus.path), "--model", "tiny", "--models-dir", str(tiny_repo),
        "--collection", "photos", "--server", service.base,
    ]  # fmt: skip
    mark = new_mark()
    state_dir = tmp_path / "state"
    env = {
        **os.environ,
        **mark,
        "CLIP_INDEX_STATE_DIR": str(state_dir),
        "CLIP_INDEX_SHARD_SIZE": "4",
        "CLIP_INDEX_THREADS_PER_ACTOR": "1",
    }
    first = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while _shard_lines(state_dir) < 2:
            assert first.poll() is None, first.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no shard finished in 240 s"
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
        kill_marked(mark)
    created = httpx.get(f"{service.base}/v1/collections/photos").json()
    assert created["model"] == "tiny" and 0 < created["count"] < 60, created

    second = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    kill_marked(mark)
    assert second.returncode == 3, second.stdout + second.stderr  # finished, with errors
    assert "done before" in second.stdout and "60 indexed, 4 errors" in second.stdout, second.stdout
    described = httpx.get(f"{service.base}/v1/collections/photos").json()
    assert described["count"] == 60
    records = [json.loads(line) for line in (tmp_path / "clip-index-errors.jsonl").read_text().splitlines()]
    assert {record["id"]: record["code"] for record in records} == BAD_FILES
    some = sorted(corpus.images)[7]
    item = httpx.get(f"{service.base}/v1/collections/photos/items/{some}").json()
    assert item["source"]["kind"] == "image" and item["source"]["value"].startswith("sha256:")


def _wait_for_nodes(address: str, count: int, env: dict[str, str], timeout_s: float = 120) -> None:
    probe = (
        "import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
        "print(sum(1 for n in ray.nodes() if n['Alive']))"
    )
    deadline = time.monotonic() + timeout_s
    while True:
        result = subprocess.run(
            [sys.executable, "-c", probe, address], env=env, capture_output=True, text=True, timeout=120
        )
        if result.returncode == 0 and result.stdout.strip().splitlines()[-1:] == [str(count)]:
            return
        assert time.monotonic() < deadline, (
            f"the Ray cluster did not reach {count} nodes: {result.stderr[-2000:]}"
        )
        time.sleep(1)


def _ray_node(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    ports = [
        "--dashboard-agent-listen-port", str(free_port()),
        "--dashboard-agent-grpc-port", str(free_port()),
        "--runtime-env-agent-port", str(free_port()),
        "--metrics-export-port", str(free_port()),
    ]  # fmt: skip
    command = [
        str(BIN / "ray"), "start", "--block", "--num-cpus", "2", "--disable-usage-stats", *ports, *args,
    ]  # fmt: skip
    return subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


@pytest.mark.slow
def test_two_node_cluster_gives_the_same_files_and_shares_the_work(
    ray_address, tiny_repo, corpus: Corpus, tmp_path
):
    """`ray start --head` and `ray start --address` on this machine: both nodes encode shards, and the
    files are those of a run on the local Ray."""
    mark = new_mark()
    env = {**os.environ, **mark}
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay short
    port = free_port()
    head = _ray_node(
        ["--head", "--port", str(port), "--node-ip-address", "127.0.0.1", "--include-dashboard", "false",
         "--temp-dir", temp_dir,],
        env,
    )  # fmt: skip
    nodes = [head]
    try:
        # every node and driver on the loopback interface, each node at an address of its own
        address = loopback_address(f"127.0.0.1:{port}")
        _wait_for_nodes(address, 1, env)
        nodes.append(_ray_node(["--address", address, "--node-ip-address", "127.0.0.2"], env))
        _wait_for_nodes(address, 2, env)
        output = tmp_path / "cluster"
        command = [
            str(BIN / "clip-index"), str(corpus.path), "--model", "tiny", "--models-dir", str(tiny_repo),
            "--output", str(output), "--ray-address", address, "--shard-size", "2",
            "--threads-per-actor", "1", "--progress", "off",
        ]  # fmt: skip
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr
        node_lines = [line for line in result.stdout.splitlines() if line.strip().startswith("node")]
        assert len(node_lines) == 2, result.stdout
    finally:
        for node in nodes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pid, signal.SIGTERM)
        for node in nodes:
            try:
                node.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)
        kill_marked(mark)
        shutil.rmtree(temp_dir, ignore_errors=True)
    local = tmp_path / "local"
    run_index(
        index_settings(source=corpus.path, model="tiny", models_dir=tiny_repo, output=local, shard_size=2)
    )
    cluster_ids, cluster_vectors = read_files(output, "img_emb")
    local_ids, local_vectors = read_files(local, "img_emb")
    assert cluster_ids == local_ids and len(cluster_ids) == 20
    np.testing.assert_allclose(cluster_vectors, local_vectors, atol=1e-5)
    assert pq.read_table(output / "metadata" / "metadata_3.parquet").equals(
        pq.read_table(local / "metadata" / "metadata_3.parquet")
    )
