"""Hot reload under a stream of concurrent requests: zero failures, broken versions refused."""

from __future__ import annotations

import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from clipserve.contract.bundle import ModelRepository
from tests.fixtures.models import publish_copy
from tests.fixtures.service import LOCAL_URL, b64, image_bytes

ADMIN = {"Authorization": "Bearer admin-k"}


@pytest.fixture
def own_repo(tiny_repo: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny repository that tests may publish into."""
    root = tmp_path / "models"
    shutil.copytree(tiny_repo, root)
    return root


class Stream:
    """Worker threads sending embed and classify requests until stopped; counts every status."""

    def __init__(self, base: str, workers: int = 6):
        self.base, self.stop = base, threading.Event()
        self.statuses: Counter[int] = Counter()
        self.versions: Counter[int] = Counter()
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._work, args=(i,), daemon=True) for i in range(workers)]

    def _work(self, seed: int) -> None:
        image = b64(image_bytes(seed=seed))
        payloads = [
            ("/v1/embed", {"texts": [f"text {seed}"]}),
            ("/v1/embed", {"images": [image]}),
            ("/v1/classify", {"images": [image], "labels": ["cat", "dog", "car"]}),
        ]
        with httpx.Client(base_url=self.base, timeout=30) as client:
            n = 0
            while not self.stop.is_set():
                path, body = payloads[n % len(payloads)]
                n += 1
                try:
                    response = client.post(path, json=body)
                    status, version = response.status_code, response.json().get("version")
                except httpx.HTTPError as exc:
                    status, version = -1, None
                    with self.lock:
                        self.errors.append(repr(exc))
                with self.lock:
                    self.statuses[status] += 1
                    if version is not None:
                        self.versions[version] += 1
                    if status != 200:
                        self.errors.append(f"{path}: {status}")

    def __enter__(self) -> Stream:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)


def served_version(base: str) -> int:
    return httpx.get(f"{base}/v1/models").json()["data"][0]["version"]


def test_reload_under_load_has_zero_failures_and_refuses_a_broken_version(
    live_server, own_repo: Path
) -> None:
    base = live_server(models_dir=own_repo, admin_key="admin-k", retire_grace_s=0.5)
    with Stream(base) as stream:
        time.sleep(1.0)
        assert publish_copy(own_repo) == 2
        report = httpx.post(f"{base}/v1/admin/reload", headers=ADMIN, timeout=60).json()
        assert report["loaded"] == ["tiny@2"], report
        time.sleep(1.5)  # the old version retires while requests keep flowing
        assert publish_copy(own_repo, corrupt="image.onnx") == 3
        report = httpx.post(f"{base}/v1/admin/reload", headers=ADMIN, timeout=60).json()
        assert report["loaded"] == [] and report["failed"][0]["model"] == "tiny@3"
        assert "image.onnx" in report["failed"][0]["error"] and "corrupted" in report["failed"][0]["error"]
        time.sleep(1.0)
    assert stream.errors == [] and stream.statuses[200] > 30
    assert stream.versions[1] > 0 and stream.versions[2] > 0 and 3 not in stream.versions
    assert served_version(base) == 2
    metrics = httpx.get(f"{base}/metrics").text
    assert 'clipserve_reloads_total{model="tiny",result="refused"} 1.0' in metrics


def test_polling_picks_up_a_new_version(live_server, own_repo: Path) -> None:
    base = live_server(models_dir=own_repo, reload_poll_s=0.2)
    assert served_version(base) == 1
    publish_copy(own_repo)
    deadline = time.monotonic() + 30
    while served_version(base) != 2:
        assert time.monotonic() < deadline, "the new version was not picked up"
        time.sleep(0.1)
    response = httpx.post(f"{base}/v1/embed", json={"model": "tiny@2", "texts": ["hello"]})
    assert response.status_code == 200 and response.json()["version"] == 2


def test_a_pinned_model_is_not_replaced(live_server, own_repo: Path) -> None:
    publish_copy(own_repo)
    base = live_server(models_dir=own_repo, models=["tiny@1"], admin_key="admin-k")
    report = httpx.post(f"{base}/v1/admin/reload", headers=ADMIN).json()
    assert report["unchanged"] == ["tiny@1"] and served_version(base) == 1


def test_a_version_that_cannot_load_is_refused(live_server, own_repo: Path) -> None:
    base = live_server(models_dir=own_repo, admin_key="admin-k")
    repository = ModelRepository(own_repo)
    source = repository.load("tiny", 1)
    with repository.stage("tiny") as staging:  # hashes match, but the text graph is garbage
        for entry in source.manifest.files:
            shutil.copy(source.path / entry.path, staging.path / entry.path)
        (staging.path / "text.onnx").write_bytes(b"not an onnx graph")
        files = [staging.describe(e.path, e.role, e.precision) for e in source.manifest.files]
        staging.publish(source.manifest.model_copy(update={"files": files}))
    report = httpx.post(f"{base}/v1/admin/reload", headers=ADMIN, timeout=60).json()
    assert report["loaded"] == [] and report["failed"][0]["model"] == "tiny@2", report
    assert served_version(base) == 1
    assert httpx.post(f"{base}/v1/embed", json={"texts": ["still here"]}).json()["version"] == 1


def test_disconnected_clients_work_is_dropped(live_server, make_settings) -> None:
    import socket

    from clipserve.service.app import create_app

    app = create_app(make_settings(max_batch_size_image=1, max_wait_ms=0))
    base = live_server(app=app)
    model = app.state.registry.resolve(None)
    gate = threading.Event()
    model.image_batcher.executor.submit(gate.wait, 30)  # hold the image tower's inference thread
    kept = threading.Thread(
        target=httpx.post,
        args=(f"{base}/v1/embed",),
        kwargs={"json": {"images": [b64(image_bytes(seed=8))]}, "timeout": 30},
    )
    kept.start()  # its image is taken into a batch that waits for the held thread
    deadline = time.monotonic() + 10
    while model.in_flight == 0 or model.image_batcher.depth or model.image_batcher.announced:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    body = f'{{"images": ["{b64(image_bytes(seed=9))}"]}}'.encode()
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            f"POST /v1/embed HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n".encode()
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        while model.image_batcher.depth == 0:  # the abandoned image now waits in the queue
            assert time.monotonic() < deadline
            time.sleep(0.01)
    time.sleep(0.3)  # the server notices the closed connection and cancels the request
    gate.set()
    kept.join(30)
    deadline = time.monotonic() + 10
    metric = 'clipserve_rejected_total{model="tiny@1",reason="cancelled",tower="image"} 1.0'
    while metric not in httpx.get(f"{base}/metrics").text:
        assert time.monotonic() < deadline, "the abandoned item was not dropped"
        time.sleep(0.05)
    assert model.image_stats.items == 1  # the kept request; the abandoned image never ran


def test_a_new_model_in_the_repository_joins_on_reload(live_server, own_repo: Path) -> None:
    base = live_server(models_dir=own_repo, admin_key="admin-k")
    shutil.copytree(own_repo / "tiny" / "1", own_repo / "tiny-copy" / "1")
    manifest = own_repo / "tiny-copy" / "1" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"name": "tiny"', '"name": "tiny-copy"'))
    report = httpx.post(f"{base}/v1/admin/reload", headers=ADMIN, timeout=60).json()
    assert report["loaded"] == ["tiny-copy@1"] and report["unchanged"] == ["tiny@1"]
    names = [m["name"] for m in httpx.get(f"{base}/v1/models").json()["data"]]
    assert names == ["tiny", "tiny-copy"]
    response = httpx.post(f"{base}/v1/embed", json={"model": "tiny-copy", "texts": ["x"]})
    assert response.json()["model"] == "tiny-copy"


def test_start_skips_broken_bundles_and_serves_the_rest(make_client, own_repo: Path) -> None:
    newest = publish_copy(own_repo, corrupt="image.onnx")
    repository = ModelRepository(own_repo)
    source = repository.load("tiny", 1)
    with repository.stage("other") as staging:
        for entry in source.manifest.files:
            shutil.copy(source.path / entry.path, staging.path / entry.path)
        other = staging.publish(source.manifest.model_copy(update={"name": "other"}))
    damaged = other.path / "text.onnx"
    damaged.write_bytes(damaged.read_bytes()[:-10])
    (own_repo / "stray" / "7").mkdir(parents=True)  # a model whose only version has no manifest
    client = make_client(models_dir=own_repo)
    ready = client.get("/readyz")
    assert ready.status_code == 200
    # which versions were left out and why, in words: no path, no exception text (those are logged)
    corrupt = "a file it lists is missing, corrupted, or outside the bundle"
    assert sorted(ready.json()["left_out"], key=lambda e: (e["model"], e["version"])) == [
        {"model": "other", "version": 1, "reason": corrupt},
        {"model": "stray", "version": 7, "reason": "no manifest.json: never published, or copied in part"},
        {"model": "tiny", "version": 2, "reason": corrupt},
    ]
    assert str(own_repo) not in ready.text and ".onnx" not in ready.text
    served = {m["name"]: m["version"] for m in client.get("/v1/models").json()["data"]}
    assert served == {"tiny": 1}, "tiny starts on its last good version; other has none and is left out"
    assert newest == 2
    response = client.post("/v1/embed", json={"model": "other", "texts": ["x"]})
    assert response.status_code == 404 and "other" in response.json()["error"]["message"]


def test_a_bundle_whose_tokenizer_file_leads_outside_is_left_out(make_client, own_repo: Path) -> None:
    """Version 2's tokenizer file is a link to a copy outside the repository (same bytes, so its
    hash matches): refused like a corrupt bundle, version 1 serves, /readyz says why in words."""
    version = publish_copy(own_repo)
    bundle = ModelRepository(own_repo).load("tiny", version)
    vocab = bundle.path / bundle.manifest.tokenizer.vocab_file
    outside = own_repo.parent / "elsewhere" / vocab.name
    outside.parent.mkdir()
    vocab.rename(outside)
    vocab.symlink_to(outside)
    client = make_client(models_dir=own_repo)
    assert [m["version"] for m in client.get("/v1/models").json()["data"]] == [1]
    assert client.get("/readyz").json()["left_out"] == [
        {
            "model": "tiny",
            "version": version,
            "reason": "a file it lists is missing, corrupted, or outside the bundle",
        }
    ]


def test_start_fails_clearly_when_no_model_loads(make_settings, own_repo: Path) -> None:
    from fastapi.testclient import TestClient

    from clipserve.service.app import create_app

    corrupt = own_repo / "tiny" / "1" / "text.onnx"
    corrupt.write_bytes(b"garbage")
    with (
        pytest.raises(Exception, match=r"no model .* could be loaded; left out: .*tiny@1: .*text\.onnx"),
        TestClient(create_app(make_settings(models_dir=own_repo)), base_url=LOCAL_URL),
    ):
        pass
